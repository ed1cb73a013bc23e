"""The warm-started dense Sinkhorn divergence against geomloss (the reference) and finite differences."""
import pytest
import torch

import shapeflow.losses.sinkhorn as sk
from shapeflow.losses.points import SinkhornLoss, sinkhorn_loss
from shapeflow.losses.sinkhorn import SinkhornState, sinkhorn_divergence

geomloss = pytest.importorskip("geomloss")


def _clouds(seed=0, n=60, m=75):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=torch.float64)
    y = 1.1 * torch.randn(m, 2, generator=g, dtype=torch.float64) + 0.2
    return x, y


def _geomloss(x, y, blur, reach, scaling):
    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, reach=reach, scaling=scaling, debias=True,
                                backend="tensorized")
    x = x.detach().clone().requires_grad_()
    value = loss(x, y)
    return value.detach(), torch.autograd.grad(value, x)[0]


def _ours(x, y, blur, reach, state=None, scaling=0.5):
    x = x.detach().clone().requires_grad_()
    value = sinkhorn_divergence(x, y, blur, reach, scaling, state=state)
    return value.detach(), torch.autograd.grad(value, x)[0]


@pytest.mark.parametrize("sizes", [(60, 75), (70, 70), (170, 170)], ids=["unequal", "stacked", "equal-large"])
@pytest.mark.parametrize("reach", [None, 0.15])
@pytest.mark.parametrize("blur", [0.02, 0.06])
def test_a_cold_call_is_geomlosss_algorithm(blur, reach, sizes, monkeypatch):
    """Unequal clouds take four softmins a sweep; equal ones up to `STACK_ENTRIES` one stacked
    reduction (`sk._annealed`), larger equal ones four again: all are geomloss's loop."""
    x, y = _clouds(n=sizes[0], m=sizes[1])
    softmin, batched = sk._softmin, []
    monkeypatch.setattr(sk, "_softmin", lambda eps, cost, h, *scale: batched.append(cost.dim() == 3)
                        or softmin(eps, cost, h, *scale))
    value, grad = _ours(x, y, blur, reach)
    assert any(batched) == (sizes == (70, 70))
    ref_value, ref_grad = _geomloss(x, y, blur, reach, 0.5)
    torch.testing.assert_close(value, ref_value, rtol=1e-10, atol=1e-12)
    if reach is not None:   # geomloss's unbalanced gradient lacks Prop. 12's weight (see the module)
        eps, rho = blur ** 2, reach ** 2
        grad = grad * (rho + eps / 2) / (rho + eps)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-10)


@pytest.fixture
def strict(monkeypatch):
    """Warm calls swept to convergence (the fit's policy stops after a few sweeps)."""
    monkeypatch.setattr(sk, "TOL", 1e-7)
    monkeypatch.setattr(sk, "MAX_ITERATIONS", 50)


def _converge(x, y, blur, reach, state, calls=200):
    for _ in range(calls):
        value, grad = _ours(x, y, blur, reach, state)
        if state.sweeps == 1:
            break
    return value, grad


@pytest.mark.parametrize("reach", [None, 0.15])
def test_warm_calls_reach_the_converged_divergence(reach, strict):
    """geomloss with a slow annealing (scaling 0.999) approximates the converged divergence; its
    default (0.5) is 1-20 % off in value and 30-80 % in gradient on these clouds."""
    x, y = _clouds(1)
    blur = 0.06
    value, grad = _converge(x, y, blur, reach, SinkhornState())
    ref_value, ref_grad = _geomloss(x, y, blur, reach, 0.999)
    if reach is not None:
        grad = grad * (reach ** 2 + blur ** 2 / 2) / (reach ** 2 + blur ** 2)
    assert abs(float(value - ref_value)) <= 5e-4 * abs(float(ref_value))
    assert float((grad - ref_grad).norm() / ref_grad.norm()) < 0.1
    default_value, default_grad = _geomloss(x, y, blur, reach, 0.5)
    assert float((default_grad - ref_grad).norm() / ref_grad.norm()) > 0.2    # what the warm start buys


def test_a_warm_start_on_moved_points_sweeps_a_few_times_and_reaches_the_same_divergence(monkeypatch):
    x, y = _clouds(2)
    blur, reach = 0.06, 0.15
    state = SinkhornState()
    _converge(x, y, blur, reach, state)
    moved = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=x.dtype)
    _ours(moved, y, blur, reach, state)
    assert 1 <= state.sweeps <= sk.MAX_ITERATIONS
    monkeypatch.setattr(sk, "TOL", 1e-7)
    monkeypatch.setattr(sk, "MAX_ITERATIONS", 50)
    warm_value, warm_grad = _converge(moved, y, blur, reach, state)
    cold_value, cold_grad = _converge(moved, y, blur, reach, SinkhornState())
    torch.testing.assert_close(warm_value, cold_value, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(warm_grad, cold_grad, rtol=1e-2, atol=1e-4)


def test_the_gradient_at_convergence_is_the_derivative_of_the_divergence(monkeypatch):
    """The last update's envelope-theorem gradient against central finite differences of the
    converged divergence."""
    monkeypatch.setattr(sk, "TOL", 1e-9)
    monkeypatch.setattr(sk, "MAX_ITERATIONS", 2000)
    x, y = _clouds(4, n=12, m=15)
    blur, reach = 0.3, 0.5

    def converged(points):
        state = SinkhornState()
        sinkhorn_divergence(points, y, blur, reach, state=state)
        return _ours(points, y, blur, reach, state)

    _, grad = converged(x)
    h = 1e-5
    for i, k in [(0, 0), (3, 1), (11, 0)]:
        step = torch.zeros_like(x)
        step[i, k] = h
        numeric = (converged(x + step)[0] - converged(x - step)[0]) / (2 * h)
        assert abs(float(numeric - grad[i, k])) < 1e-6 + 1e-4 * abs(float(numeric))


def test_the_loss_module_keeps_its_state_and_a_new_target_starts_cold():
    x, y = _clouds(5)
    loss = SinkhornLoss(blur=0.06, reach=0.15, warm_start=True)
    loss(x, y)
    cold = loss.state.sweeps
    loss(x, y)
    assert loss.state.sweeps <= sk.MAX_ITERATIONS < cold
    loss(x, y.clone())                      # another target tensor: its potentials do not apply
    assert loss.state.sweeps == cold
    loss(x[:-1], loss.state.target)         # another source size: cold too
    assert loss.state.sweeps == cold


def test_the_function_is_stateless_by_default_and_geomloss_backends_stay_reachable():
    x, y = _clouds(6)
    dense = sinkhorn_loss(x, y, blur=0.05, reach=None, backend="dense")
    assert torch.equal(dense, sinkhorn_loss(x, y, blur=0.05, reach=None, backend="dense"))
    torch.testing.assert_close(dense, sinkhorn_loss(x, y, blur=0.05, backend="tensorized"), rtol=1e-10, atol=1e-12)


def test_register_with_warm_start_fits_a_smooth_deformation():
    """`warm_start=True` through `sf.register` (off by default): a known smooth deformation of a
    curve is recovered as well as by the cold loop."""
    import numpy as np
    import shapeflow as sf
    from shapeflow.synthetic import smooth_deformation
    t = np.linspace(0, 2 * np.pi, 120, endpoint=False)
    source = np.stack([np.cos(t), 0.6 * np.sin(t) + 0.2 * np.sin(3 * t)], 1)
    target = smooth_deformation(torch.from_numpy(source), amplitude=0.05, seed=0).numpy()
    before = np.sqrt(((source - target) ** 2).sum(1).mean())
    errors = {}
    for warm in (False, True):
        warped = sf.register(source, target, warm_start=warm, progress=False).warped
        errors[warm] = np.sqrt(((warped - target) ** 2).sum(1).mean())
    assert errors[True] < 0.3 * before and errors[True] < 2 * errors[False] + 1e-3


def test_geomloss_backends_get_the_same_unbalanced_gradient_as_the_dense_loop():
    x, y = _clouds(7)
    grads = {}
    for backend in ("dense", "tensorized"):
        points = x.clone().requires_grad_()
        value = sinkhorn_loss(points, y, blur=0.06, reach=0.15, backend=backend)
        grads[backend] = (value.detach(), torch.autograd.grad(value, points)[0])
    torch.testing.assert_close(grads["dense"][0], grads["tensorized"][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads["dense"][1], grads["tensorized"][1], rtol=1e-8, atol=1e-10)
