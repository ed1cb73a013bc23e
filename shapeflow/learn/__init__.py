"""Learning through the solver core: differentiable Gauss-Newton layers (`layers.py`)."""
from .layers import gauss_newton_layer

__all__ = ["gauss_newton_layer"]
