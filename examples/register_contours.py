"""Register two 2D horse outlines and write the flow as a GIF and the loss curve as a PNG.

    python examples/register_contours.py   # writes examples/out/horse_flow.gif, horse_loss.png
"""
from pathlib import Path

import shapeflow as sf

HERE = Path(__file__).parent
ASSETS = HERE.parent / "assets"

result = sf.register(ASSETS / "horse_contour.csv", ASSETS / "horse_contour_deformed.csv", loss="sinkhorn")
out = HERE / "out"
out.mkdir(exist_ok=True)
sf.viz.animate(result, out / "horse_flow.gif")
sf.viz.plot_history(result, out / "horse_loss.png")
print({k: v for k, v in result.metrics.items() if v is not None})
