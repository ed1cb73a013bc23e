"""Learning through the solver core: differentiable Gauss-Newton layers (`layers.py`), the
training data (`phantoms.py`: multi-modal label phantoms, pairs from a folder), the training
methods (`methods.py`: SUITS, LearnGN, DIO) and the resumable training loop (`train.py`)."""
from .layers import gauss_newton_layer
from .phantoms import SPLITS, PairFolder, phantom_pair, split_seeds
from .layers import gauss_newton_system_layer, implicit_registration_layer  # training (issue 13)
from .methods import METHODS  # training (issue 13)
from .train import evaluate, load_checkpoint, load_config, train  # training (issue 13)

__all__ = ["gauss_newton_layer", "phantom_pair", "PairFolder", "SPLITS", "split_seeds"]
__all__ += ["gauss_newton_system_layer", "implicit_registration_layer", "METHODS", "train", "load_config",
            "load_checkpoint", "evaluate"]  # training (issue 13)
