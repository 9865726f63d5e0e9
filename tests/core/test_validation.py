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


def test_image_sizes_and_channel_triples():
    from plmetric.core.validation import IMAGE_SIZE_MAX, IMAGE_SIZE_MIN, check_image_size, check_triple

    assert check_image_size("s", np.int64(224)) == 224
    assert check_image_size("s", IMAGE_SIZE_MIN) == IMAGE_SIZE_MIN and check_image_size("s", IMAGE_SIZE_MAX)
    for bad in (True, 1, IMAGE_SIZE_MIN - 1, IMAGE_SIZE_MAX + 1, 3000, 224.0, "224", [224, 224], None):
        with pytest.raises(ValueError, match=rf"f: s must be an integer from {IMAGE_SIZE_MIN} to {IMAGE_SIZE_MAX}"):
            check_image_size("s", bad, where="f: ")
    assert check_triple("mean", [0.5, 0, 1]) == (0.5, 0.0, 1.0)
    for bad in ([0.5, 0.5], [0.5, "x", 1], [0.5, float("nan"), 1], [True, 1, 1], "abc", {"r": 1}, None):
        with pytest.raises(ValueError, match=r"mean must be a list of 3 finite numbers"):
            check_triple("mean", bad)
    with pytest.raises(ValueError, match=r"std must be a list of 3 positive finite numbers"):
        check_triple("std", [0.2, 0.0, 0.2], positive=True)


def test_integers_with_an_upper_bound_name_the_range_and_the_value():
    assert check_int("epochs", 10_000, 1, maximum=10_000) == 10_000
    with pytest.raises(ValueError, match=r"^where: epochs must be an integer >= 1 and <= 10000, got 99999999999999999999999$"):
        check_int("epochs", 99999999999999999999999, 1, maximum=10_000, where="where: ")
    with pytest.raises(ValueError, match=r"must be an integer <= 5, got 6"):
        check_int("n", 6, maximum=5)
    with pytest.raises(ValueError, match=r"got an integer of about \d+ digits$"):  # not a 3,000-digit message
        check_int("n", 10**3000, 1, maximum=5)
