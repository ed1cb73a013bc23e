"""Feature networks (shapeflow.learn.features), their files, and `register(loss="learned")`."""
from __future__ import annotations

import json

import numpy as np

import pytest
import torch

import shapeflow as sf
from shapeflow.errors import ShapeflowError
from shapeflow.grids import Grid
from shapeflow.learn import (FEATURE_NETWORKS, LearnGNNet, SuitsNet, UNetFeatures, build_features, gauss_newton_layer,
                             load_features, mind_targets, phantom_pair, pretrain_mind, save_features)
from shapeflow.losses import mind_ssc


@pytest.mark.parametrize("dim, size", [(2, (19, 24)), (3, (9, 12, 10))])
def test_output_shapes_in_2d_and_3d(dim, size):
    image = torch.rand(2, 1, *size)
    assert set(FEATURE_NETWORKS) >= {"suits", "learngn", "unet"}
    for name in ("suits", "unet"):
        net = build_features(name, dim, width=4)
        assert net.dim == dim and json.loads(json.dumps(net.config()))["name"] == name
        for modality in (0, 1):
            with torch.no_grad():
                out = net(image, modality)
            assert out.shape == (2, 12, *size) and 0 < float(out.min()) and float(out.max()) < 1
        tiny = torch.rand(1, 1, *([2] * dim))            # a coarse level of a tiny image: 1 voxel after pooling
        assert net(tiny).shape == (1, 12, *([2] * dim))
    gradient, residual = build_features("learngn", dim, width=4)(image, torch.rand_like(image))
    assert gradient.shape == (2, dim, *size) and residual.shape == (2, 1, *size)


def test_untrained_learngn_gives_the_hand_crafted_gradient_and_residual():
    warped, fixed = torch.rand(1, 1, 8, 9, dtype=torch.float64), torch.rand(1, 1, 8, 9, dtype=torch.float64)
    gradient, residual = LearnGNNet(2).double()(warped, fixed, spacing=[1.0, 2.0])
    grid = Grid((8, 9), torch.tensor([1.0, 2.0], dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(gradient[0], sf.grids.spatial_gradient(warped[0], grid)[0])
    torch.testing.assert_close(residual, warped - fixed)


def test_bad_hyper_parameters_and_inputs_are_one_line_errors():
    for call, match in [(lambda: SuitsNet(4), "dim must be 2 or 3"), (lambda: UNetFeatures(2, width=0), "width"),
                        (lambda: build_features("vgg", 2), "unknown feature network 'vgg'; choose from"),
                        (lambda: SuitsNet(2)(torch.rand(1, 1, 8, 8), 2), "modality must be an int in 0..1"),
                        (lambda: SuitsNet(2)(torch.rand(1, 2, 8, 8)), r"image must be \(B, 1, S0, S1\)")]:
        with pytest.raises(ShapeflowError, match=match):
            call()


def test_mind_targets_are_mind_ssc_in_3d_and_several_dilations_in_2d():
    volume, image = torch.rand(1, 10, 11, 12), torch.rand(1, 20, 21)
    torch.testing.assert_close(mind_targets(volume, 12), mind_ssc(volume))
    expected = torch.cat([mind_ssc(image, dilation=k) for k in (2, 1, 3)])
    torch.testing.assert_close(mind_targets(image, 12), expected)
    torch.testing.assert_close(mind_targets(image, 6), expected[:6])


def test_pretrain_mind_lowers_its_loss():
    moving, fixed = phantom_pair(0, size=(32, 32))
    net = SuitsNet(2, width=8)
    losses = pretrain_mind(net, [moving.data, fixed.data], steps=20, lr=1e-2)
    # measured: 0.341 -> 0.192 (L1 to the MIND targets, whose values lie in (0, 1])
    assert len(losses) == 20 and losses[-1] < 0.7 * losses[0] and min(losses) == losses[-1], losses
    assert not net.training


@pytest.mark.parametrize("name", ["suits", "unet", "learngn"])
def test_save_load_round_trip_gives_identical_outputs(tmp_path, name):
    net = build_features(name, 2, width=4)
    for p in net.parameters():          # nonzero everywhere (LearnGN's head starts at zero)
        p.data.normal_(0, 0.3)
    path = save_features(tmp_path / "sub" / "model.pt", net, extra={"method": "suits", "steps": [1, 2]})
    loaded, info = load_features(path)
    assert type(loaded) is type(net) and info["config"] == net.config()
    assert info["extra"] == {"method": "suits", "steps": [1, 2]} and info["format"] == "shapeflow-features/1"
    x, y = torch.rand(1, 1, 12, 13), torch.rand(1, 1, 12, 13)
    net.eval()
    with torch.no_grad():
        a, b = (net(x, y), loaded(x, y)) if name == "learngn" else (net(x, 1), loaded(x, 1))
    for u, v in zip(a if name == "learngn" else [a], b if name == "learngn" else [b]):
        assert torch.equal(u, v)
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["model.pt"]     # no temporary file left
    with pytest.raises(ShapeflowError, match="extra .* not JSON-able"):
        save_features(tmp_path / "x.pt", net, extra={"f": object()})
    with pytest.raises(ShapeflowError, match="not a registered feature network"):
        save_features(tmp_path / "x.pt", torch.nn.Linear(2, 2))


def _payload(net, **changes):
    payload = {"format": "shapeflow-features/1", "network": json.dumps(net.config()), "extra": "{}",
               "state": net.state_dict()}
    payload.update(changes)
    return payload


def test_bad_model_files_are_one_line_errors_naming_the_file(tmp_path):
    net = SuitsNet(2, width=4)
    good = save_features(tmp_path / "good.pt", net)
    data = good.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.pt").write_bytes(b"\x00\x01not a torch file" * 50)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    torch.save(net, tmp_path / "pickled.pt")
    sf.DisplacementField(Grid((4, 4), torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                              torch.eye(2, dtype=torch.float64))).save(tmp_path / "deformation.pt")
    torch.save(_payload(net, format="shapeflow-features/9"), tmp_path / "version.pt")
    torch.save(_payload(net, network=json.dumps({**net.config(), "name": "vgg"})), tmp_path / "name.pt")
    torch.save(_payload(net, network=json.dumps({**net.config(), "width": 8})), tmp_path / "mismatch.pt")
    cases = {"missing.pt": "no such feature model file", "truncated.pt": "truncated or corrupt",
             "garbage.pt": "not a torch file", "foreign.pt": "not a shapeflow feature model",
             "pickled.pt": "not a shapeflow feature model", "deformation.pt": "a deformation file, not a feature model",
             "version.pt": "format version '9' is not supported", "name.pt": "unknown feature network 'vgg'",
             "mismatch.pt": "weights do not fit a suits network"}
    for name, match in cases.items():
        with pytest.raises(ShapeflowError, match=match) as caught:
            load_features(tmp_path / name)
        message = str(caught.value)
        assert "\n" not in message and message.startswith(str(tmp_path / name)), message


def _pair(seed=20000, size=(48, 48)):
    return phantom_pair(seed, size=size)


def test_learned_loss_registers_with_both_models_without_folding(tmp_path):
    torch.manual_seed(0)
    moving, fixed = _pair()
    net = SuitsNet(2, width=8)
    pretrain_mind(net, [moving.data, fixed.data], steps=3)
    path = save_features(tmp_path / "suits.pt", net)
    for model, features in (("displacement", net), ("svf", path)):
        result = sf.register(moving, fixed, model=model, loss="learned", features=features, progress=False,
                             prealign=None)
        assert result.metrics["jacobian_percent_negative"] == 0.0 and result.metrics["jacobian_min"] > 0
        finest = [row["data"] for row in result.history if row["stage"] == result.history[-1]["stage"]]
        assert finest[-1] <= finest[0]
        assert set(result.metrics["dice"]) == set(result.metrics["dice_before"])
    assert result.report()["options"]["features"] == str(path)      # the report stays JSON-able
    json.dumps(result.report())


def test_learned_loss_takes_landmarks_and_uses_one_modality_branch_per_image():
    moving, fixed = _pair(size=(32, 32))
    net = SuitsNet(2, width=4)
    points = torch.tensor([[10.0, 12.0], [20.0, 15.0], [16.0, 24.0]], dtype=torch.float64)
    result = sf.register(moving, fixed, model="svf", loss="learned", features=net, progress=False, prealign=None,
                         landmarks=(points, points), landmark_weight=1.0, modality_moving=1, modality_fixed=0)
    assert result.metrics["jacobian_percent_negative"] == 0.0 and "tre" in result.metrics
    assert result.options["modality_moving"] == 1 and result.options["features"] == "SuitsNet (in memory)"
    term = sf.losses.RESIDUALS["learned"](sf.losses.RESIDUALS["learned"].Options(features=net))
    image = torch.rand(1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(term.features(image, role="moving"), net(image[None], 0)[0])
        torch.testing.assert_close(term.features(image, role="fixed"), net(image[None], 1)[0])


def test_learned_loss_errors_name_the_file(tmp_path):
    moving, fixed = _pair(size=(16, 16))
    path = save_features(tmp_path / "flat.pt", SuitsNet(2, width=4))
    volume = sf.Image(torch.rand(1, 12, 12, 12))
    cases = [(dict(features=path), volume, f"{path}: the feature network is 2D but the images are 3D"),
             (dict(), moving, "loss='learned' needs features=PATH"),
             (dict(features=tmp_path / "none.pt"), moving, "none.pt: no such feature model file"),
             (dict(features=path, modality_fixed=2), moving, "modality_fixed=2 but .* has 2 modality branches"),
             (dict(features=save_features(tmp_path / "gn.pt", LearnGNNet(2))), moving, "is not a feature network")]
    for options, image, match in cases:
        with pytest.raises(ShapeflowError, match=match) as caught:
            sf.register(image, image if image is volume else fixed, loss="learned", progress=False, **options)
        assert "\n" not in str(caught.value)


def test_gradients_through_one_gauss_newton_step_match_finite_differences():
    """d(loss of the step on the net's features)/d(net parameters), by autograd and by central
    differences along random directions of all parameters at once (float64, tiny net and image)."""
    torch.manual_seed(1)
    net = SuitsNet(2, width=2, out_channels=3).double()
    grid = Grid((10, 9), torch.tensor([1.0, 1.2], dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                torch.eye(2, dtype=torch.float64))
    moving, fixed = torch.rand(1, 1, 10, 9, dtype=torch.float64), torch.rand(1, 1, 10, 9, dtype=torch.float64)
    weights = torch.randn(2, 10, 9, dtype=torch.float64)
    params = dict(net.named_parameters())

    def loss(values):
        out = torch.func.functional_call(net, values, (moving, 0))[0]
        ref = torch.func.functional_call(net, values, (fixed, 1))[0]
        du = gauss_newton_layer(out, ref, grid, 0.05, tol=1e-13, maxiter=2000)
        return (weights * du).sum()

    grads = torch.autograd.grad(loss(params), list(params.values()))
    assert all(g.abs().sum() > 0 for g in grads)
    eps = 1e-6
    for _ in range(3):
        direction = {k: torch.randn_like(v) for k, v in params.items()}
        with torch.no_grad():
            plus = loss({k: v + eps * direction[k] for k, v in params.items()})
            minus = loss({k: v - eps * direction[k] for k, v in params.items()})
        numeric = float(plus - minus) / (2 * eps)
        analytic = sum(float((g * direction[k]).sum()) for g, k in zip(grads, params))
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_the_shipped_model_loads_and_registers_a_held_out_phantom():
    """assets/models/suits2d.pt (trained by `shapeflow train assets/models/suits2d.toml`) loads from
    its path after install and beats the identity on a test-split multi-modal phantom, no folding."""
    from pathlib import Path

    from shapeflow.learn import load_features, phantom_pair, split_seeds

    path = Path(__file__).resolve().parents[1] / "assets" / "models" / "suits2d.pt"
    assert path.stat().st_size < 5 * 2 ** 20
    net, info = load_features(path)
    assert net.dim == 2 and info["config"]["name"] == "suits" and "method" in info["extra"]
    moving, fixed = phantom_pair(split_seeds("test", 1)[0])
    result = sf.register(moving, fixed, loss="learned", features=str(path), regularization=0.1, prealign=None,
                         progress=False)
    fg = lambda dice: float(np.mean([v for k, v in dice.items() if k > 0]))
    assert fg(result.metrics["dice"]) > fg(result.metrics["dice_before"]) + 0.05
    assert result.metrics["jacobian_percent_negative"] == 0.0
