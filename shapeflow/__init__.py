"""shapeflow: register shapes and images with one set of deformations and one solver core.

    import shapeflow as sf
    result = sf.register("source.ply", "target.ply", model="resnet", loss="sinkhorn")
    result.save("out/")
"""
from . import viz
from .deform import (Affine, Compose, Deformation, DisplacementField, KernelLDDMM, NeuralODEFlow, PointDisplacement,
                     ResNetFlow, Rigid, Similarity,
                     StationaryVelocityField, load_deformation)
from .errors import InverseError, ShapeflowError, ShapeflowWarning
from .io import read, write
from .pipelines.atlas import Atlas, build_atlas
from .pipelines.batch import BatchSummary, register_many
from .register import register
from .result import Result
from .shapes import Curve, Image, Landmarks, Mesh, PointCloud

__all__ = ["register", "Result", "read", "write", "load_deformation", "PointCloud", "Mesh", "Curve", "Landmarks", "Image",
           "Deformation", "Rigid", "Similarity", "Affine", "ResNetFlow", "NeuralODEFlow", "KernelLDDMM", "Compose",
           "DisplacementField", "PointDisplacement",
           "StationaryVelocityField",
           "ShapeflowError", "ShapeflowWarning", "InverseError", "learn", "viz",
           "register_many", "BatchSummary", "build_atlas", "Atlas"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """`shapeflow.learn` is imported on first use: it is 80 ms of `import shapeflow` (half of it
    after torch), which every first call would pay. `register(..., loss="learned")` imports it."""
    if name == "learn":
        import importlib

        return importlib.import_module(".learn", __name__)
    raise AttributeError(f"module 'shapeflow' has no attribute {name!r}")
