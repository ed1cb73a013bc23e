"""The differentiable solver core.

* `linear/`: CG (torch, CuPy, pyamg backends), BiCGSTAB, the differentiable `linear_solve`;
* `normal/`: Gauss-Newton normal operators `J^T J + lam L` (grids: `grid.py`; meshes and clouds: `sparse.py`);
* `gauss_newton.py`: the one Gauss-Newton / Levenberg-Marquardt loop, the problem injected;
* `newton.py`: exact Newton with a trust region and autodiff Hessians (`torch.func`), gradient descent;
* `continuation.py`: continuation in a scale theta with the predictor dw/dtheta = -H^-1 d/dtheta grad J;
* `varpro.py`: variable projection, the inner CG solve differentiated fully, partly or not at all;
* `implicit.py`: implicit differentiation of a converged argmin; `fit.py`: Adam / L-BFGS loops.
"""

from shapeflow.solvers.continuation import ContinuationResult, Prediction, continuation, theta_derivative
from shapeflow.solvers.fit import FitReport, fit
from shapeflow.solvers.gauss_newton import (GaussNewtonResult, GaussNewtonStep, LeastSquaresProblem, Linearization,
                                            gauss_newton, minimize_least_squares)
from shapeflow.solvers.implicit import implicit_argmin
from shapeflow.solvers.linear.bicgstab import bicgstab
from shapeflow.solvers.linear.cg import BACKENDS, PRECONDITIONERS, CGInfo, conjugate_gradient
from shapeflow.solvers.linear.linear_solve import METHODS, MODES, linear_solve
from shapeflow.solvers.normal.grid import (GRID_SOLVERS, GridNormalOperator, PointTerm, assemble_grid_normal_matrix,
                                           gauss_newton_step, grid_normal_operator, solve_grid_normal)
from shapeflow.solvers.newton import NewtonResult, hessian, minimize_gradient, minimize_newton, trust_region_step
from shapeflow.solvers.normal.sparse import SparseNormalOperator, assemble_sparse_normal_matrix, sparse_normal_operator
from shapeflow.solvers.varpro import VARPRO_JACOBIANS, VariableProjection, VarProResult

__all__ = [
    "VarProResult",
    "VariableProjection",
    "VARPRO_JACOBIANS",
    "trust_region_step",
    "minimize_newton",
    "minimize_gradient",
    "hessian",
    "NewtonResult",
    "theta_derivative",
    "continuation",
    "Prediction",
    "ContinuationResult",
    "BACKENDS",
    "CGInfo",
    "FitReport",
    "GRID_SOLVERS",
    "GaussNewtonResult",
    "GaussNewtonStep",
    "GridNormalOperator",
    "LeastSquaresProblem",
    "Linearization",
    "METHODS",
    "MODES",
    "PRECONDITIONERS",
    "PointTerm",
    "SparseNormalOperator",
    "assemble_grid_normal_matrix",
    "assemble_sparse_normal_matrix",
    "bicgstab",
    "conjugate_gradient",
    "fit",
    "gauss_newton",
    "gauss_newton_step",
    "grid_normal_operator",
    "implicit_argmin",
    "linear_solve",
    "minimize_least_squares",
    "solve_grid_normal",
    "sparse_normal_operator",
]
