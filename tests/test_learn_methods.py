"""The LearnGN training method: its loss's gradient, its start, and the symmetry of its network.

LearnGN (Heinrich & Hansen) trains a CNN that predicts the gradient and residual of the
Gauss-Newton system through k Gauss-Newton steps (each solved by CG, differentiated by one adjoint
CG solve) and a label loss on the warped moving labels. Checked here against independent
references: central finite differences of the whole loss, and a dense NumPy Gauss-Newton.
"""
import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from shapeflow.learn import LearnGNNet, phantom_pair
from shapeflow.learn.methods import MethodOptions, as_pair, learngn, register_pair

D = torch.float64


def _pair(size=(12, 12), seed=20003):
    return as_pair(*phantom_pair(seed, size=size, modality="mono", amplitude=0.08), dtype=D)


@pytest.mark.parametrize("symmetric", [True, False])
def test_learngn_loss_gradient_matches_finite_differences(symmetric):
    """d(label loss after 2 tracked Gauss-Newton steps)/d(every CNN weight), by autograd through
    the adjoint CG solves and by central differences along random directions (float64)."""
    torch.manual_seed(0)
    net = LearnGNNet(2, width=3, layers=2, symmetric=symmetric).double()
    with torch.no_grad():          # a trained-looking head, so that the body's weights get a gradient too
        net.head.weight.normal_(0, 0.05)
        net.head.bias.normal_(0, 0.02)
    pair = _pair()
    options = MethodOptions("learngn", iterations=2, lam=0.1, loss="ce", cg_tol=1e-12, cg_iterations=1000)
    params = list(net.parameters())

    def loss():
        return learngn(net, [pair], options)[0]

    grads = torch.autograd.grad(loss(), params)
    assert all(g.abs().sum() > 0 for g in grads)
    eps = 1e-6
    for _ in range(2):
        direction = [torch.randn_like(v) for v in params]
        values = []
        with torch.no_grad():
            for sign in (1, -2, 1):        # +eps, -eps, back to the start
                for v, d in zip(params, direction):
                    v.add_(sign * eps * d)
                values.append(float(loss()))
        numeric = (values[0] - values[1]) / (2 * eps)
        analytic = sum(float((g * d).sum()) for g, d in zip(grads, direction))
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-10)


def _dense_gauss_newton(moving: np.ndarray, fixed: np.ndarray, lam: float, steps: int) -> np.ndarray:
    """The hand-crafted Gauss-Newton of two 2D images (unit spacing), dense: per step g = central
    differences of the warped image (one-sided at the border), r = warped - fixed,
    `(diag blocks g g^T + lam L) du = -r g - lam L u`, L the Neumann 5-point -Laplacian."""
    H, W = fixed.shape
    n = H * W

    def second_difference(m):
        T = 2 * np.eye(m) - np.eye(m, k=1) - np.eye(m, k=-1)
        T[0, 0] = T[-1, -1] = 1
        return T

    L = np.kron(second_difference(H), np.eye(W)) + np.kron(np.eye(H), second_difference(W))
    L2 = np.kron(np.eye(2), L)
    yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    u = np.zeros((2, H, W))
    for _ in range(steps):
        warped = map_coordinates(moving, [yy + u[0], xx + u[1]], order=1, mode="nearest")
        g = np.stack(np.gradient(warped))
        r = warped - fixed
        A = lam * L2
        for i in range(2):
            for j in range(2):
                A[i * n:(i + 1) * n, j * n:(j + 1) * n] += np.diag((g[i] * g[j]).ravel())
        b = -(r * g).reshape(-1) - lam * L2 @ u.reshape(-1)
        u = u + np.linalg.solve(A, b).reshape(2, H, W)
    return u


def test_untrained_learngn_is_the_hand_crafted_gauss_newton():
    """Step 0 of training is exactly the hand-crafted Gauss-Newton (so training starts from it),
    with and without the flip symmetry."""
    pair = _pair(size=(10, 11))
    options = MethodOptions("learngn", iterations=3, lam=0.2, cg_tol=1e-12, cg_iterations=2000)
    expected = _dense_gauss_newton(pair.moving[0].numpy(), pair.fixed[0].numpy(), 0.2, 3)
    assert np.abs(expected).max() > 0.1
    for symmetric in (True, False):
        u = register_pair(LearnGNNet(2, symmetric=symmetric).double(), pair, options)
        np.testing.assert_allclose(u.numpy(), expected, atol=1e-8)


@pytest.mark.parametrize("dim, size", [(2, (9, 10)), (3, (5, 6, 7))])
def test_learngn_network_is_flip_equivariant(dim, size):
    """Flipping the image pair along an axis flips the predicted residual and gradient and negates
    the gradient's component along that axis (as for the exact Gauss-Newton system); without the
    symmetry a trained network need not be."""
    torch.manual_seed(1)
    warped, fixed = torch.rand(2, 1, *size, dtype=D), torch.rand(2, 1, *size, dtype=D)
    for symmetric in (True, False):
        net = LearnGNNet(dim, width=4, symmetric=symmetric).double()
        with torch.no_grad():
            net.head.weight.normal_()
            net.head.bias.normal_()
        with torch.no_grad():
            gradient, residual = net(warped, fixed)
        errors = []
        for axis in range(dim):
            with torch.no_grad():
                g, r = net(warped.flip(2 + axis), fixed.flip(2 + axis))
            g, r = g.flip(2 + axis), r.flip(2 + axis)
            g[:, axis] *= -1
            errors.append(max(float((g - gradient).abs().max()), float((r - residual).abs().max())))
        if symmetric:
            assert max(errors) < 1e-12
        else:
            assert min(errors) > 1e-3
