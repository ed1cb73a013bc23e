"""`shapeflow train` under torchrun (data parallel, gloo on the CPU): the same loss curve and
weights as one process with the same global batch and seed (shapeflow/learn/train.py)."""
import subprocess
import sys

import pytest
import torch

from shapeflow.errors import ShapeflowError
from shapeflow.learn import train
from shapeflow.learn.features import load_features
from shapeflow.learn.methods import as_pair
from shapeflow.learn.phantoms import phantom_pair
from shapeflow.learn.train import load_checkpoint

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not built")

CONFIG = """
[data]
size = [16, 16]
train = 2
validation = 0
test = 0
amplitude = 0.08
[network]
name = "suits"
width = 4
out_channels = 4
[method]
name = "suits"
iterations = [1, 2]
lam = 0.1
cg_iterations = 10
[train]
steps = 3
batch = 2
lr = 3e-3
seed = 3
validate_every = 0
checkpoint_every = 2
"""

#: stated tolerance: float32 sums taken in another order (per process, then all-reduced)
RTOL = 1e-4


def test_two_processes_follow_the_one_process_loss_curve(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text(CONFIG)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "shapeflow_cli.main", "train", str(config), "-o", str(tmp_path / "ddp"), "-q"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    train(config, tmp_path / "one", progress=False)
    one, ddp = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in ("one", "ddp"))
    assert [r["step"] for r in ddp["history"]] == [1, 2, 3]
    assert [r["k"] for r in ddp["history"]] == [r["k"] for r in one["history"]]
    for key in ("loss", "dice"):
        assert [r[key] for r in ddp["history"]] == pytest.approx([r[key] for r in one["history"]], rel=RTOL)
    # the curve moved (a test that cannot pass by training nothing)
    assert one["history"][0]["loss"] != one["history"][-1]["loss"]
    # the trained networks compute the same features (compared on their outputs: a conv bias
    # followed by a normalisation has a zero gradient, whose rounding noise Adam turns into
    # different but irrelevant values)
    net_one, _ = load_features(tmp_path / "one" / "model.pt")
    net_ddp, _ = load_features(tmp_path / "ddp" / "model.pt")
    moving, fixed = phantom_pair(12345, (16, 16), "multi", 0.08)
    pair = as_pair(moving, fixed)
    with torch.no_grad():
        for image, modality in ((pair.moving, pair.modalities[0]), (pair.fixed, pair.modalities[1])):
            a, b = net_one(image[None], modality), net_ddp(image[None], modality)
            torch.testing.assert_close(b, a, rtol=RTOL, atol=RTOL * float(a.abs().max()))
    initial = load_features(tmp_path / "one" / "model.pt")[0]
    initial.load_state_dict(one["initial"])
    with torch.no_grad():
        assert not torch.allclose(initial(pair.moving[None], pair.modalities[0]),
                                  net_one(pair.moving[None], pair.modalities[0]), rtol=RTOL)


def test_batch_must_split_over_the_processes(tmp_path, monkeypatch):
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        monkeypatch.setattr(dist, "get_world_size", lambda: 3)
        with pytest.raises(ShapeflowError, match="batch: 2 pairs do not split over 3 processes"):
            train(CONFIG_DICT(), tmp_path / "out", progress=False)
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


def CONFIG_DICT():
    import tomllib

    return tomllib.loads(CONFIG)
