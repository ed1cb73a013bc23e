"""Deformation models behind one interface (`Deformation`), and the registries of model names."""
from .._registry import Registry
from .base import DEFORMATIONS, Deformation, load_deformation, points_io, register_deformation
from .compose import Compose, Normalized
from .fields import DisplacementField, StationaryVelocityField
from .kernel import KernelLDDMM
from .linear import Affine, Rigid, Similarity
from .ode import NeuralODEFlow
from .resnet import ResNetFlow
from .vertex import PointDisplacement

#: the names `register(model=...)` accepts for shapes
MODELS: Registry[type[Deformation]] = Registry("model", {"rigid": Rigid, "similarity": Similarity, "affine": Affine,
                                                         "resnet": ResNetFlow, "node": NeuralODEFlow,
                                                         "lddmm": KernelLDDMM, "displacement": PointDisplacement})
#: the names `register(model=...)` accepts for images
IMAGE_MODELS: Registry[type[Deformation]] = Registry("image model", {"displacement": DisplacementField,
                                                                     "svf": StationaryVelocityField,
                                                                     "affine": Affine})

__all__ = ["Deformation", "Rigid", "Similarity", "Affine", "ResNetFlow", "NeuralODEFlow", "KernelLDDMM", "PointDisplacement", "Compose",
           "Normalized",
           "DisplacementField", "StationaryVelocityField",
           "MODELS", "IMAGE_MODELS", "DEFORMATIONS", "load_deformation", "register_deformation", "points_io"]
