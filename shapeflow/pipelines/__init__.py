"""Pipelines: one per kind of data, each turning data, a model, a data term and a solver into a `Result`.

`shapes.py` (first-order fits of linear models and flows on point sets), `images.py` (Gauss-Newton
on grids, with `image_affine.py` for the affine part). `shapeflow.register` dispatches to them.
"""
