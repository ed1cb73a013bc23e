"""The differentiable solver core: linear solves, Gauss-Newton, Newton, implicit differentiation, fitting loops."""

from shapeflow.solvers.bicgstab import bicgstab
from shapeflow.solvers.cg import BACKENDS, PRECONDITIONERS, CGInfo, conjugate_gradient
from shapeflow.solvers.linear_solve import METHODS, MODES, linear_solve

__all__ = [
    "BACKENDS",
    "CGInfo",
    "METHODS",
    "MODES",
    "PRECONDITIONERS",
    "bicgstab",
    "conjugate_gradient",
    "linear_solve",
]
