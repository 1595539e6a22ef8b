"""Package attributes imported on first access (PEP 562), so a light import stays light.

``import oodmon`` would otherwise import torch (seconds) before anything runs, even for a
command that only reads the label queue. A package lists which module holds each public name;
the first ``oodmon.Monitor`` (or ``from oodmon import Monitor``) imports that module, and the
value is cached in the package, so later lookups cost nothing. Submodules load the same way
on first access (``oodmon.scores`` after ``import oodmon``), as they would be bound in an
eagerly imported package.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, homes: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, whose names live in ``homes``.

    Args:
        package: the package's ``__name__``.
        homes: public name -> the module that defines it.
        namespace: the package's ``globals()``, where a loaded name is cached.
    """

    def __getattr__(name: str) -> Any:
        home = homes.get(name)
        if home is None:
            # a submodule, as an eager package would have it bound: ``oodmon.scores.msp``
            # after a plain ``import oodmon`` (importing it binds it in the namespace)
            if not name.startswith("_") and importlib.util.find_spec(f"{package}.{name}"):
                return importlib.import_module(f"{package}.{name}")
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(home), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(homes))

    return __getattr__, __dir__
