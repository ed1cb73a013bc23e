import subprocess
import sys


def test_star_import_gives_the_public_api():
    namespace: dict = {}
    exec("from shapeflow import *", namespace)
    for name in ["register", "read", "write", "load_deformation", "PointCloud", "Mesh", "Landmarks",
                 "ResNetFlow", "Rigid", "Similarity", "Affine", "Result", "viz"]:
        assert name in namespace, name


def test_import_prints_nothing_and_loads_no_heavy_optional_parts():
    code = ("import sys, shapeflow; "
            "print(sorted(m for m in ('pyvista', 'cupy', 'pykeops', 'geomloss', 'pyamg') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert out.stderr == ""


def test_shapeflow_learn_is_imported_on_first_use_and_by_a_learned_registration():
    """`import shapeflow` leaves `shapeflow.learn` (80 ms) out; `sf.learn` and `from shapeflow import
    learn` import it; `register(..., loss="learned", features=file)` imports it (its file names a
    network that shapeflow.learn registers), in a fresh process."""
    import subprocess
    import sys
    from pathlib import Path

    model = Path(__file__).resolve().parents[1] / "assets" / "models" / "suits2d.pt"
    code = ("import sys, numpy as np, shapeflow as sf\n"
            "assert 'shapeflow.learn' not in sys.modules\n"
            "fixed = np.zeros((32, 32), np.float32); fixed[8:24, 10:22] = 1\n"
            "moving = np.roll(fixed, 2, axis=0)\n"
            "a, b = sf.Image(moving[None]), sf.Image(fixed[None])\n"
            f"result = sf.register(a, b, loss='learned', features={str(model)!r}, progress=False)\n"
            "assert 'shapeflow.learn' in sys.modules\n"
            "print(type(sf.learn).__name__, sf.learn.SuitsNet.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["module", "SuitsNet"]
