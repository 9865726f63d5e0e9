"""Training methods behind one interface (:class:`plmetric.methods.base.Method`), and their registry.

One module per method, each with the loss terms it uses (:mod:`plmetric.methods.losses`); the
registry :data:`REGISTRY` (name -> ``"module:class"``) is defined beside the methods' options in
:mod:`plmetric.core.options`, so that the config (a lower layer) can check ``train.method`` without
importing any method. Adding a method is one new module here and one line in that registry (plus an
options dataclass and its config section, if it has options). Importing this package is cheap: a
method's module is imported when it is first used.

May import: :mod:`plmetric.core`, :mod:`plmetric.manifold`, :mod:`plmetric.data`,
:mod:`plmetric.evaluation`, :mod:`plmetric.config`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from plmetric.core.options import METHOD_REGISTRY as REGISTRY
from plmetric.core.options import method_names

if TYPE_CHECKING:
    from plmetric.methods.base import Method

__all__ = ["REGISTRY", "get_method", "method_names"]


def get_method(name: str) -> type[Method]:
    """The :class:`~plmetric.methods.base.Method` subclass registered as ``name``.

    Raises:
        ValueError: no method of that name (the message lists the registered ones).
    """
    if name not in REGISTRY:
        raise ValueError(f"train.method must be one of {', '.join(REGISTRY)}, got '{name}'")
    module, _, attribute = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), attribute)
