"""`Registry`: names to classes (or functions), with errors that list the valid names."""
from __future__ import annotations

from typing import Generic, Iterable, Mapping, TypeVar

from .errors import ShapeflowError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """A `dict` of name -> entry whose lookups fail with one line naming the valid names.

        MODELS = Registry("model", {"rigid": Rigid, ...})
        MODELS.lookup("rigid", "register()")  ->  Rigid
        MODELS.lookup("rigit", "register()")  ->  ShapeflowError: register(): unknown model 'rigit'; choose from rigid, ...
    """

    def __init__(self, what: str, entries: Mapping[str, T] | Iterable[tuple[str, T]] = ()):
        super().__init__(entries)
        self.what = what

    def lookup(self, name: str, who: str = "register()") -> T:
        """The entry called `name`, or a ShapeflowError from `who` listing the valid names."""
        if not isinstance(name, str) or name not in self:
            raise ShapeflowError(f"{who}: unknown {self.what} {name!r}; choose from {', '.join(self)}")
        return self[name]

    def add(self, name: str):
        """Decorator: `@REGISTRY.add("name")` registers the decorated class or function."""
        def decorate(entry: T) -> T:
            self[name] = entry
            return entry
        return decorate

    def where(self, **attributes) -> "Registry[T]":
        """The entries whose attributes equal `attributes` (e.g. `MODELS.where(linear=True)`)."""
        return Registry(self.what, {k: v for k, v in self.items()
                                    if all(getattr(v, a, None) == x for a, x in attributes.items())})
