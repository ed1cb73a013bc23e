"""Learning through the solver core: differentiable Gauss-Newton layers (`layers.py`), the
training data (`phantoms.py`: multi-modal label phantoms, pairs from a folder) and the networks
(`features.py`: SUITS features, LearnGN's gradient/residual CNN, a DIO UNet; saved and loaded
with `save_features` / `load_features`, used at inference by `register(loss="learned")`), the
training methods (`methods.py`: SUITS, LearnGN, DIO) and the resumable training loop (`train.py`)."""
from .features import (FEATURE_NETWORKS, LearnGNNet, SuitsNet, UNetFeatures, build_features, load_features,
                       mind_targets, pretrain_mind, save_features)
from .layers import gauss_newton_layer
from .phantoms import SPLITS, PairFolder, phantom_pair, split_seeds
from .layers import gauss_newton_system_layer, implicit_registration_layer  # training (issue 13)
from .methods import METHODS  # training (issue 13)
from .train import evaluate, load_checkpoint, load_config, train  # training (issue 13)

__all__ = ["gauss_newton_layer", "phantom_pair", "PairFolder", "SPLITS", "split_seeds",
           "FEATURE_NETWORKS", "SuitsNet", "UNetFeatures", "LearnGNNet", "build_features", "pretrain_mind",
           "mind_targets", "save_features", "load_features"]
__all__ += ["gauss_newton_system_layer", "implicit_registration_layer", "METHODS", "train", "load_config",
            "load_checkpoint", "evaluate"]  # training (issue 13)
