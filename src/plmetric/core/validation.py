"""The one home of argument validation: every check raises ``ValueError`` naming the argument.

Shape/dtype/option checks always run. Checks that read tensor *values* (finiteness, index ranges)
cost a host-device synchronisation each; a training loop that checks its loss on the device turns
them off for a block with :func:`value_checks`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from numbers import Integral, Real
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "check_bool",
    "check_scale",
    "check_choice",
    "check_embeddings",
    "check_int",
    "check_number",
    "value_checks",
    "value_checks_enabled",
]

_VALUE_CHECKS = True


@contextlib.contextmanager
def value_checks(enabled: bool) -> Iterator[None]:
    """Turn the checks that read tensor values (finiteness, index ranges) on or off in a block."""
    global _VALUE_CHECKS
    previous, _VALUE_CHECKS = _VALUE_CHECKS, bool(enabled)
    try:
        yield
    finally:
        _VALUE_CHECKS = previous


def value_checks_enabled() -> bool:
    """Whether :func:`value_checks` currently allows value checks."""
    return _VALUE_CHECKS


def check_int(name: str, value: Any, minimum: int | None = None, *, where: str = "") -> int:
    """``value`` as an int; ``ValueError("{where}{name} must be an integer >= {minimum}, ...")`` otherwise.

    Booleans are not integers here.
    """
    if isinstance(value, bool) or not isinstance(value, Integral) or (minimum is not None and value < minimum):
        bound = f" >= {minimum}" if minimum is not None else ""
        raise ValueError(f"{where}{name} must be an integer{bound}, got {value!r}")
    return int(value)


def check_number(name: str, value: Any, minimum: float = 0.0, *, strict: bool = False, where: str = "") -> float:
    """``value`` as a finite float ``>= minimum`` (``> minimum`` when ``strict``), else ``ValueError``."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        ok = float(value) > minimum if strict else float(value) >= minimum
    if not ok:
        raise ValueError(f"{where}{name} must be a finite number {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return float(value)


def check_choice(name: str, value: Any, choices: Iterable[Any], *, where: str = "") -> Any:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    choices = tuple(choices)
    if value not in choices:
        names = [str(c) for c in choices]
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise ValueError(f"{where}{name} must be {listed}, got {value!r}")
    return value


def check_bool(name: str, value: Any, *, where: str = "") -> bool:
    """``value`` if it is a bool, else ``ValueError``."""
    if not isinstance(value, bool):
        raise ValueError(f"{where}{name} must be true or false, got {value!r}")
    return value


def check_embeddings(x: Any, name: str, *, min_rows: int = 1) -> Tensor:
    """``x`` if it is a floating (N, d) tensor with N >= ``min_rows`` and d >= 1, finite (when value
    checks are on); ``ValueError`` naming ``name`` otherwise."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor (N, d), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got dtype {x.dtype}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name}: expected at least {min_rows} rows, got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name}: expected at least one column, got shape {tuple(x.shape)}")
    if _VALUE_CHECKS and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return x


def check_scale(name: str, value: float | Tensor) -> float | Tensor:
    """A finite scale >= 0: a number, or a tensor of them (a tensor's values are read only when
    value checks are on: reading them costs a host-device synchronisation)."""
    if isinstance(value, Tensor):
        if _VALUE_CHECKS and (not bool(torch.isfinite(value).all()) or bool((value < 0).any())):
            raise ValueError(f"{name}: expected finite values >= 0")
        return value
    return check_number(name, value)
