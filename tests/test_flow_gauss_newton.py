"""The "output-gauss-newton" fitter: `model="resnet"` with corresponding points (`loss="l2"`)."""
import numpy as np
import pytest
import torch

import shapeflow as sf
from shapeflow.deform import ResNetFlow
from shapeflow.pipelines import shape_flow_gn
from shapeflow.synthetic import smooth_deformation


def _pair(n=120, dim=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(n, dim, dtype=torch.float64, generator=g)
    target = smooth_deformation(source, amplitude=0.05, seed=seed)
    return source.numpy(), target.numpy()


def _rmse(a, b):
    return float(np.sqrt(((np.asarray(a) - np.asarray(b)) ** 2).sum(1).mean()))


def test_a_flow_of_the_same_model_is_recovered_exactly():
    """The target is the source moved by a ResNetFlow with the seed register uses: its W1, W2, b
    are the fit's random features, so some W3 maps every point exactly (a closed-form reference:
    the generating flow). Unnormalised, so the fit sees these coordinates; it stops at `tol` on
    the RMS residual."""
    source = torch.randn(60, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    truth = ResNetFlow(2, seed=0).double()
    with torch.no_grad():
        truth.W3.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    target = truth(source).detach()
    assert _rmse(source, target) > 0.02
    res = sf.register(source.numpy(), target.numpy(), loss="l2", progress=False, dtype="float64", seed=0,
                      normalize=False, tol=1e-9)
    assert {row["phase"] for row in res.history} == {"gauss-newton"}
    assert _rmse(res.warped, target) < 1e-8
    assert len(res.history) <= shape_flow_gn.GN_ITERATIONS


def test_gauss_newton_beats_adam_on_a_smooth_deformation():
    """Against Adam (`lr` given: the Adam path) on the same pair: a much smaller error. The
    history says which fit ran."""
    source, target = _pair()
    gn = sf.register(source, target, loss="l2", progress=False, seed=0)
    adam = sf.register(source, target, loss="l2", progress=False, seed=0, lr=3e-2)
    assert {row["phase"] for row in adam.history} == {"adam"}
    assert {row["phase"] for row in gn.history} == {"gauss-newton"}
    assert _rmse(gn.warped, target) < 0.2 * _rmse(adam.warped, target)
    assert _rmse(gn.warped, target) < 0.01 * _rmse(source, target)
    assert gn.metrics["min_jacobian_det"] > 0


@pytest.mark.filterwarnings("ignore::shapeflow.errors.ShapeflowWarning")     # 5 steps: a poor fit
@pytest.mark.parametrize("option", [{"lr": 1e-2}, {"regularization": 1e-2}, {"lbfgs_iterations": 5}])
def test_adam_options_send_the_fit_to_adam(option):
    source, target = _pair(40)
    res = sf.register(source, target, loss="l2", progress=False, seed=0, iterations=5, **option)
    assert {row["phase"] for row in res.history} <= {"adam", "lbfgs"}


@pytest.mark.filterwarnings("ignore::shapeflow.errors.ShapeflowWarning")
def test_losses_without_correspondence_are_fitted_by_adam():
    source, target = _pair(40)
    res = sf.register(source, target, loss="chamfer", progress=False, seed=0, iterations=5)
    assert {row["phase"] for row in res.history} == {"adam"}


def test_a_large_cloud_is_fitted_on_a_bounded_subsample(monkeypatch):
    """At most GN_ROWS / d points enter the dense kernel; the map then moves all of them, and the
    error on all of them stays small (the flow is smooth)."""
    sizes = []
    original = ResNetFlow.linearize

    def spy(self, points):
        sizes.append(len(points))
        return original(self, points)

    monkeypatch.setattr(ResNetFlow, "linearize", spy)
    source, target = _pair(1500, dim=3)
    res = sf.register(source, target, loss="l2", progress=False, seed=0)
    assert sizes and max(sizes) == shape_flow_gn.GN_ROWS // 3
    assert _rmse(res.warped, target) < 0.05 * _rmse(source, target)


def test_landmarks_join_the_least_squares():
    """Landmarks are rows of the same least-squares problem: the history reports their term, and
    a heavy weight pulls them onto their targets."""
    source, target = _pair(80)
    marks = (source[:4], target[:4] + 0.05)
    res = sf.register(source, target, loss="l2", progress=False, seed=0, landmarks=marks, landmark_weight=100.0)
    assert "landmarks" in res.history[-1] and res.history[-1]["phase"] == "gauss-newton"
    light = sf.register(source, target, loss="l2", progress=False, seed=0, landmarks=marks, landmark_weight=1e-3)
    assert res.metrics["landmark_error"]["mean"] < light.metrics["landmark_error"]["mean"]


def test_ctrl_c_keeps_the_best_iterate(monkeypatch):
    source, target = _pair(60)
    calls = []
    original = ResNetFlow.linearize

    def interrupt(self, points):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, points)

    monkeypatch.setattr(ResNetFlow, "linearize", interrupt)
    res = sf.register(source, target, loss="l2", progress=False, seed=0)
    assert res.metrics["interrupted"]
    assert _rmse(res.warped, target) < 0.5 * _rmse(source, target)      # two accepted steps kept
