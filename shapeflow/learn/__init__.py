"""Learning through the solver core: differentiable Gauss-Newton layers (`layers.py`) and the
training data (`phantoms.py`: multi-modal label phantoms, pairs from a folder)."""
from .layers import gauss_newton_layer
from .phantoms import SPLITS, PairFolder, phantom_pair, split_seeds

__all__ = ["gauss_newton_layer", "phantom_pair", "PairFolder", "SPLITS", "split_seeds"]
