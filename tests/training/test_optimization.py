"""plmetric.training.optimization: the learning-rate schedule."""

from __future__ import annotations

import pytest

from plmetric.training.optimization import cosine_with_warmup


def test_cosine_schedule_with_warmup():
    factor = cosine_with_warmup(total_steps=100, warmup_steps=10)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.5)
    assert factor(100) == pytest.approx(0.0, abs=1e-12)
