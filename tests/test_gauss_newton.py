"""gauss_newton on least-squares problems with known minima and against SciPy."""

import numpy as np
import pytest
import torch

from shapeflow.errors import ShapeflowError
from shapeflow.regularizers import grid_laplacian
from shapeflow.solvers import Linearization, gauss_newton, minimize_least_squares

D = torch.float64


def rosenbrock(x):
    return torch.stack([10 * (x[1] - x[0] ** 2), 1 - x[0]])


@pytest.mark.parametrize("jacobian", ["dense", "matrix_free"])
def test_rosenbrock_minimum(jacobian):
    res = gauss_newton(rosenbrock, torch.tensor([-1.2, 1.0], dtype=D), jacobian=jacobian)
    torch.testing.assert_close(res.x, torch.ones(2, dtype=D), rtol=0, atol=1e-8)
    assert res.converged and res.cost < 1e-16
    assert all(b <= a for a, b in zip(res.history, res.history[1:]))  # monotone (line search)
    assert len(res.history) == res.iterations + 1 or res.converged


def curve_problem(noise):
    t = torch.linspace(0, 1, 40, dtype=D)
    g = torch.Generator().manual_seed(0)
    y = 2.0 * torch.exp(-1.3 * t) + 0.5 + noise * torch.randn(40, dtype=D, generator=g)
    return lambda p: p[0] * torch.exp(p[1] * t) + p[2] - y


def test_exponential_fit_recovers_parameters_without_noise():
    res = gauss_newton(curve_problem(0.0), torch.tensor([1.0, 0.0, 0.0], dtype=D))
    torch.testing.assert_close(res.x, torch.tensor([2.0, -1.3, 0.5], dtype=D), rtol=0, atol=1e-8)


@pytest.mark.parametrize("jacobian", ["dense", "matrix_free"])
def test_exponential_fit_matches_scipy_least_squares(jacobian):
    # What defines the answer is the minimiser, not SciPy's stopping rule at the 7th digit: at ours
    # the gradient J^T r vanishes, its cost is within 1e-12 (relative) of a tightly converged
    # reference, and the parameters agree within what the conditioning of J^T J allows.
    from scipy.optimize import least_squares

    r = curve_problem(0.05)
    res = gauss_newton(r, torch.tensor([1.0, 0.0, 0.0], dtype=D), jacobian=jacobian)
    ref = least_squares(lambda p: r(torch.tensor(p)).numpy(), [1.0, 0.0, 0.0], xtol=1e-15, ftol=1e-15, gtol=1e-15)
    J = torch.func.jacfwd(r)(res.x)                                  # (40, 3)
    gradient = J.T @ r(res.x)
    assert float(gradient.norm()) <= 1e-9 * float(J.norm() * r(res.x).norm() + 1)
    assert abs(res.cost - ref.cost) <= 1e-12 * ref.cost
    # |dx| <~ cond(J^T J) * sqrt(|d cost| / cost) * |x|: the cost agrees to ~1e-12 (rounding), so the
    # parameters may differ by sqrt(1e-12) times the condition number of J (not of J^T J)
    singular = torch.linalg.svdvals(J)
    allowed = float(singular[0] / singular[-1]) * 1e-6 * float(res.x.norm())
    assert float(np.abs(res.x.numpy() - ref.x).max()) <= allowed
    # and the tolerance is not vacuous: it is far below the parameters' own size
    assert allowed < 1e-2 * float(res.x.norm())


def test_regularised_linear_problem_matches_closed_form():
    # r(u) = u - y on a 2D grid field (2, 6, 5), regulariser lam * L (diffusion): the minimiser is
    # (I + lam L)^{-1} y per component; matrix-free path with a sparse L over the flattened field
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 6, 5, dtype=D, generator=g)
    L = grid_laplacian((6, 5), components=2, dtype=D)
    lam = 0.7
    res = gauss_newton(lambda u: u - y, torch.zeros_like(y), (L, lam), jacobian="matrix_free", damping=1e-6)
    ref = torch.linalg.solve(torch.eye(60, dtype=D) + lam * L.to_dense(), y.reshape(-1)).reshape(y.shape)
    torch.testing.assert_close(res.x, ref, rtol=1e-7, atol=1e-8)
    # the dense path with a callable regulariser gives the same
    res2 = gauss_newton(lambda u: u - y, torch.zeros_like(y), (lambda v: L @ v, lam), jacobian="dense")
    torch.testing.assert_close(res2.x, ref, rtol=1e-7, atol=1e-8)


def test_gauss_newton_validation():
    with pytest.raises(ShapeflowError, match=r"gauss_newton\(\): unknown jacobian 'bfgs'; valid names"):
        gauss_newton(rosenbrock, torch.zeros(2, dtype=D), jacobian="bfgs")
    with pytest.raises(ShapeflowError, match=r"regulariser L has shape \(3, 3\), expected \(2, 2\)"):
        gauss_newton(rosenbrock, torch.zeros(2, dtype=D), (torch.eye(3, dtype=D), 1.0))


# --- the one loop, with an injected problem ------------------------------------------------


class _LinearProblem:
    """`1/2 |A x - b|^2` with the normal operator injected as a dense solve (counts the calls)."""

    def __init__(self, A, b, scaling="identity"):
        self.A, self.b, self.scaling, self.solves = A, b, scaling, 0

    def cost(self, x):
        r = self.A @ x - self.b
        return float(0.5 * r @ r), r

    def linearize(self, x, r):
        H, g = self.A.T @ self.A, self.A.T @ r
        D = torch.eye(len(x), dtype=x.dtype) if self.scaling == "identity" else torch.diag(torch.diagonal(H))

        def solve(mu):
            self.solves += 1
            return torch.linalg.solve(H + mu * D, -g), 0

        return Linearization(g, solve)


@pytest.mark.parametrize("damping, line_search", [(0.0, "decrease"), (1e-3, "armijo"), (10.0, "decrease")])
def test_minimize_least_squares_with_an_injected_normal_operator_matches_lstsq(damping, line_search):
    g = torch.Generator().manual_seed(4)
    A, b = torch.randn(30, 5, dtype=D, generator=g), torch.randn(30, dtype=D, generator=g)
    steps = []
    res = minimize_least_squares(_LinearProblem(A, b, "diagonal"), torch.zeros(5, dtype=D), damping=damping,
                                 line_search=line_search, maxiter=200, callback=steps.append)
    ref = torch.linalg.lstsq(A, b[:, None]).solution[:, 0]
    torch.testing.assert_close(res.x, ref, rtol=0, atol=1e-8)
    assert all(b <= a for a, b in zip(res.history, res.history[1:]))
    assert len(steps) == res.iterations and steps[0].iteration == 0
    if damping == 0.0:      # plain Gauss-Newton solves a linear problem in one step
        assert res.history[1] == pytest.approx(res.history[-1], rel=1e-12)


def test_minimize_least_squares_stops_cleanly_on_ctrl_c_with_the_best_iterate():
    g = torch.Generator().manual_seed(5)
    A, b = torch.randn(20, 4, dtype=D, generator=g), torch.randn(20, dtype=D, generator=g)

    def interrupt(step):
        if step.iteration == 1:
            raise KeyboardInterrupt

    res = minimize_least_squares(_LinearProblem(A, b), torch.zeros(4, dtype=D), damping=100.0, callback=interrupt)
    assert res.interrupted and res.iterations == 2
    assert res.cost == pytest.approx(_LinearProblem(A, b).cost(res.x)[0]) and res.cost == min(res.history)


def test_minimize_least_squares_validates_its_options():
    with pytest.raises(ShapeflowError, match="unknown line search 'wolfe'; choose from armijo, decrease"):
        minimize_least_squares(_LinearProblem(torch.eye(2, dtype=D), torch.ones(2, dtype=D)), torch.zeros(2, dtype=D),
                               line_search="wolfe")


def test_image_registration_and_affine_prealignment_run_the_one_loop(monkeypatch):
    """Both image fits go through `minimize_least_squares` (no loop of their own)."""
    import shapeflow as sf
    from shapeflow.pipelines import image_affine, images
    from shapeflow.synthetic import phantom_pair

    calls = []
    real = minimize_least_squares

    def counting(problem, x0, **kwargs):
        calls.append(type(problem).__name__)
        return real(problem, x0, **kwargs)

    monkeypatch.setattr(images, "minimize_least_squares", counting)
    monkeypatch.setattr(image_affine, "minimize_least_squares", counting)
    moving, fixed, _ = phantom_pair((24, 24), amplitude=1.0, seed=1)
    sf.register(moving, fixed, prealign="affine", levels=2, progress=False)
    assert calls.count("AffineProblem") == 2 and calls.count("GridProblem") == 2


def test_infeasible_steps_get_their_own_halvings():
    """A step the problem refuses (infinite cost) is halved up to `infeasible_halvings` times; a
    feasible step that does not decrease only up to `max_halvings`. Here every x > 0.05 is refused:
    the full step to the minimum x = 1 needs 5 halvings to become feasible."""
    import math

    from shapeflow.solvers import Linearization, minimize_least_squares

    class Fenced:
        def cost(self, x):
            return (math.inf if float(x) > 0.05 else float((x - 1) ** 2)), None

        def linearize(self, x, state):
            return Linearization(2 * (x - 1), lambda mu: (1 - x, 0))

    x0 = torch.zeros(1, dtype=torch.float64)
    stuck = minimize_least_squares(Fenced(), x0, maxiter=1, damping=0.0, line_search="decrease", max_halvings=2)
    assert float(stuck.x) == 0.0
    moved = minimize_least_squares(Fenced(), x0, maxiter=1, damping=0.0, line_search="decrease", max_halvings=2,
                                   infeasible_halvings=8)
    assert float(moved.x) == 1 / 32


def test_fatol_stops_once_the_cost_is_below_it():
    """A zero-residual problem: without fatol the loop runs on while the relative decrease is large;
    with it, it stops (converged) at the first iterate whose cost is below the floor."""
    def residual(x):
        return torch.stack([x[0] ** 3 - 1.0, x[1] - 2.0])

    free = gauss_newton(residual, torch.tensor([3.0, 0.0], dtype=D), ftol=0.0, gtol=0.0, xtol=0.0)
    floor = 1e-6

    class Problem:
        def cost(self, x):
            r = residual(x)
            return 0.5 * float(r.square().sum()), r

        def linearize(self, x, r):
            J = torch.func.jacfwd(residual)(x)
            return Linearization(J.T @ r, lambda mu: (torch.linalg.solve(J.T @ J + mu * torch.eye(2, dtype=D), -J.T @ r), 0))

    stopped = minimize_least_squares(Problem(), torch.tensor([3.0, 0.0], dtype=D), fatol=floor, ftol=0.0, gtol=0.0,
                                     xtol=0.0)
    assert stopped.converged and stopped.cost <= floor
    assert stopped.history[-2] > floor             # the iterate before was above the floor
    assert stopped.iterations < free.iterations
