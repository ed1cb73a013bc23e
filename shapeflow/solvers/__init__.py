"""The differentiable solver core: linear solves (CG, BiCGSTAB, AMG, CuPy), the differentiable `linear_solve`, Gauss-Newton, implicit differentiation, fitting loops."""

from shapeflow.solvers.bicgstab import bicgstab
from shapeflow.solvers.cg import BACKENDS, PRECONDITIONERS, CGInfo, conjugate_gradient
from shapeflow.solvers.fit import FitReport, fit
from shapeflow.solvers._operators import GridNormalOperator, assemble_grid_normal_matrix, grid_normal_operator
from shapeflow.solvers.gauss_newton import GaussNewtonResult, gauss_newton
from shapeflow.solvers.implicit import implicit_argmin
from shapeflow.solvers.linear_solve import METHODS, MODES, linear_solve

__all__ = [
    "BACKENDS",
    "CGInfo",
    "FitReport",
    "GaussNewtonResult",
    "GridNormalOperator",
    "METHODS",
    "MODES",
    "PRECONDITIONERS",
    "assemble_grid_normal_matrix",
    "bicgstab",
    "conjugate_gradient",
    "fit",
    "gauss_newton",
    "grid_normal_operator",
    "implicit_argmin",
    "linear_solve",
]
