"""A new model or loss is one class plus one registry entry: the pipelines need no change."""
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn

import shapeflow as sf
from shapeflow.deform import MODELS, Deformation
from shapeflow.losses import LOSSES, PointLoss


class Translation(Deformation):
    """x -> x + t, with an option of its own (a fixed scale of the step, to check options flow)."""

    @dataclass
    class Options:
        step_scale: float = 1.0

    def __init__(self, dim: int = 2, step_scale: float = 1.0):
        super().__init__()
        self.dim, self.step_scale = dim, step_scale
        self.t = nn.Parameter(torch.zeros(dim))

    @classmethod
    def build(cls, domain, options=None, seed=0):
        return cls(domain, (options or cls.Options()).step_scale)

    def config(self):
        return {"dim": self.dim, "step_scale": self.step_scale}

    def forward(self, points):
        return points + self.step_scale * self.t


class MeanMatch(PointLoss):
    """|mean(source) - mean(target)|^2: a toy data term without correspondence."""

    name = "meanmatch"

    def forward(self, source, target):
        return (source.mean(0) - target.mean(0)).pow(2).sum()


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(MODELS, "translation", Translation)
    monkeypatch.setitem(LOSSES, "meanmatch", MeanMatch)


def test_a_new_model_and_loss_register_through_the_unchanged_pipeline(registered):
    rng = np.random.default_rng(0)
    source = rng.random((50, 2))
    target = source + [0.3, -0.2]
    result = sf.register(source, target, model="translation", loss="meanmatch", step_scale=0.5, iterations=300,
                         lr=0.05, progress=False)
    np.testing.assert_allclose(result.warped, target, atol=1e-3)
    assert result.options["step_scale"] == 0.5 and result.options["loss"] == "meanmatch"
    with pytest.raises(sf.ShapeflowError, match="option 'step_scale' applies to model 'translation', not to model 'rigid'"):
        sf.register(source, target, model="rigid", step_scale=0.5, progress=False)
    with pytest.raises(sf.ShapeflowError, match="choose from rigid, similarity, affine, resnet, node, lddmm, displacement, translation"):
        sf.register(source, target, model="shift", progress=False)
