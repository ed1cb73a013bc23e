"""Training through the solver: config checks, loss going down, resume = straight, checkpoints, CLI."""
import importlib
import json

import pytest
import torch
from typer.testing import CliRunner

from shapeflow.errors import ShapeflowError
from shapeflow.learn import METHODS, build_features, load_config, train
from shapeflow.learn.methods import MethodOptions, as_pair
from shapeflow.learn.phantoms import phantom_pair

training = importlib.import_module("shapeflow.learn.train")


#: tiny hyper-parameters of each network, so a step takes a fraction of a second at 32 x 32
TINY = {"suits": {"width": 4, "out_channels": 4}, "unet": {"width": 4, "out_channels": 4, "depth": 1},
        "learngn": {"width": 6, "layers": 2}}


def config(method="suits", network="suits", steps=4, **train):
    return {
        "data": {"size": [32, 32], "train": 2, "validation": 1, "test": 1, "amplitude": 0.08},
        "network": {"name": network, **TINY[network]},
        "method": {"name": method, "iterations": [2, 3], "lam": 0.1, "cg_iterations": 40},
        "train": {"steps": steps, "batch": 2, "lr": 3e-3, "seed": 3, "validate_every": 2, "checkpoint_every": 2,
                  **train},
    }


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("change, message", [
    (lambda c: c["train"].update(epochs=3), r"\[train\]: unknown key 'epochs'; valid keys: steps, batch"),
    (lambda c: c["method"].update(name="voxelmorph"), r"unknown method 'voxelmorph'; choose from suits, learngn, dio"),
    (lambda c: c.pop("method"), r"missing section \[method\]"),
    (lambda c: c.update(optimiser={}), r"unknown section \[optimiser\]; valid sections: data, network, method, train"),
    (lambda c: c["method"].update(iterations=[4, 2]), r"\[method\] iterations"),
    (lambda c: c["network"].update(name="learngn"), r"method 'suits' trains a feature network"),
    (lambda c: c["data"].update(size=[32]), r"\[data\] size"),
])
def test_bad_configs_give_one_line_errors(change, message):
    bad = config()
    change(bad)
    with pytest.raises(ShapeflowError, match=message) as info:
        load_config(bad)
    assert "\n" not in str(info.value)


def test_toml_config_is_read_and_checked(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[data]\nsize = [32, 32]\n[network]\nname = "suits"\n[method]\nname = "dio"\n'
                    'backward = "jfb"\n[train]\nsteps = 1\n')
    loaded = load_config(path)
    assert loaded["method"]["backward"] == "jfb" and loaded["method"]["iterations"] == [1, 6]
    path.write_text("[data\nsize = 3")
    with pytest.raises(ShapeflowError, match="not valid TOML"):
        load_config(path)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("method, network, lr", [("suits", "suits", 1e-2), ("learngn", "learngn", 1e-2),
                                                 ("dio", "unet", 1e-2)])
def test_a_few_steps_lower_the_loss_on_a_fixed_pair(method, network, lr):
    torch.manual_seed(0)
    net = build_features(network, 2, **TINY[network])
    pair = as_pair(*phantom_pair(4, (32, 32), amplitude=0.08))
    options = MethodOptions(name=method, iterations=(3, 3), lam=0.1, cg_iterations=40, backward="ift")
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for _ in range(8):
        loss, metrics = METHODS[method](net, [pair], options)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(metrics["loss"])
    assert sum(losses[-3:]) / 3 < losses[0] - 0.02, losses


def _weights(path):
    return torch.load(path / "checkpoint.pt", weights_only=True)["weights"]


def test_resume_after_ctrl_c_equals_straight_training(tmp_path, monkeypatch):
    straight = train(config(steps=6), tmp_path / "straight", progress=False)
    assert straight["test"]["pairs"] == 1 and len(straight["validation"]) == 3
    assert sorted(straight["files"]) == ["checkpoint.pt", "curve.png", "model.pt", "report.json"]

    calls = {"n": 0}
    original = METHODS["suits"]

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setitem(METHODS, "suits", interrupted)
    stopped = train(config(steps=6), tmp_path / "resumed", progress=False)
    assert stopped["interrupted"] and stopped["step"] == 3
    monkeypatch.setitem(METHODS, "suits", original)
    resumed = train(config(steps=6), tmp_path / "resumed", progress=False)
    for name, value in _weights(tmp_path / "straight").items():
        assert torch.equal(value, _weights(tmp_path / "resumed")[name]), name
    assert resumed["validation"] == straight["validation"]

    train(config(steps=3), tmp_path / "extended", progress=False)         # 3 steps, then 3 more
    train(config(steps=6), tmp_path / "extended", progress=False)
    for name, value in _weights(tmp_path / "straight").items():
        assert torch.equal(value, _weights(tmp_path / "extended")[name]), name


def test_foreign_or_corrupt_checkpoint_gives_one_line_error(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ShapeflowError, match="not a readable training checkpoint") as info:
        train(config(steps=1), out, progress=False)
    assert "\n" not in str(info.value)
    torch.save({"weights": {}}, out / "checkpoint.pt")
    with pytest.raises(ShapeflowError, match="not a shapeflow training checkpoint"):
        train(config(steps=1), out, progress=False)
    torch.save({"format": "shapeflow-train-checkpoint/1", "step": ShapeflowError("x")}, out / "checkpoint.pt")
    with pytest.raises(ShapeflowError, match="refusing to unpickle"):
        train(config(steps=1), out, progress=False)
    train(config(steps=1), out, resume=False, progress=False)              # starting afresh replaces it
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])            # cut short
    with pytest.raises(ShapeflowError, match="not a readable training checkpoint") as info:
        train(config(steps=2), out, progress=False)
    assert "\n" not in str(info.value)


def test_a_start_model_of_the_wrong_dimension_is_a_one_line_error(tmp_path):
    from shapeflow.learn import save_features

    path = save_features(tmp_path / "gn3d.pt", build_features("learngn", 3, **TINY["learngn"]))
    c = config("learngn", "learngn", steps=1)
    c["network"]["init"] = str(path)
    with pytest.raises(ShapeflowError, match=r"\[network\] init: .*gn3d.pt holds a LearnGNNet .*'dim': 3") as info:
        train(c, tmp_path / "run", progress=False)
    assert "\n" not in str(info.value)


def test_resuming_with_another_config_is_refused(tmp_path):
    train(config(steps=0), tmp_path, progress=False)
    changed = config(steps=1)
    changed["method"]["lam"] = 0.2
    with pytest.raises(ShapeflowError, match=r"another config \(method.lam: 0.1 then, 0.2 now\)"):
        train(changed, tmp_path, progress=False)


def test_cli_trains_a_two_step_config(tmp_path):
    from shapeflow_cli.main import app

    path = tmp_path / "run.toml"
    path.write_text('[data]\nsize = [32, 32]\ntrain = 2\nvalidation = 1\ntest = 1\n'
                    '[network]\nname = "suits"\nwidth = 4\nout_channels = 4\n'
                    '[method]\nname = "suits"\niterations = [1, 2]\ncg_iterations = 30\n'
                    '[train]\nsteps = 2\nbatch = 1\nvalidate_every = 0\n')
    run = CliRunner().invoke(app, ["train", str(path), "-o", str(tmp_path / "run")])
    assert run.exit_code == 0, run.output
    assert "trained suits for 2 steps" in run.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["steps"] == 2 and report["test"]["pairs"] == 1
    path.write_text('[data]\n[network]\nname = "suits"\n[method]\nname = "suits"\nlam = -1\n[train]\n')
    run = CliRunner().invoke(app, ["train", str(path), "-o", str(tmp_path / "bad")])
    assert run.exit_code == 2 and "[method] lam" in run.output and len(run.output.strip().splitlines()) == 1


def test_a_diverging_training_stops_at_the_last_good_state(tmp_path, monkeypatch):
    """The method's loss turns NaN at the 4th step: training stops before applying it, the
    checkpoint holds the 3 good steps' weights (equal to a straight 3-step run's), and the result
    says diverged."""
    straight = train(config(steps=3), tmp_path / "straight", progress=False)
    assert not straight.get("diverged")
    calls = {"n": 0}
    original = METHODS["suits"]

    def failing(*args, **kwargs):
        calls["n"] += 1
        loss, metrics = original(*args, **kwargs)
        return (loss * float("nan") if calls["n"] == 4 else loss), metrics

    monkeypatch.setitem(METHODS, "suits", failing)
    stopped = train(config(steps=6), tmp_path / "diverged", progress=False)
    assert stopped["diverged"] and stopped["step"] == 3
    weights = _weights(tmp_path / "diverged")
    assert all(bool(torch.isfinite(v).all()) for v in weights.values())
    for name, value in _weights(tmp_path / "straight").items():
        assert torch.equal(value, weights[name]), name
