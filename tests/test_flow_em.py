"""EM on soft correspondences for flows (`model="resnet"`, `loss="sinkhorn"` on small shapes) and
the transport plan it follows (`losses.sinkhorn.transport_plan`)."""
import math

import numpy as np
import pytest
import torch

import shapeflow as sf
from shapeflow.deform import ResNetFlow
from shapeflow.errors import ShapeflowError
from shapeflow.losses import SinkhornLoss
from shapeflow.losses import sinkhorn
from shapeflow.losses.sinkhorn import target_potential, transport_plan
from shapeflow.pipelines.shape_flow_gn import _cell_weights, _rejoining
from shapeflow.pipelines import shape_flow_gn
from shapeflow.synthetic import smooth_deformation


def _curve(n=90, seed=0):
    """A closed 2D curve with five pointed arms, its points in order, and a smooth deformation of it.
    (On a curve without features, an ellipse with bumps, a fit by any distance between the point
    sets can slide along it: the EM and Adam then end at 0.03-0.07 of a 0.12-0.2 start.)"""
    t = torch.linspace(0, 2 * math.pi, n + 1, dtype=torch.float64)[:-1]
    wave = torch.cos(5 * t)
    r = 1 + 0.35 * wave.sign() * wave.abs().sqrt() + 0.1 * torch.sin(2 * t)
    source = torch.stack([r * torch.cos(t), 0.7 * r * torch.sin(t)], 1)
    return source, smooth_deformation(source, amplitude=0.05, seed=seed)


def _rmse(a, b):
    return float(np.sqrt(((np.asarray(a) - np.asarray(b)) ** 2).sum(1).mean()))


# --- the transport plan against a plain Sinkhorn in NumPy -------------------------------------

def _numpy_plan(x, y, blur, reach=None, iterations=20000, a=None, b=None):
    """Scaling Sinkhorn on the kernel `K = exp(-|x - y|^2 / 2 eps)`, float64, run long: the plan
    `(N, M)` `diag(u) K diag(v)`. Unbalanced (entropy relative to a (x) b, KL marginal penalties
    of weight rho = reach^2, as geomloss): `u = a (K v)^-lambda`, lambda = rho / (rho + eps).
    Weights `a`, `b`: uniform unless given."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    eps = blur ** 2
    power = 1.0 if reach is None else reach ** 2 / (reach ** 2 + eps)
    kernel = np.exp(-((x[:, None] - y[None]) ** 2).sum(-1) / (2 * eps))
    a = np.full(len(x), 1 / len(x)) if a is None else np.asarray(a, dtype=np.float64)
    b = np.full(len(y), 1 / len(y)) if b is None else np.asarray(b, dtype=np.float64)
    u, v = np.ones(len(x)), np.ones(len(y))
    for _ in range(iterations):
        u = a * (kernel @ v) ** -power
        v = b * (kernel.T @ u) ** -power
    return u[:, None] * kernel * v[None]


def _numpy_or_torch(monkeypatch, in_numpy, x, y):
    """Run small plans in NumPy (`losses._small_plan`) or as torch operations; check which."""
    if not in_numpy:
        monkeypatch.setattr(sinkhorn, "SMALL_PLAN_ENTRIES", 0)
    assert sinkhorn._small(x, y) == in_numpy


@pytest.mark.parametrize("in_numpy", [True, False])
@pytest.mark.parametrize("reach", [None, 0.5])
def test_the_transport_plan_matches_a_plain_sinkhorn(reach, in_numpy, monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, dtype=torch.float64, generator=g)
    y = torch.randn(55, 2, dtype=torch.float64, generator=g) * 0.8 + 0.3
    _numpy_or_torch(monkeypatch, in_numpy, x, y)
    blur = 0.5
    reference = _numpy_plan(x, y, blur, reach)
    plan = transport_plan(x, y, blur, reach, tol=1e-12, max_sweeps=5000)
    mass = reference.sum(1) * len(x)                                  # sum_j P_ij / a_i
    barycentres = reference @ y.numpy() / reference.sum(1)[:, None]
    np.testing.assert_allclose(plan.mass.numpy(), mass, rtol=1e-7)
    np.testing.assert_allclose(plan.barycentres.numpy(), barycentres, rtol=1e-7, atol=1e-9)
    spread = (reference * ((y.numpy()[None] - barycentres[:, None]) ** 2).sum(-1)).sum(1) / reference.sum(1)
    np.testing.assert_allclose(plan.spread.numpy(), spread, rtol=1e-6, atol=1e-10)
    cost = (reference * ((x.numpy()[:, None] - y.numpy()[None]) ** 2).sum(-1) / 2).sum()
    assert plan.cost == pytest.approx(cost, rel=1e-7)
    if reach is None:
        np.testing.assert_allclose(plan.mass.numpy(), 1.0, rtol=1e-8)  # balanced: every source point's mass
    else:
        assert float(plan.mass.max()) < 1.0                              # unbalanced: some is let go


@pytest.mark.parametrize("in_numpy", [True, False])
@pytest.mark.parametrize("reach", [None, 0.5])
def test_a_weighted_plan_matches_a_plain_sinkhorn(reach, in_numpy, monkeypatch):
    """Weights on both measures (the coarse levels' Voronoi shares): mass is still per unit of a_i,
    and the cost is the plan's."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(30, 2, dtype=torch.float64, generator=g)
    y = torch.randn(45, 2, dtype=torch.float64, generator=g) * 0.7 - 0.2
    _numpy_or_torch(monkeypatch, in_numpy, x, y)
    a = torch.rand(30, dtype=torch.float64, generator=g) + 0.1
    b = torch.rand(45, dtype=torch.float64, generator=g) + 0.1
    a, b = a / a.sum(), b / b.sum()
    reference = _numpy_plan(x, y, 0.5, reach, a=a.numpy(), b=b.numpy())
    plan = transport_plan(x, y, 0.5, reach, tol=1e-12, max_sweeps=5000, a=a, b=b)
    np.testing.assert_allclose(plan.mass.numpy(), reference.sum(1) / a.numpy(), rtol=1e-7)
    np.testing.assert_allclose(plan.barycentres.numpy(), reference @ y.numpy() / reference.sum(1)[:, None],
                               rtol=1e-7, atol=1e-9)
    cost = (reference * ((x.numpy()[:, None] - y.numpy()[None]) ** 2).sum(-1) / 2).sum()
    assert plan.cost == pytest.approx(cost, rel=1e-7)
    with pytest.raises(ShapeflowError, match="a has shape"):
        transport_plan(x, y, 0.5, reach, a=a[:-1])


@pytest.mark.parametrize("reach", [None, 0.5])
def test_the_target_potential_is_the_c_transform(reach):
    """g_j = -lambda eps log sum_i a_i exp((f_i - |x_i - y_j|^2 / 2) / eps), in NumPy."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(20, 3, dtype=torch.float64, generator=g), torch.randn(25, 3, dtype=torch.float64, generator=g)
    f = torch.randn(20, dtype=torch.float64, generator=g) * 0.1
    a = torch.rand(20, dtype=torch.float64, generator=g) + 0.5
    a = a / a.sum()
    blur = 0.7
    eps = blur ** 2
    power = 1.0 if reach is None else reach ** 2 / (reach ** 2 + eps)
    cost = ((x.numpy()[:, None] - y.numpy()[None]) ** 2).sum(-1) / 2                 # (20, 25)
    expected = -power * eps * np.log((a.numpy()[:, None] * np.exp((f.numpy()[:, None] - cost) / eps)).sum(0))
    np.testing.assert_allclose(target_potential(x, f, y, blur, reach, a).numpy(), expected, rtol=1e-10)


def test_cell_weights_are_the_shares_of_the_nearest_points():
    g = torch.Generator().manual_seed(6)
    points = torch.randn(200, 3, dtype=torch.float64, generator=g)
    sample = points[:17]
    nearest = torch.cdist(points, sample).argmin(1)
    expected = torch.bincount(nearest, minlength=17).double() / 200
    torch.testing.assert_close(_cell_weights(points, sample), expected)


def test_isolated_target_points_near_the_fitted_source_rejoin_once_cooled():
    """An isolated target point within EM_FAR source spacings of a moved source point is taken; one
    farther from all of them is not; the others always are."""
    x = torch.stack([torch.linspace(0, 1, 11, dtype=torch.float64), torch.zeros(11, dtype=torch.float64)], 1)
    y = torch.cat([x, torch.tensor([[1.2, 0.0], [0.5, 3.0]], dtype=torch.float64)])   # a tip, an outlier
    lonely = torch.zeros(13, dtype=torch.bool)
    lonely[11:] = True
    taken = _rejoining(y, lonely, x, x)                                     # spacing 0.1: 3 spacings = 0.3
    assert taken[:11].all() and bool(taken[11]) and not bool(taken[12])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reach", [None, 0.3])
def test_a_small_warm_plan_in_numpy_is_the_torch_plan(reach, dtype, monkeypatch):
    """The EM's case: a few sweeps from the last plan's potentials on moved points. NumPy and
    torch run the same sweeps, so they agree to rounding (float32: to its precision), sweep count
    included."""
    g = torch.Generator().manual_seed(7)
    x = torch.rand(91, 2, dtype=dtype, generator=g)
    y = x + 0.05 * torch.randn(91, 2, dtype=dtype, generator=g)
    start = transport_plan(x, y, 0.05, reach).potentials
    moved = x + 0.002 * torch.randn(91, 2, dtype=dtype, generator=g)
    assert sinkhorn._small(moved, y)
    numpy = transport_plan(moved, y, 0.05, reach, start=start, max_sweeps=3)
    monkeypatch.setattr(sinkhorn, "SMALL_PLAN_ENTRIES", 0)
    ops = transport_plan(moved, y, 0.05, reach, start=start, max_sweeps=3)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    assert numpy.sweeps == ops.sweeps == 3 and numpy.barycentres.dtype == dtype
    for got, want in ((numpy.barycentres, ops.barycentres), (numpy.mass, ops.mass),
                      (numpy.spread, ops.spread), (numpy.potentials[0], ops.potentials[0]),
                      (numpy.potentials[1], ops.potentials[1])):
        torch.testing.assert_close(got, want, **tol)
    assert numpy.cost == pytest.approx(ops.cost, rel=tol["rtol"])


def test_a_warm_start_ends_at_the_cold_plan():
    """The target potential of a plan at another blur, on moved source points, is only a start: the
    plan converges to the same one."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 3, dtype=torch.float64, generator=g)
    y = x + 0.1 * torch.randn(50, 3, dtype=torch.float64, generator=g)
    first = transport_plan(x + 0.2, y, 0.6, 0.8)
    cold = transport_plan(x, y, 0.3, 0.8, tol=1e-12, max_sweeps=5000)
    warm = transport_plan(x, y, 0.3, 0.8, start=first.potentials, tol=1e-12, max_sweeps=5000)
    torch.testing.assert_close(warm.barycentres, cold.barycentres, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(warm.mass, cold.mass, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("reach", [None, 0.2])
def test_a_plan_on_each_rows_nearest_candidates_matches_the_dense_plan(reach):
    """On the support of each row's k nearest target points, where the kernel is negligible beyond
    them, the plan (summaries, potentials) is the dense one to the last digits; with candidates too
    few for the blur it is the dense plan itself (and says so)."""
    from shapeflow.kernels.neighbors import PointIndex

    g = torch.Generator().manual_seed(3)
    x = torch.rand(400, 2, dtype=torch.float64, generator=g)
    y = x + 0.01 * torch.randn(400, 2, dtype=torch.float64, generator=g)
    blur = 0.01                          # points ~0.05 apart: a row's kernel spans a few neighbours
    start = transport_plan(x, y, blur, reach, tol=1e-12, max_sweeps=5000).potentials
    moved = x + 0.002 * torch.randn(400, 2, dtype=torch.float64, generator=g)
    dense = transport_plan(moved, y, blur, reach, start=start, tol=1e-12, max_sweeps=5000)
    support = PointIndex(y).query(moved, 32)[1]
    sparse = transport_plan(moved, y, blur, reach, start=start, tol=1e-12, max_sweeps=5000, support=support)
    assert sparse.sparse and not dense.sparse
    for got, want in ((sparse.barycentres, dense.barycentres), (sparse.mass, dense.mass),
                      (sparse.spread, dense.spread), (sparse.potentials[0], dense.potentials[0]),
                      (sparse.potentials[1], dense.potentials[1])):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-10)
    assert sparse.cost == pytest.approx(dense.cost, rel=1e-8)
    # four candidates at a blur of 0.1: the kernel is not negligible beyond them, so the plan is dense
    wide = transport_plan(moved, y, 0.1, reach, start=(start[0], start[1], 0.1), support=support[:, :4])
    assert not wide.sparse
    torch.testing.assert_close(wide.barycentres, transport_plan(moved, y, 0.1, reach, start=(start[0], start[1], 0.1)).barycentres)
    with pytest.raises(ShapeflowError, match="support"):
        transport_plan(moved, y, blur, reach, start=start, support=support[:10])


def test_the_em_fit_uses_the_candidates_once_cooled_with_the_same_result(monkeypatch):
    """Above `EM_SUPPORT_FROM` points the cooled plans run on each point's nearest candidates: the
    same fit as with dense plans throughout."""
    source, target = _curve(300)
    seen = []
    original = shape_flow_gn.transport_plan

    def spy(*args, **kwargs):
        plan = original(*args, **kwargs)
        seen.append(plan.sparse)
        return plan

    monkeypatch.setattr(shape_flow_gn, "transport_plan", spy)
    monkeypatch.setattr(shape_flow_gn, "EM_SUPPORT_FROM", 100)
    sparse = sf.register(source.numpy(), target.numpy(), progress=False, seed=0, em=True)
    assert any(seen)
    monkeypatch.setattr(shape_flow_gn, "EM_SUPPORT_FROM", 10**9)
    dense = sf.register(source.numpy(), target.numpy(), progress=False, seed=0, em=True)
    assert np.abs(sparse.warped - dense.warped).max() < 1e-4 * np.abs(dense.warped).max()


# --- the EM fit ------------------------------------------------------------------------------

def test_the_default_fits_a_small_curve_by_em_more_closely_than_adam():
    source, target = _curve()
    em = sf.register(source.numpy(), target.numpy(), progress=False, seed=0)
    adam = sf.register(source.numpy(), target.numpy(), progress=False, seed=0, em=False)
    assert {row["phase"] for row in em.history} == {"em"}
    assert {row["phase"] for row in adam.history} == {"adam"}
    before = _rmse(source, target)
    assert _rmse(em.warped, target) < 0.02 * before
    assert _rmse(em.warped, target) < _rmse(adam.warped, target)
    assert len(em.history) < len(adam.history)
    temperatures = [row["temperature"] for row in em.history]
    assert all(b <= a for a, b in zip(temperatures, temperatures[1:]))     # never rising
    assert temperatures[-1] == pytest.approx(0.02 ** 2)                      # cooled to the blur


def test_a_flow_of_the_same_model_is_recovered_from_unordered_points():
    """The target is the source moved by a ResNetFlow with the seed register uses (so some output
    weights map it exactly) and shuffled: the soft pairs find the permutation, and the fit the map,
    up to the entropic blur."""
    source, _ = _curve(80)
    truth = ResNetFlow(2, seed=0).double()
    with torch.no_grad():
        truth.W3.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        target = truth(source)
    order = torch.randperm(len(target), generator=torch.Generator().manual_seed(2))
    assert _rmse(source, target) > 0.05
    res = sf.register(source.numpy(), target[order].numpy(), progress=False, dtype="float64", seed=0,
                      normalize=False, blur=0.003, tol=1e-6)
    assert _rmse(res.warped, target) < 0.01 * _rmse(source, target)


def test_em_is_the_default_up_to_em_points_and_chosen_by_name_above(monkeypatch):
    monkeypatch.setattr(SinkhornLoss, "EM_POINTS", 50)
    monkeypatch.setattr(SinkhornLoss, "EM_CLEAN_POINTS", 50)
    source, target = _curve(60)
    default = sf.register(source.numpy(), target.numpy(), progress=False, seed=0, iterations=3)
    assert {row["phase"] for row in default.history} == {"adam"}
    chosen = sf.register(source.numpy(), target.numpy(), progress=False, seed=0, iterations=3, em=True)
    assert {row["phase"] for row in chosen.history} == {"em"}


def test_em_is_the_default_up_to_em_clean_points_unless_one_shape_has_more_isolated_points(monkeypatch):
    """Between EM_POINTS and EM_CLEAN_POINTS the default is EM when the shapes have about as many
    isolated points (none, or sparse tips on both); isolated points in one shape only (outliers)
    keep the Adam stages, which are more robust to them."""
    monkeypatch.setattr(SinkhornLoss, "EM_POINTS", 30)
    monkeypatch.setattr(SinkhornLoss, "EM_CLEAN_POINTS", 100)
    source, target = _curve(60)
    clean = sf.register(source.numpy(), target.numpy(), progress=False, seed=0, iterations=3)
    assert {row["phase"] for row in clean.history} == {"em"}
    far = torch.tensor([[3.0, 3.0], [-3.0, 2.5], [0.5, -3.5], [-2.5, -3.0]], dtype=torch.float64)
    noisy = sf.register(source.numpy(), torch.cat([target, far]).numpy(), progress=False, seed=0, iterations=3)
    assert {row["phase"] for row in noisy.history} == {"adam"}
    both = sf.register(torch.cat([source, far]).numpy(), torch.cat([target, far * 1.02]).numpy(), progress=False,
                       seed=0, iterations=3)
    assert {row["phase"] for row in both.history} == {"em"}
    larger, larger_target = _curve(120)
    above = sf.register(larger.numpy(), larger_target.numpy(), progress=False, seed=0, iterations=3)
    assert {row["phase"] for row in above.history} == {"adam"}


def test_coarse_levels_reach_the_single_level_fit(monkeypatch):
    """Above the M-step's rows the EM fit starts on 128 and 256 farthest points with subsampled plans
    and ends on every point; it ends about as close as the fit on every point from the start."""
    import shapeflow.pipelines.shape_flow_gn as gn
    source, target = _curve(600)
    levels = sf.register(source.numpy(), target.numpy(), progress=False, seed=0, em=True)
    sizes = [row["points"] for row in levels.history if row["phase"] == "em"]
    assert sizes[0] == 128 and 256 in sizes and sizes[-1] == 600 and sizes == sorted(sizes)
    monkeypatch.setattr(gn, "EM_LEVELS", ())
    single = sf.register(source.numpy(), target.numpy(), progress=False, seed=0, em=True)
    assert {row["points"] for row in single.history if row["phase"] == "em"} == {600}
    assert _rmse(levels.warped, target) < 0.03 * _rmse(source, target)
    assert _rmse(levels.warped, target) < 1.5 * _rmse(single.warped, target)


@pytest.mark.parametrize("option", [{"subsample": 100}, {"refine": None}, {"trim": 0.1}])
def test_the_adam_stage_options_keep_the_adam_stages(option):
    source, target = _curve(60)
    res = sf.register(source.numpy(), target.numpy(), progress=False, seed=0, iterations=3, **option)
    assert {row["phase"] for row in res.history} == {"adam"}
    with pytest.raises(ShapeflowError, match="em=True"):
        sf.register(source.numpy(), target.numpy(), progress=False, em=True, **option)


def test_em_for_another_model_or_with_adam_options_is_an_error():
    source, target = _curve(40)
    with pytest.raises(ShapeflowError, match="model 'lddmm'"):
        sf.register(source.numpy(), target.numpy(), model="lddmm", em=True, progress=False)
    with pytest.raises(ShapeflowError, match="lr applies to Adam"):
        sf.register(source.numpy(), target.numpy(), em=True, lr=0.01, progress=False)
    res = sf.register(source.numpy(), target.numpy(), lr=0.01, iterations=3, progress=False)
    assert {row["phase"] for row in res.history} == {"adam"}         # Adam's options: Adam, as before


def test_outliers_stay_out_of_the_hot_plan():
    """5 % outliers spread around the curve: with them in the plan while it is hot the map is pulled
    towards them; left out (isolated points), the fit stays close."""
    source, target = _curve(120)
    outliers = (torch.rand(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) - 0.5) * 4
    noisy = torch.cat([target, outliers]).numpy()
    res = sf.register(source.numpy(), noisy, progress=False, seed=0)
    assert {row["phase"] for row in res.history} == {"em"}
    assert _rmse(res.warped, target) < 0.1 * _rmse(source, target)


def test_landmarks_join_the_em_fit():
    """Landmarks are rows of each M-step: a heavy weight pulls them onto targets off the curve's fit."""
    source, target = _curve(60)
    marks = (source[:4].numpy(), (target[:4] + 0.05).numpy())
    heavy = sf.register(source.numpy(), target.numpy(), progress=False, seed=0, landmarks=marks, landmark_weight=100.0)
    light = sf.register(source.numpy(), target.numpy(), progress=False, seed=0, landmarks=marks, landmark_weight=1e-3)
    assert {row["phase"] for row in heavy.history} == {"em"}
    assert heavy.metrics["landmark_error"]["mean"] < 0.5 * light.metrics["landmark_error"]["mean"]


def test_ctrl_c_keeps_the_last_step(monkeypatch):
    import shapeflow.pipelines.shape_flow_gn as gn
    calls = []
    original = gn.transport_plan

    def interrupt(*args, **kwargs):       # two plans a step: the target's and the source's own
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(gn, "transport_plan", interrupt)
    source, target = _curve(60)
    res = sf.register(source.numpy(), target.numpy(), progress=False, seed=0)
    assert res.metrics["interrupted"]
    assert len(res.history) == 3
    assert _rmse(res.warped, target) < _rmse(source, target)


def test_the_fold_refit_runs_on_adams_stages():
    """`SinkhornLoss.more_robust` (the refit after a fold) sets em=False: the smaller reach is fitted
    by the Adam stages, as before the EM fit existed."""
    options, change = SinkhornLoss.more_robust(SinkhornLoss.Options(), set())
    assert options.em is False and change.startswith("reach=")
    assert SinkhornLoss.soft_pairs(options, torch.zeros(10, 2), torch.zeros(10, 2)) is None


def test_an_em_fit_that_squeezes_the_source_is_declined(monkeypatch):
    """An EM fit whose min det J at the source's points is below EM_SQUEEZE (a part missing from the
    target crushed into it, e.g. the airplane with 30 % cropped, `benchmarks/flow_em.py`) gives
    way to the Adam stages from the start: the history has both, the result is Adam's. Here the
    threshold is raised above any fit's, so every EM fit is declined."""
    monkeypatch.setattr(shape_flow_gn, "EM_SQUEEZE", 10.0)
    source, target = _curve(80)
    res = sf.register(source.numpy(), target.numpy(), progress=False, seed=0)
    declined = [row for row in res.history if row.get("declined")]
    assert len(declined) == 1 and declined[0]["min_jacobian_det"] < 10.0
    assert {row["phase"] for row in res.history} == {"em", "adam"}
    adam = sf.register(source.numpy(), target.numpy(), progress=False, seed=0, em=False)
    np.testing.assert_allclose(res.warped, adam.warped, rtol=0, atol=1e-6)


def test_a_long_fit_that_squeezes_is_declined_early(monkeypatch):
    """EM_CHECK_AFTER steps after the plan has cooled the fit checks its min det J (at its rows)
    every EM_CHECK_EVERY steps and stops as soon as it is below EM_SQUEEZE, instead of running on
    to convergence."""
    monkeypatch.setattr(shape_flow_gn, "EM_CHECK_AFTER", 1)
    source, target = _curve(80)
    normal = sf.register(source.numpy(), target.numpy(), progress=False, seed=0)
    assert not any(row.get("declined") for row in normal.history)
    full = [row for row in normal.history if row.get("phase") == "em"]
    monkeypatch.setattr(shape_flow_gn, "EM_SQUEEZE", 10.0)
    res = sf.register(source.numpy(), target.numpy(), progress=False, seed=0)
    early = [row for row in res.history if row.get("phase") == "em" and not row.get("declined")]
    assert any(row.get("declined") for row in res.history) and len(early) < len(full)
    assert early == full[:len(early)]            # the same fit, stopped at the first check


@pytest.mark.parametrize("seed", [1, 2])
def test_two_samplings_of_one_curve_give_a_smooth_map(seed):
    """Source and target are different samplings of the star (every other point, shifted by one),
    so the pairs stay noisy and nothing fixes a source point's place along the curve closer than
    about half the spacing. The ridge on the whole map keeps the EM fit at least as close to the
    deformation of the source's own points as the Adam stages (a ridge on the step alone chased
    the noise: 2x Adam's error on the fish's samplings, `EM_RIDGE`); pycpd ends at 0.03."""
    dense, moved = _curve(180, seed=seed)
    source, target, truth = dense[0::2], moved[1::2], moved[0::2]
    em = sf.register(source.numpy(), target.numpy(), progress=False, seed=0)
    adam = sf.register(source.numpy(), target.numpy(), progress=False, seed=0, em=False)
    assert {row["phase"] for row in em.history} == {"em"}
    assert _rmse(em.warped, truth) <= 1.05 * _rmse(adam.warped, truth)
    assert _rmse(em.warped, truth) < 0.4 * _rmse(source, truth)
