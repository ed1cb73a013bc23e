import math

import numpy as np
import pytest
import torch

import shapeflow as sf
from shapeflow.deform import MODELS, Compose, Normalized, ResNetFlow


def random_flow(dim=3, scale=0.3, activation="relu", blocks=6, seed=0):
    flow = ResNetFlow(dim, blocks=blocks, width=16, activation=activation, seed=seed)
    with torch.no_grad():
        flow.W3.normal_(0, scale, generator=torch.Generator().manual_seed(seed))
    return flow


def test_a_new_flow_is_the_identity():
    x = torch.rand(20, 3)
    torch.testing.assert_close(ResNetFlow(3)(x), x)


def test_flow_follows_the_forward_euler_formula():
    flow = random_flow(dim=2, activation="tanh")
    x = torch.rand(10, 2)
    y = x.clone()
    for l in range(flow.blocks):
        h = torch.tanh(y @ flow.W1[l].T + flow.b1[l])
        h = torch.tanh(h @ flow.W2[l].T + flow.b2[l])
        y = y + (1 / flow.blocks) * h @ flow.W3[l].T
    torch.testing.assert_close(flow(x), y)


def test_kinetic_energy_formula():
    flow = random_flow()
    x = torch.rand(30, 3)
    expected, y = 0.0, x
    for l in range(flow.blocks):
        v = (y @ flow.W1[l].T + flow.b1[l]).relu() @ flow.W2[l].T + flow.b2[l]
        v = v.relu() @ flow.W3[l].T
        expected = expected + (1 / flow.blocks) * (v ** 2).sum(1).mean()
        y = y + v / flow.blocks
    torch.testing.assert_close(flow.energy(x), expected)
    moved, energy = flow.forward_with_energy(x)
    torch.testing.assert_close(energy, expected)
    torch.testing.assert_close(moved, y)


def test_energy_of_a_constant_velocity_flow_is_speed_squared():
    # W1 = 0 makes each hidden unit constant, so v is a constant vector: E = |v|^2 (integral over t in [0,1]).
    flow = ResNetFlow(3, blocks=4, width=8, activation="relu")
    with torch.no_grad():
        flow.W1.zero_()
        flow.b1.fill_(1.0)
        flow.W2.copy_(torch.eye(8).expand(4, 8, 8))
        flow.W3.zero_()
        flow.W3[:, 0, 0] = 2.0                       # v = (2, 0, 0)
    x = torch.rand(5, 3)
    torch.testing.assert_close(flow(x), x + torch.tensor([2.0, 0, 0]))
    torch.testing.assert_close(flow.energy(x), torch.tensor(4.0))


@pytest.mark.parametrize("steps", [6, 3, 13])
def test_trajectory_ends_at_the_map_and_is_piecewise_linear(steps):
    flow = random_flow()
    x = torch.rand(25, 3)
    path = flow.trajectory(x, steps)
    assert path.shape == (steps + 1, 25, 3)
    torch.testing.assert_close(path[0], x)
    torch.testing.assert_close(path[-1], flow(x))
    if steps == flow.blocks:  # the frames are exactly the block outputs
        xs, _ = flow.states(x)
        torch.testing.assert_close(path, torch.stack(xs))


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_inverse_undoes_the_flow(activation):
    flow = random_flow(activation=activation)
    x = torch.rand(200, 3, dtype=torch.float64)
    flow = flow.double()
    torch.testing.assert_close(flow.inverse(flow(x), tol=1e-12), x, atol=1e-9, rtol=0)


def test_inverse_reports_failure_instead_of_returning_garbage():
    flow = random_flow(scale=40.0, blocks=1)   # dt * Lip(v) >> 1: the fixed point iteration diverges
    with pytest.raises(sf.InverseError, match="did not converge"):
        flow.inverse(torch.rand(50, 3))


def test_smooth_flow_has_positive_jacobian_determinant():
    from shapeflow.metrics import jacobian_determinants

    flow = random_flow(activation="tanh", scale=0.5)
    dets = jacobian_determinants(flow, torch.rand(100, 3) * 2 - 1)
    assert dets.min() > 0


def rotation_3d(angles):
    rigid = sf.Rigid(3)
    with torch.no_grad():
        rigid.rotation_params.copy_(torch.tensor(angles))
    return rigid


def test_rigid_is_a_rotation_matching_rodrigues():
    axis_angle = torch.tensor([0.2, -0.4, 0.3], dtype=torch.float64)
    rigid = rotation_3d(axis_angle.tolist()).double()
    # Rodrigues: R = I + sin(a) K + (1 - cos(a)) K^2 for the unit axis k. Our parameters are minus
    # the upper triangle of the skew matrix: (S01, S02, S12) = -(p0, p1, p2) = (-w_z, w_y, -w_x).
    omega = torch.tensor([axis_angle[2], -axis_angle[1], axis_angle[0]])
    a = omega.norm()
    k = omega / a
    K = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]], dtype=torch.float64)
    R = torch.eye(3, dtype=torch.float64) + math.sin(a) * K + (1 - math.cos(a)) * K @ K
    torch.testing.assert_close(rigid.rotation, R)
    torch.testing.assert_close(rigid.rotation @ rigid.rotation.T, torch.eye(3, dtype=torch.float64))


def test_linear_models_invert_and_trajectory_ends_at_the_map():
    for name in ["rigid", "similarity", "affine"]:
        model = MODELS[name](2)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * torch.randn_like(p))
        x = torch.rand(10, 2)
        torch.testing.assert_close(model.inverse(model(x)), x, atol=1e-5, rtol=0)
        torch.testing.assert_close(model.trajectory(x, 5)[-1], model(x))
        torch.testing.assert_close(model.trajectory(x, 5)[0], x)


def test_similarity_exposes_rotation_translation_scale():
    sim = sf.Similarity(2)
    with torch.no_grad():
        sim.rotation_params.fill_(0.5)
        sim.log_scale.fill_(math.log(2.0))
        sim.translation.copy_(torch.tensor([1.0, -1.0]))
    x = torch.tensor([[1.0, 0.0]])
    expected = 2 * torch.tensor([[math.cos(0.5), math.sin(0.5)]]) + torch.tensor([1.0, -1.0])  # counter-clockwise
    torch.testing.assert_close(sim(x), expected)
    assert float(sim.scale) == pytest.approx(2.0)


def test_numpy_in_numpy_out():
    flow = random_flow()
    out = flow(np.random.rand(7, 3).astype(np.float32))
    assert isinstance(out, np.ndarray) and out.shape == (7, 3)


def test_save_and_load_round_trip_every_model(tmp_path):
    inner = Compose([sf.Affine(3), random_flow(activation="softplus")])
    with torch.no_grad():
        inner.parts[0].linear_part.add_(0.1 * torch.randn(3, 3))
    models = [sf.Rigid(3), sf.Similarity(2), random_flow(),
              Normalized(inner, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.0, 1.0]), 4.0)]
    for i, model in enumerate(models):
        path = model.save(tmp_path / f"model{i}.pt")
        loaded = sf.load_deformation(path)
        assert type(loaded) is type(model)
        x = torch.rand(20, model.dim)
        torch.testing.assert_close(loaded(x), model(x))


def test_load_refuses_files_that_are_not_deformations(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(sf.ShapeflowError, match="not a readable shapeflow deformation"):
        sf.load_deformation(bad)
    with pytest.raises(sf.ShapeflowError, match="no such deformation file"):
        sf.load_deformation(tmp_path / "missing.pt")


def test_normalized_trajectory_moves_from_source_to_target_frame():
    flow = random_flow()
    wrapped = Normalized(flow, torch.tensor([5.0, 0, 0]), torch.tensor([0.0, 5.0, 0]), 3.0)
    x = torch.rand(10, 3) + torch.tensor([5.0, 0, 0])
    path = wrapped.trajectory(x, 8)
    torch.testing.assert_close(path[0], x)
    torch.testing.assert_close(path[-1], wrapped(x))
    torch.testing.assert_close(wrapped.inverse(wrapped(x)), x, atol=1e-4, rtol=0)


def test_unknown_activation_lists_the_valid_ones():
    with pytest.raises(sf.ShapeflowError, match="relu, tanh, softplus, silu"):
        ResNetFlow(3, activation="gelu")


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_resnet_pass_matches_its_blocks_one_by_one(activation):
    """The fused pass (`states`: weights split once, addmm per layer) against the per-block
    `velocity` reference, in value and in gradient (float64)."""
    flow = ResNetFlow(2, blocks=5, width=8, activation=activation, seed=3).double()
    with torch.no_grad():
        flow.W3.normal_(0, 0.5, generator=torch.Generator().manual_seed(4))
    x = torch.randn(20, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def reference():
        y, energy = x, 0.0
        for block in range(flow.blocks):
            v = flow.velocity(block, y)
            energy = energy + flow.dt * v.square().sum(1).mean()
            y = y + flow.dt * v
        return y, energy

    outputs = []
    for run in (lambda: flow.forward_with_energy(x), reference):
        y, energy = run()
        grads = torch.autograd.grad(y.square().sum() + energy, list(flow.parameters()))
        outputs.append((y, energy, grads))
    (y0, e0, g0), (y1, e1, g1) = outputs
    torch.testing.assert_close(y0, y1)
    torch.testing.assert_close(e0, e1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("activation", ["relu", "tanh", "softplus", "silu"])
@pytest.mark.parametrize("dim", [2, 3])
def test_output_linearization_matches_autodiff(activation, dim):
    """`ResNetFlow.linearize`: the kernel J J^T, J^T s and J dW against the Jacobian in W3 from
    torch.func.jacrev, at a flow that is far from the identity."""
    from torch.func import functional_call, jacrev

    flow = ResNetFlow(dim, blocks=4, width=16, activation=activation, seed=1).double()
    with torch.no_grad():
        flow.W3.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    x = torch.randn(15, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    params = {k: v.detach() for k, v in flow.named_parameters()}
    J = jacrev(lambda w: functional_call(flow, {**params, "W3": w}, (x,)).reshape(-1))(params["W3"]).reshape(15 * dim, -1)
    lin = flow.linearize(x)
    s, change = torch.randn(15, dim, dtype=torch.float64), torch.randn_like(flow.W3)
    torch.testing.assert_close(lin.moved, flow(x).detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(lin.kernel(), J @ J.T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lin.pullback(s).reshape(-1), J.T @ s.reshape(-1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(lin.push(change).reshape(-1), J @ change.reshape(-1), rtol=1e-10, atol=1e-12)
