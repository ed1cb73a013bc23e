"""Deformation models behind one interface (`Deformation`), and the registry of model names."""
from .base import DEFORMATIONS, Deformation, load_deformation, register_deformation
from .compose import Compose, Normalized
from .fields import DisplacementField, StationaryVelocityField
from .linear import Affine, Rigid, Similarity
from .resnet import ResNetFlow

#: the names `register(model=...)` accepts
MODELS = {"rigid": Rigid, "similarity": Similarity, "affine": Affine, "resnet": ResNetFlow}

__all__ = ["Deformation", "Rigid", "Similarity", "Affine", "ResNetFlow", "Compose", "Normalized",
           "DisplacementField", "StationaryVelocityField",
           "MODELS", "DEFORMATIONS", "load_deformation", "register_deformation"]
