"""Exceptions raised on bad input. Each message is one line naming the file or argument."""


class ShapeflowError(ValueError):
    """Bad input or an impossible request; the message says which file or argument and why."""


class InverseError(RuntimeError):
    """A deformation could not be inverted to the requested tolerance."""


class ShapeflowWarning(UserWarning):
    """A result to doubt: e.g. a registration whose fit is poor (`metrics["poor_fit"]`)."""
