"""Training methods behind one interface (:class:`plmetric.methods.base.Method`), and their registry.

One module per method; adding a method is one new module and one line in :data:`REGISTRY`
(plus an options dataclass in :mod:`plmetric.options` and its config section, if it has
options). The config's validation and the command line's ``--method`` choices read the registry.
Importing this package is cheap: a method's module is imported when it is first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plmetric.methods.base import Method

__all__ = ["REGISTRY", "get_method", "method_names"]

# name -> "module:class". The order is the order of tables and --help.
REGISTRY: dict[str, str] = {
    "none": "plmetric.methods.none:NoTraining",
    "plm": "plmetric.methods.plm:PLMMethod",
    "stml": "plmetric.methods.stml:STMLMethod",
    "supervised": "plmetric.methods.supervised:SupervisedMethod",
}


def method_names() -> tuple[str, ...]:
    """The registered method names."""
    return tuple(REGISTRY)


def get_method(name: str) -> type[Method]:
    """The :class:`~plmetric.methods.base.Method` subclass registered as ``name``.

    Raises:
        ValueError: no method of that name (the message lists the registered ones).
    """
    if name not in REGISTRY:
        raise ValueError(f"train.method must be one of {', '.join(REGISTRY)}, got '{name}'")
    module, _, attribute = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), attribute)
