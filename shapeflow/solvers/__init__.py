"""The differentiable solver core: linear solves, Gauss-Newton, Newton, implicit differentiation, fitting loops."""

from shapeflow.solvers.bicgstab import bicgstab
from shapeflow.solvers.cg import BACKENDS, PRECONDITIONERS, CGInfo, conjugate_gradient
from shapeflow.solvers.fit import FitReport, fit
from shapeflow.solvers.gauss_newton import GaussNewtonResult, gauss_newton
from shapeflow.solvers.implicit import implicit_argmin
from shapeflow.solvers.linear_solve import METHODS, MODES, linear_solve

__all__ = [
    "BACKENDS",
    "CGInfo",
    "FitReport",
    "GaussNewtonResult",
    "METHODS",
    "MODES",
    "PRECONDITIONERS",
    "bicgstab",
    "conjugate_gradient",
    "fit",
    "gauss_newton",
    "implicit_argmin",
    "linear_solve",
]
