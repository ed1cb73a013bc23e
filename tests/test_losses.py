import math

import pytest
import torch

import shapeflow as sf
from shapeflow.losses import LOSSES, ChamferLoss, chamfer_loss, l2_loss, nearest_neighbors, sinkhorn_loss


def brute_force_chamfer(x, y):
    d = torch.cdist(x, y) ** 2                                  # (N, M)
    return d.min(1).values.mean() + d.min(0).values.mean()


@pytest.mark.parametrize("dim", [2, 3])
def test_chamfer_matches_brute_force(dim):
    x, y = torch.rand(200, dim), torch.rand(150, dim)
    torch.testing.assert_close(chamfer_loss(x, y), brute_force_chamfer(x, y))
    assert torch.equal(nearest_neighbors(x, y), torch.cdist(x, y).argmin(1))


def test_chamfer_gradient_matches_finite_differences():
    x = torch.rand(12, 3, dtype=torch.float64, requires_grad=True)
    y = torch.rand(9, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(chamfer_loss, (x, y), eps=1e-6, atol=1e-6)


def test_chamfer_gradient_equals_brute_force_gradient():
    x = torch.rand(100, 3, requires_grad=True)
    y = torch.rand(80, 3)
    grad = torch.autograd.grad(chamfer_loss(x, y), x)[0]
    reference = torch.autograd.grad(brute_force_chamfer(x, y), x)[0]
    torch.testing.assert_close(grad, reference)


def dense_sinkhorn_ot(x, y, eps, iterations=300):
    """Entropic OT_eps between uniform measures by plain log-domain Sinkhorn iterations, cost |x-y|^2/2."""
    cost = torch.cdist(x, y) ** 2 / 2
    log_a = torch.full((len(x),), -math.log(len(x)), dtype=x.dtype)
    log_b = torch.full((len(y),), -math.log(len(y)), dtype=x.dtype)
    f, g = torch.zeros(len(x), dtype=x.dtype), torch.zeros(len(y), dtype=x.dtype)
    for _ in range(iterations):
        f = -eps * torch.logsumexp(log_b[None, :] + (g[None, :] - cost) / eps, dim=1)
        g = -eps * torch.logsumexp(log_a[:, None] + (f[:, None] - cost) / eps, dim=0)
    return f.mean() + g.mean()


def dense_sinkhorn_divergence(x, y, eps):
    return dense_sinkhorn_ot(x, y, eps) - dense_sinkhorn_ot(x, x, eps) / 2 - dense_sinkhorn_ot(y, y, eps) / 2


def test_sinkhorn_matches_a_dense_log_domain_reference():
    x = torch.rand(40, 3, dtype=torch.float64)
    y = torch.rand(30, 3, dtype=torch.float64) + 0.3
    blur = 0.3
    ours = sinkhorn_loss(x, y, blur=blur, scaling=0.95)
    reference = dense_sinkhorn_divergence(x, y, eps=blur ** 2)
    torch.testing.assert_close(ours, reference, rtol=2e-3, atol=1e-6)


def test_sinkhorn_gradient_matches_finite_differences_of_the_reference():
    x = torch.rand(15, 2, dtype=torch.float64, requires_grad=True)
    y = torch.rand(12, 2, dtype=torch.float64) + 0.2
    grad = torch.autograd.grad(sinkhorn_loss(x, y, blur=0.3, scaling=0.95), x)[0]
    h = 1e-5
    numeric = torch.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            e = torch.zeros_like(x)
            e[i, j] = h
            with torch.no_grad():
                numeric[i, j] = (dense_sinkhorn_divergence(x + e, y, 0.09) - dense_sinkhorn_divergence(x - e, y, 0.09)) / (2 * h)
    torch.testing.assert_close(grad, numeric, rtol=2e-2, atol=1e-4)


def test_sinkhorn_is_zero_between_identical_clouds_and_positive_otherwise():
    x = torch.rand(60, 3)
    assert abs(float(sinkhorn_loss(x, x))) < 1e-5
    assert float(sinkhorn_loss(x, x + 0.1)) > 1e-3


def test_unbalanced_sinkhorn_discounts_outliers():
    x = torch.rand(100, 3)
    y = torch.cat([x, torch.full((5, 3), 50.0)])
    assert float(sinkhorn_loss(x, y, reach=0.5)) < 0.1 * float(sinkhorn_loss(x, y))


def test_l2_is_the_mean_squared_distance_and_needs_correspondence():
    x, y = torch.rand(10, 3), torch.rand(10, 3)
    torch.testing.assert_close(l2_loss(x, y), ((x - y) ** 2).sum(1).mean())
    with pytest.raises(sf.ShapeflowError, match="correspondence"):
        l2_loss(x, y[:5])


def test_loss_registry_and_dimension_check():
    assert set(LOSSES) == {"sinkhorn", "chamfer", "l2", "varifold", "currents"}
    with pytest.raises(sf.ShapeflowError, match="same d"):
        ChamferLoss()(torch.rand(5, 2), torch.rand(5, 3))
