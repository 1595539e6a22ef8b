"""Command handlers and option choices that import their module only when needed.

Importing torch takes seconds. Most commands need it (they read tensors and Detector files),
but ``oodmon --version``, ``--help`` and the ``queue`` commands do not, and a labeller runs
those one item at a time. So the parser names each heavy handler as ``"module:function"`` and
reads choices such as the score names from their module when argparse first checks or prints
them: building the parser imports nothing heavy.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

__all__ = ["DeferredChoices", "deferred_handler"]

Handler = Callable[[argparse.Namespace], int]


def deferred_handler(target: str) -> Handler:
    """A handler for ``set_defaults(handler=...)`` that imports ``"module:function"`` on call."""
    module_name, _, function_name = target.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"Expected a handler as 'module:function', but got {target!r}.")

    def run(args: argparse.Namespace) -> int:
        handler: Handler = getattr(importlib.import_module(module_name), function_name)
        return handler(args)

    run.__qualname__ = run.__name__ = function_name
    return run


class DeferredChoices(Sequence[str]):
    """The names ``select(getattr(module, attribute))`` gives, read on first use."""

    def __init__(
        self,
        module: str,
        attribute: str,
        select: Callable[[Any], Sequence[str]] = lambda names: sorted(names),
    ) -> None:
        self._module = module
        self._attribute = attribute
        self._select = select
        self._names: tuple[str, ...] | None = None

    def _load(self) -> tuple[str, ...]:
        if self._names is None:
            names = getattr(importlib.import_module(self._module), self._attribute)
            self._names = tuple(self._select(names))
        return self._names

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...
    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return self._load()[index]

    def __len__(self) -> int:
        return len(self._load())

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __contains__(self, value: object) -> bool:
        return value in self._load()

    def __repr__(self) -> str:
        return f"DeferredChoices({self._module}.{self._attribute})"
