"""NumPy in, NumPy out for every public method of every deformation; tensors in keep autograd;
parameter read-outs and `energy()` are detached (the rule lives in `shapeflow/deform/base.py`)."""
import json
import math
import warnings

import numpy as np
import pytest
import torch

import shapeflow as sf
from shapeflow.deform import (DEFORMATIONS, Affine, Compose, DisplacementField, KernelLDDMM, NeuralODEFlow,
                              Normalized, PointDisplacement, ResNetFlow, Rigid, Similarity,
                              StationaryVelocityField)
from shapeflow.grids import Grid

DIM = 2
LINEAR_READOUTS = ["rotation", "translation", "scale", "matrix"]


def _randomize(model, scale, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def _flow(seed=0):
    flow = ResNetFlow(DIM, blocks=4, width=8, activation="tanh", seed=seed)
    with torch.no_grad():
        flow.W3.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    flow.reference_points = torch.rand(30, DIM, generator=torch.Generator().manual_seed(seed + 1))
    return flow


def _node(seed=0):
    flow = NeuralODEFlow(DIM, width=8, depth=1, activation="tanh", time_steps=10, seed=seed)
    with torch.no_grad():
        flow.field.weights[-1].normal_(0, 0.1, generator=torch.Generator().manual_seed(seed))
    flow.reference_points = torch.rand(30, DIM, generator=torch.Generator().manual_seed(seed + 1))
    return flow


def _lddmm(seed=0):
    model = KernelLDDMM(DIM, kernel_width=2.0, time_steps=4, control_points=8)
    model.prepare(torch.as_tensor(points(20, seed=seed + 5)))  # control points among the test points' box
    with torch.no_grad():
        model.p0.normal_(0, 0.3, generator=torch.Generator().manual_seed(seed))
    return model


def _grid():
    return Grid((9, 10), torch.tensor([1.0, 1.2], dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                torch.eye(2, dtype=torch.float64))


def _grid_model(cls):
    model = cls(_grid(), stride=2)
    with torch.no_grad():  # small, smooth: the fixed-point inverse converges
        model.control.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    return model


def _point_field():
    model = PointDisplacement(DIM)
    model.prepare(torch.as_tensor(points(40, seed=7)))      # a cloud covering the test points' box
    with torch.no_grad():   # a small smooth field: the fixed-point inverse converges
        x = model.reference_points
        model.displacements.copy_(0.1 * torch.stack([torch.sin(x[:, 1]), torch.cos(x[:, 0])], 1))
    return model


# name -> (builder, read-outs to check, inverse: "grad" (differentiable), "nograd" (iterative,
# computed without autograd, as before) or None (raises NotImplementedError), has its own energy)
CASES = {
    "Rigid": (lambda: _randomize(Rigid(DIM), 0.3), LINEAR_READOUTS, "grad", False),
    "Similarity": (lambda: _randomize(Similarity(DIM), 0.3), LINEAR_READOUTS, "grad", False),
    "Affine": (lambda: _randomize(Affine(DIM), 0.2), LINEAR_READOUTS + ["linear_part"], "grad", False),
    "ResNetFlow": (_flow, ["reference_points"], "nograd", True),
    "NeuralODEFlow": (_node, ["reference_points"], "grad", True),
    "KernelLDDMM": (_lddmm, ["momenta", "q0"], "grad", True),
    "DisplacementField": (lambda: _grid_model(DisplacementField), [], "nograd", True),
    "StationaryVelocityField": (lambda: _grid_model(StationaryVelocityField), [], "grad", True),
    "PointDisplacement": (_point_field, ["reference_points"], "nograd", True),
    "Compose": (lambda: Compose([_randomize(Similarity(DIM), 0.2), _flow(1)]), [], "nograd", True),
    "Normalized": (lambda: Normalized(_flow(2), torch.tensor([1.0, 2.0]), torch.tensor([-1.0, 0.5]), 3.0),
                   [], "nograd", True),
}

NAMES = sorted(DEFORMATIONS)


def build(name, dtype=torch.float32):
    if name not in CASES:
        pytest.fail(f"deformation {name!r} is registered but tests/test_deform_numpy.py has no case for it")
    make, readouts, inverse, has_energy = CASES[name]
    model = make().to(dtype)
    assert type(model).__name__ == name
    return model, readouts, inverse, has_energy


def points(n=12, dtype=np.float64, seed=0):
    """Points inside the grid models' grid, `(n, DIM)`."""
    return (1.0 + 5.0 * np.random.default_rng(seed).random((n, DIM))).astype(dtype)


def test_every_registered_deformation_has_a_case():
    assert set(DEFORMATIONS) <= set(CASES), f"no test case for {sorted(set(DEFORMATIONS) - set(CASES))}"


def _methods(model, inverse):
    out = {"call": lambda x: model(x), "trajectory": lambda x: model.trajectory(x, 5),
           "energy": lambda x: model.energy(x)}
    if inverse is not None:
        out["inverse"] = lambda x: model.inverse(model(x))
    return out


def _shape(method, n):
    return {"call": (n, DIM), "inverse": (n, DIM), "trajectory": (6, n, DIM), "energy": ()}[method]


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("array_dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", NAMES)
def test_arrays_in_give_arrays_out_with_the_tensor_paths_values(name, array_dtype, model_dtype):
    model, _, inverse, _ = build(name, model_dtype)
    x = points(dtype=array_dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if torch.float32 in (model_dtype, torch.from_numpy(x).dtype) else \
        dict(atol=1e-10, rtol=1e-10)
    for method, fn in _methods(model, inverse).items():
        out = fn(x)
        assert isinstance(out, np.ndarray), (name, method, type(out))
        assert out.dtype == array_dtype, (name, method, out.dtype)
        assert out.shape == _shape(method, len(x)), (name, method, out.shape)
        expected = fn(torch.as_tensor(x, dtype=model_dtype)).detach().numpy()
        np.testing.assert_allclose(out, expected.astype(array_dtype), **tol, err_msg=f"{name}.{method}")


@pytest.mark.parametrize("name", NAMES)
def test_inverse_undoes_the_map_for_arrays_or_is_explicitly_missing(name):
    model, _, inverse, _ = build(name, torch.float64)
    x = points()
    if inverse is None:
        with pytest.raises(NotImplementedError):
            model.inverse(x)
        return
    # exp(-v) inverts exp(v) up to the interpolation error of the grid
    atol = 5e-3 if name == "StationaryVelocityField" else 1e-5
    np.testing.assert_allclose(model.inverse(model(x)), x, atol=atol)


@pytest.mark.parametrize("name", NAMES)
def test_tensors_in_keep_autograd(name):
    model, _, inverse, has_energy = build(name)
    x = torch.as_tensor(points(), dtype=torch.float32)
    checks = {"call": model(x), "trajectory": model.trajectory(x, 4)}
    if has_energy:
        checks["energy"] = model.energy(x)
    if inverse == "grad":
        checks["inverse"] = model.inverse(x)
    elif inverse == "nograd":  # iterative inverses are computed without autograd, as before
        assert isinstance(model.inverse(model(x)), torch.Tensor)
    for method, out in checks.items():
        assert isinstance(out, torch.Tensor) and out.requires_grad, (name, method)
        model.zero_grad()
        out.sum().backward()
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and any(float(g.abs().sum()) > 0 for g in grads), (name, method)


@pytest.mark.parametrize("name", NAMES)
def test_read_outs_and_energy_without_points_are_detached(name):
    model, readouts, _, _ = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for attr in readouts:
            value = getattr(model, attr)
            assert isinstance(value, torch.Tensor) and not value.requires_grad, (name, attr)
            assert np.isfinite(np.asarray(value)).all()
        energy = model.energy()
        assert isinstance(energy, torch.Tensor) and energy.ndim == 0 and not energy.requires_grad
        assert math.isfinite(float(energy))
    # fitting still sees the parameters: Adam on parameters() moves the map
    x = torch.as_tensor(points(), dtype=torch.float32)
    before = model(x).detach()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    (model(x) - before - 1.0).pow(2).sum().backward()
    opt.step()
    assert not torch.allclose(model(x).detach(), before)


def test_linear_read_outs_are_the_map():
    for cls in (Rigid, Similarity, Affine):
        model = build(cls.__name__, torch.float64)[0]
        x = points()
        expected = x @ np.asarray(model.matrix).T + np.asarray(model.translation)
        np.testing.assert_allclose(model(x), expected, atol=1e-12)
        R = np.asarray(model.rotation)
        np.testing.assert_allclose(R @ R.T, np.eye(DIM), atol=1e-12)
        if cls is not Affine:
            np.testing.assert_allclose(np.asarray(model.matrix), float(model.scale) * R, atol=1e-12)
        else:
            np.testing.assert_allclose(np.asarray(model.linear_part), np.asarray(model.matrix))
            assert float(model.scale) == pytest.approx(abs(np.linalg.det(np.asarray(model.matrix))) ** 0.5)


def test_state_dict_keys_are_unchanged_and_old_files_load(tmp_path):
    assert list(Rigid(2).state_dict()) == ["rotation_params", "translation"]
    assert list(Similarity(2).state_dict()) == ["rotation_params", "translation", "log_scale"]
    assert list(Affine(2).state_dict()) == ["linear_part", "translation"]
    # a file as written before read-outs were detached: a nested state dict, by hand
    A, t = torch.tensor([[1.5, 0.2], [-0.1, 0.8]]), torch.tensor([3.0, -2.0])
    state = {"inner.parts.0.linear_part": A, "inner.parts.0.translation": t,
             "inner.parts.1.rotation_params": torch.tensor([0.4]), "inner.parts.1.translation": torch.zeros(2),
             "inner.parts.1.log_scale": torch.tensor(math.log(2.0)),
             "source_center": torch.tensor([1.0, 1.0]), "target_center": torch.tensor([0.0, 2.0])}
    tree = {"type": "Normalized", "config": {"scale": 2.0, "inner": {"type": "Compose", "config": {"parts": [
        {"type": "Affine", "config": {"dim": 2}}, {"type": "Similarity", "config": {"dim": 2}}]}}}}
    path = tmp_path / "deformation.pt"
    torch.save({"format": "shapeflow-deformation/1", "model": json.dumps(tree), "state": state}, path)
    model = sf.load_deformation(path)
    np.testing.assert_allclose(np.asarray(model.inner.parts[0].linear_part), A.numpy())
    np.testing.assert_allclose(np.asarray(model.inner.parts[0].translation), t.numpy())
    assert float(model.inner.parts[1].scale) == pytest.approx(2.0)
    x = points(dtype=np.float32)
    c = np.cos(0.4), np.sin(0.4)
    inner = 2.0 * ((x - 1.0) / 2.0 @ A.numpy().T + t.numpy()) @ np.array([[c[0], -c[1]], [c[1], c[0]]]).T
    np.testing.assert_allclose(model(x), 2.0 * inner + np.array([0.0, 2.0]), rtol=1e-5, atol=1e-4)
    # and a round trip keeps the keys
    again = sf.load_deformation(model.save(tmp_path / "again.pt"))
    assert sorted(again.state_dict()) == sorted(state)


def test_bad_points_name_the_argument():
    model = build("Rigid")[0]
    with pytest.raises(sf.ShapeflowError, match=r"points must have shape \(N, 2\)"):
        model(np.zeros((4, 3)))
    with pytest.raises(sf.ShapeflowError, match="points must be a NumPy array or a torch tensor"):
        model.trajectory([[0.0, 1.0]])
    with pytest.raises(sf.ShapeflowError, match="points must hold real numbers"):
        model.inverse(np.zeros((4, 2), dtype=complex))


def test_integer_arrays_come_back_as_float64():
    out = build("Rigid")[0](np.arange(8).reshape(4, 2))
    assert out.dtype == np.float64


def test_other_public_point_methods_follow_the_rule():
    flow = _flow()
    x = points(dtype=np.float32)
    moved, energy = flow.forward_with_energy(x)
    assert isinstance(moved, np.ndarray) and moved.dtype == np.float32 and energy.shape == ()
    xs, vs = flow.states(x)
    assert all(isinstance(a, np.ndarray) and a.shape == x.shape for a in xs + vs)
    assert isinstance(flow.velocity(0, x), np.ndarray)
    wrapped = Normalized(flow, torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.0]), 2.0)
    np.testing.assert_allclose(wrapped.to_inner(x), (x - [1.0, 2.0]) / 2.0, rtol=1e-6)


def test_rigid_fit_of_arrays_reads_out_as_arrays(assets):
    contour = sf.read(assets / "horse_contour.csv").points.float().numpy()[::4]
    angle, t = 0.45, np.array([-20.0, 35.0], dtype=np.float32)
    R = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]], dtype=np.float32)
    r = sf.register(contour, contour @ R.T + t, model="rigid", loss="l2", iterations=30, progress=False)
    phi = r.deformation
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(np.asarray(phi.rotation), R, atol=1e-3)
        np.testing.assert_allclose(np.asarray(phi.translation), t, atol=0.5)
        np.testing.assert_allclose(np.asarray(phi.scale), 1.0)
        np.testing.assert_allclose(np.asarray(phi.matrix), R, atol=1e-3)
        assert float(phi.energy()) == 0.0
        path = phi.trajectory(contour, 10)
        assert isinstance(path, np.ndarray) and path.shape == (11, *contour.shape) and path.dtype == np.float32
        np.testing.assert_allclose(path[-1], phi(contour), atol=1e-3)
        back = phi.inverse(phi(contour))
        assert isinstance(back, np.ndarray) and back.dtype == np.float32
        np.testing.assert_allclose(back, contour, atol=1e-2)
