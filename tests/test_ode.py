"""NeuralODEFlow (`model="node"`): closed forms, the inverse, adjoint against direct gradients,
save/load, and known deformations recovered through `register` and the CLI."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import shapeflow as sf
from shapeflow.deform import MODELS, NeuralODEFlow
from shapeflow.synthetic import smooth_deformation

ASSETS = Path(__file__).resolve().parents[1] / "assets"
FIXED = ["euler", "midpoint", "rk4"]


def _points(n=40, dim=3, seed=3):
    return torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _flow(scale=0.3, seed=0, **kwargs):
    """A non-trivial flow: the zero-initialised last layer drawn at random, float64."""
    options = dict(width=16, activation="tanh") | kwargs
    flow = NeuralODEFlow(options.pop("dim", 3), seed=seed, **options).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        flow.field.weights[-1].copy_(scale * torch.randn(flow.field.weights[-1].shape, generator=gen))
        flow.field.biases[-1].copy_(scale * torch.randn(flow.field.biases[-1].shape, generator=gen))
    return flow


def _constant(c, **kwargs):
    """The field v(x, t) = c: every weight zero, the last bias c."""
    flow = NeuralODEFlow(len(c), **kwargs).double()
    with torch.no_grad():
        for p in flow.parameters():
            p.zero_()
        flow.field.biases[-1].copy_(torch.as_tensor(c))
    return flow


def test_a_new_flow_is_the_identity_and_seeded():
    x = _points()
    flow = NeuralODEFlow(3, seed=4).double()
    for out in (flow(x), flow.inverse(x), *flow.trajectory(x, 4)):
        torch.testing.assert_close(out, x, atol=0, rtol=0)
    assert float(flow.energy(x.numpy())) == 0.0
    same, other = NeuralODEFlow(3, seed=4), NeuralODEFlow(3, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(NeuralODEFlow(3, seed=4).parameters(), same.parameters()))
    assert not torch.equal(same.field.weights[0], other.field.weights[0])
    assert MODELS["node"] is NeuralODEFlow


@pytest.mark.parametrize("solver", FIXED + ["dopri5"])
def test_a_constant_field_translates_with_energy_its_squared_norm(solver):
    c = torch.tensor([0.3, -1.2, 0.5], dtype=torch.float64)
    flow = _constant(c, solver=solver, time_steps=7)
    x = _points()
    moved, energy = flow.forward_with_energy(x.numpy())
    moved = torch.as_tensor(moved)
    torch.testing.assert_close(moved, x + c, atol=1e-12, rtol=0)
    assert float(energy) == pytest.approx(float(c @ c), rel=1e-12)
    assert float(flow.energy(x).detach()) == pytest.approx(float(c @ c), rel=1e-12)
    torch.testing.assert_close(flow.inverse(moved), x, atol=1e-12, rtol=0)
    path = flow.trajectory(x, 4)
    torch.testing.assert_close(path, x + torch.linspace(0, 1, 5, dtype=torch.float64)[:, None, None] * c)


def test_euler_energy_is_the_sum_over_the_steps_of_the_augmented_state():
    """The energy integrated with the points equals the hand-written Euler sums."""
    flow = _flow(solver="euler", time_steps=5)
    x = _points()
    h, xs, energy = 0.2, x, 0.0
    for k in range(5):
        v = flow.field(torch.tensor(k * h, dtype=torch.float64), xs)
        energy = energy + h * v.square().sum(1).mean()
        xs = xs + h * v
    moved, e = flow.forward_with_energy(x)
    torch.testing.assert_close(moved, xs)
    torch.testing.assert_close(e, energy)


def test_rk4_inverse_undoes_a_nontrivial_flow():
    # a random flow far rougher than a fitted one: rk4 in 10 steps (in the default 5 its inverse is
    # off by 5e-4 of the diagonal here; on a flow fitted to fsaverage 1k it is 6e-8 in 5 steps)
    flow = _flow(scale=0.5, time_steps=10)
    x = _points(200)
    y = flow(x).detach()
    diagonal = float((x.max(0).values - x.min(0).values).norm())
    assert float((y - x).norm(dim=1).max()) > 0.1 * diagonal          # it moves the points
    error = float((flow.inverse(y) - x).norm(dim=1).max().detach())
    assert error < 1e-4 * diagonal, error


@pytest.mark.parametrize("solver", FIXED + ["dopri5"])
def test_trajectory_nodes_are_solver_nodes(solver):
    flow = _flow(solver=solver, time_steps=10)
    x = _points()
    path = flow.trajectory(x, 5)                                    # 5 divides 10: exact
    assert path.shape == (6, *x.shape)
    torch.testing.assert_close(path[0], x, atol=0, rtol=0)
    torch.testing.assert_close(path[-1], flow(x), atol=1e-6 if solver == "dopri5" else 1e-12, rtol=0)
    finer = flow.trajectory(x, 10)
    torch.testing.assert_close(finer[::2], path, atol=1e-6 if solver == "dopri5" else 1e-12, rtol=0)
    if solver == "rk4":                                             # 3 does not: a finer grid
        torch.testing.assert_close(flow.trajectory(x, 3)[-1], flow(x), atol=1e-4, rtol=0)


def _gradients(flow, x):
    x = x.clone().requires_grad_(True)
    moved, energy = flow.forward_with_energy(x)
    loss = moved.sin().sum() + energy
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, [x, *flow.parameters()])])


@pytest.mark.parametrize("solver, options", [("dopri5", {"rtol": 1e-10, "atol": 1e-10}),
                                             ("rk4", {"time_steps": 40})])
def test_adjoint_and_direct_gradients_agree(solver, options):
    """Both differentiate the same ODE; with fixed steps the adjoint solve differs from the exact
    derivative of the discrete map by the solver's error, hence the finer grid for rk4."""
    x = _points()
    direct = _gradients(_flow(solver=solver, **options), x)
    adjoint = _gradients(_flow(solver=solver, adjoint=True, **options), x)
    assert float((adjoint - direct).norm() / direct.norm()) < 1e-5


def test_gradcheck_of_the_map_and_its_energy():
    flow = _flow(width=4, depth=1, time_steps=3)
    x = _points(5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: tuple(flow.forward_with_energy(p)), (x,))

    class Both(torch.nn.Module):           # forward_with_energy as a module call, for functional_call
        def __init__(self):
            super().__init__()
            self.flow = flow

        def forward(self, points):
            return tuple(self.flow.forward_with_energy(points))

    names = [f"flow.{name}" for name, _ in flow.named_parameters()]

    def of_params(*values):
        return torch.func.functional_call(Both(), dict(zip(names, values)), (x.detach(),))

    values = tuple(p.detach().clone().requires_grad_(True) for p in flow.parameters())
    assert torch.autograd.gradcheck(of_params, values)


def test_save_and_load_round_trip(tmp_path):
    flow = _flow(solver="midpoint", time_steps=6, depth=3, activation="silu").float()   # files load as float32
    flow.prepare(_points(30).float())
    loaded = sf.load_deformation(flow.save(tmp_path / "node.pt"))
    assert isinstance(loaded, NeuralODEFlow) and loaded.config() == flow.config()
    x = _points(seed=7).float()
    torch.testing.assert_close(loaded(x), flow(x), atol=0, rtol=0)
    torch.testing.assert_close(loaded.energy(), flow.energy(), atol=0, rtol=0)
    torch.testing.assert_close(loaded.reference_points, flow.reference_points)


def test_energy_without_points_uses_the_prepared_points():
    flow = _flow()
    with pytest.raises(sf.ShapeflowError, match="no points given and no reference points"):
        flow.energy()
    x = _points(50)
    flow.prepare(x)
    assert float(flow.energy()) == pytest.approx(float(flow.energy(x.numpy())))


@pytest.mark.parametrize("kwargs, message", [
    ({"solver": "rk45"}, "unknown solver 'rk45'; choose from euler, midpoint, rk4, dopri5"),
    ({"activation": "relu"}, "unknown activation 'relu'; choose from softplus, tanh, silu"),
    ({"time_steps": 0}, "time_steps must be a positive integer, got 0"),
    ({"width": 2.5}, "width must be a positive integer"),
    ({"rtol": -1.0}, "rtol must be a positive number"),
    ({"adjoint": "yes"}, "adjoint must be True or False"),
])
def test_bad_options_name_the_argument(kwargs, message):
    with pytest.raises(sf.ShapeflowError, match=message):
        NeuralODEFlow(3, **kwargs)
    with pytest.raises(sf.ShapeflowError, match=message):
        sf.register(np.random.rand(20, 3), np.random.rand(20, 3), model="node", progress=False, **kwargs)


def _diagonal(points):
    return float((points.max(0).values - points.min(0).values).norm())


def test_register_recovers_a_smooth_deformation_of_the_shipped_contour(assets):
    contour = sf.read(assets / "horse_contour.csv").points.float()
    target = smooth_deformation(contour, amplitude=0.04, seed=1)
    result = sf.register(contour.numpy(), target.numpy(), model="node", progress=False, iterations=40, time_steps=5)
    rmse = float((torch.as_tensor(result.warped) - target).pow(2).sum(1).mean().sqrt())
    before = float((contour - target).pow(2).sum(1).mean().sqrt())
    assert rmse < 0.01 * _diagonal(target), (rmse, before)       # 0.65% (2.0% before)
    assert rmse < 0.5 * before
    assert result.metrics["min_jacobian_det"] > 0
    assert isinstance(result.deformation.inner, NeuralODEFlow)


def test_register_recovers_a_smooth_deformation_of_the_shipped_mesh(ant):
    target = sf.Mesh(smooth_deformation(ant.points, amplitude=0.04, seed=1), faces=ant.faces)
    result = sf.register(ant, target, model="node", progress=False, iterations=30, time_steps=5)
    m = result.metrics
    before = float((target.points - ant.points).pow(2).sum(1).mean().sqrt())
    assert m["rmse"] < 0.01 * _diagonal(target.points), (m["rmse"], before)     # 0.55% (5.1% before)
    assert m["rmse"] < 0.2 * before
    assert m["min_jacobian_det"] > 0
    assert m["flipped_triangles_percent"] == 0.0
    # the inverse brings the warped mesh back
    back = result.deformation.inverse(result.warped.points)
    assert float((back - ant.points).norm(dim=1).max().detach()) < 1e-3 * _diagonal(ant.points)


def test_cli_registers_and_warps_with_a_node_flow(tmp_path):
    def shapeflow(*args):
        return subprocess.run([sys.executable, "-m", "shapeflow_cli.main", *map(str, args)], capture_output=True,
                              text=True, env={**os.environ, "COLUMNS": "120"})

    source, target = ASSETS / "ant.ply", tmp_path / "bent.ply"
    mesh = sf.read(source)
    sf.write(sf.Mesh(smooth_deformation(mesh.points, amplitude=0.03, seed=2), faces=mesh.faces), target)
    out = tmp_path / "out"
    run = shapeflow("register", source, target, "-o", out, "--model", "node", "--loss", "chamfer",
                    "--iterations", "10")
    assert run.returncode == 0, run.stderr
    warped = tmp_path / "w.ply"
    run = shapeflow("warp", out / "deformation.pt", source, "-o", warped)
    assert run.returncode == 0, run.stderr
    np.testing.assert_allclose(sf.read(warped).points.numpy(), sf.read(out / "warped.ply").points.numpy(), atol=1e-4)
    assert isinstance(sf.load_deformation(out / "deformation.pt").inner, NeuralODEFlow)


@pytest.mark.parametrize("options", [{"adjoint": True}, {"solver": "dopri5"}])
def test_register_passes_the_options_to_the_flow(options):
    x = np.random.default_rng(0).random((30, 2))
    result = sf.register(x, x + 0.1 * np.sin(3 * x[:, ::-1]), model="node", loss="chamfer", iterations=3,
                         width=16, progress=False, **options)
    flow = result.deformation.inner
    assert isinstance(flow, NeuralODEFlow) and flow.width == 16
    assert all(flow.config()[k] == v for k, v in options.items()) and result.options["width"] == 16
    assert result.metrics["chamfer"] < result.metrics["chamfer_before"]
