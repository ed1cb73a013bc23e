"""Regenerate the files in assets/ (run once; the outputs are committed).

- ant.ply: PyVista's example mesh (pyvista/examples/ant.ply, MIT-licensed with PyVista),
  copied unchanged.
- ant_bent.ply: ant.ply with its body bent and a smooth sinusoidal deformation applied
  (shapeflow.synthetic), same vertex order and faces, so vertex correspondence is known.
- horse_contour.csv: the outline of scikit-image's `horse` silhouette (skimage/data/horse.png,
  public domain (CC0) per skimage/data/README.txt), traced with skimage.measure.find_contours
  and resampled to 300 points, in pixel units with y pointing up.
- horse_contour_deformed.csv: the same contour under a known smooth deformation.
"""
import shutil
from pathlib import Path

import numpy as np
import torch

import shapeflow as sf
from shapeflow.synthetic import bend, smooth_deformation

HERE = Path(__file__).parent


def main() -> None:
    import pyvista
    import skimage.data
    import skimage.measure

    ant = HERE / "ant.ply"
    shutil.copy(Path(pyvista.__file__).parent / "examples" / "ant.ply", ant)
    mesh = sf.read(ant)
    moved = smooth_deformation(bend(mesh.points, angle=1.0, axis=2, up=1), amplitude=0.02, seed=3)
    sf.write(sf.Mesh(moved, faces=mesh.faces), HERE / "ant_bent.ply")

    outline = max(skimage.measure.find_contours(skimage.data.horse().astype(float), 0.5), key=len)
    xy = np.c_[outline[:, 1], -outline[:, 0]]                    # (row, col) -> (x, y up)
    arc = np.r_[0, np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))]
    t = np.linspace(0, arc[-1], 300, endpoint=False)
    contour = np.c_[np.interp(t, arc, xy[:, 0]), np.interp(t, arc, xy[:, 1])]
    np.savetxt(HERE / "horse_contour.csv", contour, delimiter=",", fmt="%.4f", header="x,y", comments="")
    deformed = smooth_deformation(torch.as_tensor(contour), amplitude=0.04, seed=5).numpy()
    np.savetxt(HERE / "horse_contour_deformed.csv", deformed, delimiter=",", fmt="%.4f", header="x,y", comments="")


if __name__ == "__main__":
    main()
