"""The one home of argument validation: every check raises ``ValueError`` naming the argument.

Shape/dtype/option checks always run. Checks that read tensor *values* (finiteness, index ranges)
cost a host-device synchronisation each; a training loop that checks its loss on the device turns
them off for a block with :func:`value_checks`.

Importing this module is cheap: torch is imported by the tensor checks that need it, so that the
option classes and the command line's argument types (``plmetric --help``) never load it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "check_bool",
    "check_scale",
    "check_choice",
    "check_embeddings",
    "check_image_size",
    "check_int",
    "check_number",
    "check_triple",
    "shown",
    "value_checks",
    "value_checks_enabled",
]

_VALUE_CHECKS = True

#: The input side (pixels) a model takes: from 8 (the smallest a backbone's strides leave a feature
#: map for) to 1024 (DINOv2's 518 and beyond; a 3000-pixel side costs gigabytes a batch).
IMAGE_SIZE_MIN, IMAGE_SIZE_MAX = 8, 1024

#: How many characters of a user's value an error message echoes (a 100,000-character name would
#: otherwise become a 200 KB message).
SHOWN_CHARS = 60


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for an error message, at most ``limit`` characters of it plus its length:
    ``'abc'`` stays ``'abc'``; a longer string becomes ``'<first limit characters>'... (100,000 characters)``."""
    if isinstance(value, Integral) and not isinstance(value, bool) and int(value).bit_length() > 3 * limit:
        return f"an integer of about {int(int(value).bit_length() * 0.30103)} digits"  # repr() fails past 4,300
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


# Upper bounds of the sizes and counts a config, a command line or a file may give. Each is generous
# for real use (tens to thousands of times what the recipes use) and low enough that an absurd value
# (a typo, a hostile file) is refused by name before it sizes an allocation, a loop or an estimate.

#: Widths of an embedding, a projection head or a backbone's pooled features: the recipes use 128-1024,
#: the widest pooled features of the backbones (timm's included) are under 10,000; one 16,384-d float32
#: vector is 64 KiB an image, and its linear layer on 4,096 features 256 MiB.
MAX_EMBEDDING_DIM = 16_384
#: Images (or points) in one batch or forward pass: the recipes use 120-128; 16,384 images of 224 px
#: are 9.9 GB of float32 input alone, and a batch's pairwise matrices 1 GiB each.
MAX_BATCH_SIZE = 16_384
#: Data-loading worker processes: each is a process of its own; 256 is more than the cores of any one
#: machine this runs on.
MAX_WORKERS = 256
#: Training epochs: the recipes run 20-90; 10,000 is over 100 times that.
MAX_EPOCHS = 10_000
#: Optimiser steps (an epoch's cap, a run's floor): the folder recipe's floor is 300; 10 million steps
#: of a 120-image batch see 1.2 billion images.
MAX_STEPS = 10_000_000
#: Neighbours, results or members per item (k of a k-NN graph, --top-k, Recall@K): the recipes use
#: 5-1000 (SOP's Recall@1000); beyond 100,000 a table or grid has more rows than anyone reads.
MAX_NEIGHBOURS = 100_000
#: Counts of images, vectors or groups: a pile of a billion 512-d float32 embeddings is 2 TB.
MAX_ITEMS = 1_000_000_000
#: Random seeds: NumPy's and scikit-learn's take 32 bits.
MAX_SEED = 2**32 - 1
#: Nesting of a config's YAML: a config is sections of keys whose values are scalars or short lists (3
#: levels); deeper input is refused before PyYAML's recursive composer meets it.
MAX_NESTING_DEPTH = 32


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


def check_int(
    name: str, value: Any, minimum: int | None = None, *, maximum: int | None = None, where: str = ""
) -> int:
    """``value`` as an int; ``ValueError("{where}{name} must be an integer >= {minimum} and <= {maximum},
    got ...")`` otherwise (a bound that is None is not checked nor named).

    Booleans are not integers here.
    """
    if (
        isinstance(value, bool)
        or not isinstance(value, Integral)
        or (minimum is not None and value < minimum)
        or (maximum is not None and value > maximum)
    ):
        bound = f" >= {minimum}" if minimum is not None else ""
        if maximum is not None:
            bound += f"{' and' if bound else ''} <= {maximum}"
        raise ValueError(f"{where}{name} must be an integer{bound}, got {shown(value)}")
    return int(value)


def check_number(name: str, value: Any, minimum: float = 0.0, *, strict: bool = False, where: str = "") -> float:
    """``value`` as a finite float ``>= minimum`` (``> minimum`` when ``strict``), else ``ValueError``."""
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(float(value))
    if ok:
        ok = float(value) > minimum if strict else float(value) >= minimum
    if not ok:
        bound = f"{'>' if strict else '>='} {minimum:g}"
        raise ValueError(f"{where}{name} must be a finite number {bound}, got {shown(value)}")
    return float(value)


def check_image_size(name: str, value: Any, *, where: str = "") -> int:
    """``value`` as an int in [:data:`IMAGE_SIZE_MIN`, :data:`IMAGE_SIZE_MAX`], else ``ValueError``
    (booleans, floats, strings and lists are not sizes)."""
    if isinstance(value, bool) or not isinstance(value, Integral) or not IMAGE_SIZE_MIN <= value <= IMAGE_SIZE_MAX:
        raise ValueError(
            f"{where}{name} must be an integer from {IMAGE_SIZE_MIN} to {IMAGE_SIZE_MAX} (pixels), got {shown(value)}"
        )
    return int(value)


def check_triple(name: str, value: Any, *, positive: bool = False, where: str = "") -> tuple[float, float, float]:
    """``value`` as a tuple of 3 finite numbers (one per RGB channel; each > 0 when ``positive``),
    else ``ValueError``."""
    ok = isinstance(value, list | tuple) and len(value) == 3
    ok = ok and all(isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(float(v)) for v in value)
    ok = ok and (not positive or all(float(v) > 0 for v in value))
    if not ok:
        kind = "positive finite numbers" if positive else "finite numbers"
        raise ValueError(f"{where}{name} must be a list of 3 {kind} (R, G, B), got {shown(value)}")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def check_choice(name: str, value: Any, choices: Iterable[Any], *, where: str = "") -> Any:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    choices = tuple(choices)
    if value not in choices:
        names = [str(c) for c in choices]
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
        raise ValueError(f"{where}{name} must be {listed}, got {shown(value)}")
    return value


def check_bool(name: str, value: Any, *, where: str = "") -> bool:
    """``value`` if it is a bool, else ``ValueError``."""
    if not isinstance(value, bool):
        raise ValueError(f"{where}{name} must be true or false, got {shown(value)}")
    return value


def check_embeddings(x: Any, name: str, *, min_rows: int = 1) -> Tensor:
    """``x`` if it is a floating (N, d) tensor with N >= ``min_rows`` and d >= 1, finite (when value
    checks are on); ``ValueError`` naming ``name`` otherwise."""
    import torch

    if not isinstance(x, torch.Tensor):
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
    import torch

    if isinstance(value, torch.Tensor):
        if _VALUE_CHECKS and (not bool(torch.isfinite(value).all()) or bool((value < 0).any())):
            raise ValueError(f"{name}: expected finite values >= 0")
        return value
    return check_number(name, value)
