"""plmetric.core.validation: the one home of argument checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from plmetric.core.validation import (
    check_bool,
    check_choice,
    check_embeddings,
    check_int,
    check_number,
    check_scale,
    value_checks,
    value_checks_enabled,
)


def test_numbers_and_integers():
    assert check_int("k", np.int64(3), 1) == 3 and isinstance(check_int("k", np.int64(3), 1), int)
    for bad in (True, 2.0, "3", 0):
        with pytest.raises(ValueError, match="k must be an integer >= 1"):
            check_int("k", bad, 1)
    assert check_number("tau", 0) == 0.0
    for bad in (float("nan"), float("inf"), -1e-9, True, "1"):
        with pytest.raises(ValueError, match="tau must be a finite number >= 0"):
            check_number("tau", bad)
    with pytest.raises(ValueError, match="> 0"):
        check_number("sigma", 0.0, strict=True)
    with pytest.raises(ValueError, match="where: x must be true or false"):
        check_bool("x", 1, where="where: ")


def test_choices_list_the_valid_ones():
    assert check_choice("rule", "min", ("mean", "min", "max")) == "min"
    with pytest.raises(ValueError, match="rule must be mean, min or max, got 'median'"):
        check_choice("rule", "median", ("mean", "min", "max"))


def test_embeddings_and_value_checks():
    with pytest.raises(ValueError, match="x: expected a 2-D tensor"):
        check_embeddings(torch.zeros(3), "x")
    with pytest.raises(ValueError, match="x: expected at least 2 rows"):
        check_embeddings(torch.zeros(1, 3), "x", min_rows=2)
    broken = torch.tensor([[0.0, float("nan")]])
    with pytest.raises(ValueError, match="NaN or infinite"):
        check_embeddings(broken, "x")
    with value_checks(False):
        assert not value_checks_enabled()
        assert check_embeddings(broken, "x") is broken  # the value check costs a sync: skipped
        assert check_scale("delta", torch.tensor([-1.0])) is not None
    assert value_checks_enabled()
    with pytest.raises(ValueError, match="delta: expected finite values >= 0"):
        check_scale("delta", torch.tensor([-1.0]))
