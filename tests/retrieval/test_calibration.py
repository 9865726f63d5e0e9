"""The calibrated duplicates threshold (:mod:`plmetric.retrieval.calibration`): the decision rule on
distributions with known answers, the copies' edits, and the recorded calibration's checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from plmetric.retrieval.calibration import (
    ALPHA,
    CALIBRATION_KEY,
    EDITS,
    HASH_MIN_COSINE,
    Calibration,
    choose_threshold,
    closest_look_alike,
    edit_copy,
    hash_limit,
    model_identity,
    recorded_calibration,
)


def _copies(rng: np.random.Generator, low: float, high: float, n: int = 128) -> tuple[dict, dict]:
    scores = {edit: rng.uniform(low, high, n) for edit in EDITS}
    hashes = {edit: rng.integers(0, 7, n) for edit in EDITS}
    return scores, hashes


def _impostors(rng: np.random.Generator, n: int, centre: float, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """Nearest-other scores of look-alikes (clipped normal) and their hash distances (Binomial(64, 1/2))."""
    return np.clip(rng.normal(centre, spread, n), -1, 0.999), rng.binomial(64, 0.5, n)


def test_well_separated_distributions_put_the_threshold_between_them_with_recall_one():
    rng = np.random.default_rng(0)
    scores, hashes = _copies(rng, 0.93, 0.99)
    nearest, near_hash = _impostors(rng, 2000, 0.6, 0.05)
    choice = choose_threshold(scores, hashes, nearest, near_hash)
    assert nearest.max() < choice.threshold < 0.93
    assert all(r == 1.0 for r in choice.recall.values())
    # the budget: at most floor(ALPHA N) impostors above the threshold
    assert (nearest >= choice.threshold).sum() <= math.floor(ALPHA * len(nearest))
    assert choice.false_pair_rate <= ALPHA


def test_overlapping_distributions_keep_precision_and_give_up_recall():
    rng = np.random.default_rng(1)
    scores, hashes = _copies(rng, 0.80, 0.99)
    nearest, near_hash = _impostors(rng, 300, 0.86, 0.03)  # look-alikes as close as many copies
    choice = choose_threshold(scores, hashes, nearest, near_hash)
    # no impostor of this pile reaches it (ALPHA * 300 < 1), whatever recall that costs
    assert (nearest >= choice.threshold).sum() == 0
    assert choice.threshold > nearest.max()
    assert 0 < min(choice.recall.values()) < 1


def test_a_few_duplicates_in_the_pile_do_not_drag_the_threshold_to_the_top_duplicate():
    rng = np.random.default_rng(2)
    scores, hashes = _copies(rng, 0.90, 0.99)
    nearest, near_hash = _impostors(rng, 300, 0.6, 0.05)
    clean = choose_threshold(scores, hashes, nearest, near_hash).threshold
    # 10 images (5 pairs) are duplicates of each other: cosine 0.95-0.99, their hashes within a few bits
    dup = rng.uniform(0.95, 0.99, 5).repeat(2)
    nearest[:10], near_hash[:10] = dup, rng.integers(0, 4, 10)
    with_hash = choose_threshold(scores, hashes, nearest, near_hash)
    assert with_hash.threshold < dup.min() and with_hash.explained_by_hash == 10
    assert with_hash.threshold == pytest.approx(clean, abs=0.02)
    # cropped duplicates: no hash evidence, found as outliers of the impostors' tail that look like copies
    near_hash[:10] = rng.binomial(64, 0.5, 10)
    by_tail = choose_threshold(scores, hashes, nearest, near_hash)
    assert by_tail.outliers == 10 and by_tail.threshold < dup.min()


def test_a_continuous_tail_of_look_alikes_is_not_read_as_duplicates():
    """The outlier step must not explain away the impostors themselves: with no gap above the tail,
    the top values stay impostors and the threshold stays above them."""
    rng = np.random.default_rng(3)
    scores, hashes = _copies(rng, 0.85, 0.99)
    nearest = np.sort(rng.uniform(0.6, 0.92, 300))  # a flat, gap-free tail right into the copies' range
    near_hash = rng.binomial(64, 0.5, 300)
    choice = choose_threshold(scores, hashes, nearest, near_hash)
    assert choice.outliers == 0 and choice.threshold > nearest.max()


def test_hash_limit_follows_the_look_alikes_spread_and_the_copies_need():
    rng = np.random.default_rng(4)
    copies = {"resize50": rng.integers(0, 5, 200)}
    far = rng.binomial(64, 0.5, 500)  # unrelated photos: mean 32, sd 4
    limit = hash_limit(copies, far, look_alikes=1.0)
    assert limit == math.ceil(np.quantile(copies["resize50"], 0.95))  # the copies need less than is safe
    near = np.clip(rng.normal(8, 3, 500).round(), 0, 64)  # blobs on a blank background: hashes alike
    assert hash_limit(copies, near, look_alikes=20.0) == -1  # nothing is safe: the hash signal is off
    assert hash_limit(copies, far[:3]) == -1  # too few look-alike pairs to know


def test_the_hash_signal_adds_recall_where_copies_fall_apart_in_the_features():
    rng = np.random.default_rng(5)
    scores, hashes = _copies(rng, 0.93, 0.99)
    scores["resize50"] = rng.uniform(0.72, 0.9, 128)  # small images halved: far apart in the features
    nearest, near_hash = _impostors(rng, 1000, 0.75, 0.04)
    choice = choose_threshold(scores, hashes, nearest, near_hash)
    assert choice.recall["resize50"] < 0.5 and choice.hash_distance >= 6
    assert choice.recall_with_hash["resize50"] == 1.0


def test_a_minority_of_close_look_alikes_caps_the_hash_limit_below_them():
    """Issue 29's mixed pile: photos' look-alikes lie ~32 bits apart, which alone allows the copies' 6 bits;
    a few tiny images whose 3rd/4th nearest others (different images) lie 4 bits away cap it at 3. A 0-bit
    match there (a copy in a group of three or more) does not."""
    rng = np.random.default_rng(6)
    scores, hashes = _copies(rng, 0.93, 0.99)
    n = 1000
    nearest = np.sort(np.clip(rng.normal(0.75, 0.04, (n, 4)), -1, 0.999), axis=1)[:, ::-1]
    near_hash = rng.binomial(64, 0.5, (n, 4))
    assert choose_threshold(scores, hashes, nearest, near_hash).hash_distance == 6
    near_hash[:3, 2], nearest[:3, 2] = 4, 0.8  # three tiny images: a different image 4 bits away, 3rd nearest
    nearest[:3, :2] = 0.85
    assert closest_look_alike(nearest, near_hash) == 4
    assert choose_threshold(scores, hashes, nearest, near_hash).hash_distance == 3
    near_hash[:3, 2] = 0  # the same hash: a copy, not a look-alike
    assert closest_look_alike(nearest, near_hash) > 6
    assert choose_threshold(scores, hashes, nearest, near_hash).hash_distance == 6
    near_hash[:3, 2], nearest[:3, 2] = 4, 0.6  # below the hash rule's cosine floor: never paired anyway
    assert choose_threshold(scores, hashes, nearest, near_hash).hash_distance == 6


@pytest.mark.parametrize("edit", EDITS)
def test_each_edit_makes_a_copy_of_the_expected_size(edit):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 80, 3), dtype=np.uint8))
    copy = edit_copy(image, edit)
    expected = {"resize50": (40, 30), "crop85": (68, 51)}.get(edit, (80, 60))
    assert copy.mode == "RGB" and copy.size == expected


def _record(description: dict) -> dict:
    calibration = Calibration(
        threshold=0.873,
        hash_distance=6,
        recall=dict.fromkeys(EDITS, 0.99),
        recall_with_hash=dict.fromkeys(EDITS, 1.0),
        false_pair_rate=1e-4,
        sample=128,
        seed=0,
        count=300,
        model=model_identity(description),
        seconds=12.5,
    )
    return {"count": 300, "model": description, CALIBRATION_KEY: calibration.record()}


def test_a_recorded_calibration_reads_back_and_none_is_none():
    description = {"backbone": "efficientnet_lite0", "image_size": 224, "checkpoint_sha256": None}
    meta = json.loads(json.dumps(_record(description)))
    recorded = recorded_calibration(meta)
    assert recorded is not None and recorded.threshold == pytest.approx(0.873) and recorded.hash_distance == 6
    assert recorded_calibration({"model": description}) is None


@pytest.mark.parametrize(
    "field, value",
    [
        ("threshold", 1.5),
        ("threshold", float("nan")),
        ("threshold", "0.9"),
        ("threshold", 0.2),  # below the hash rule's floor: never chosen
        ("hash_distance", 65),
        ("hash_distance", 3.0),
        ("hash_distance", True),
        ("false_pair_rate", -0.1),
        ("sample", 0),
        ("count", 10**9),  # more images than the index holds
        ("model", "0" * 16),  # another model's calibration
        ("recall", {"flip": 0.5}),
        ("edits", ["rotate"]),
    ],
)
def test_a_forged_field_is_refused_in_one_line(field, value):
    description = {"backbone": "efficientnet_lite0", "image_size": 224}
    meta = _record(description)
    meta[CALIBRATION_KEY][field] = value
    with pytest.raises(ValueError, match=f"'{CALIBRATION_KEY}' metadata is invalid: {field}") as err:
        recorded_calibration(meta)
    assert "\n" not in str(err.value)


def test_a_calibration_that_is_not_an_object_is_refused():
    with pytest.raises(ValueError, match="expected a JSON object"):
        recorded_calibration({CALIBRATION_KEY: [0.9]})


def test_the_floor_is_the_hash_rules():
    rng = np.random.default_rng(6)
    scores, hashes = _copies(rng, 0.6, 0.99)
    nearest, near_hash = _impostors(rng, 500, 0.2, 0.05)  # nothing alike: the tail is far below
    assert choose_threshold(scores, hashes, nearest, near_hash).threshold >= HASH_MIN_COSINE


@pytest.mark.parametrize("n", [1, 2, 3, 11, 12, 13, 40])
def test_small_piles_get_a_threshold_in_range(n):
    rng = np.random.default_rng(n)
    scores, hashes = _copies(rng, 0.7, 0.99, n=4)
    nearest = np.concatenate([rng.uniform(0.9, 0.99, n // 2), rng.uniform(0.3, 0.8, n - n // 2)])
    choice = choose_threshold(scores, hashes, nearest, rng.integers(-1, 40, n))
    assert HASH_MIN_COSINE <= choice.threshold <= 1.0 and 0.0 <= choice.false_pair_rate <= 1.0


def test_a_pile_where_every_image_has_a_copy_is_judged_by_its_nearest_non_duplicates():
    """300 originals each with a copy: every image's nearest other is its copy (hash within a few bits);
    its next three are look-alikes. The threshold is set by those, below the copies, and the hash limit
    comes from the look-alikes' distances, not from the duplicates' (which are every nearest pair)."""
    rng = np.random.default_rng(7)
    scores, hashes = _copies(rng, 0.90, 0.99)
    n = 600
    others = -np.sort(-np.clip(rng.normal(0.6, 0.05, (n, 3)), -1, 1), axis=1)
    nearest = np.column_stack([rng.uniform(0.93, 0.99, n), others])
    near_hash = np.column_stack([rng.integers(0, 4, n), rng.binomial(64, 0.5, (n, 3))])
    choice = choose_threshold(scores, hashes, nearest, near_hash)
    assert choice.hash_distance >= 3 and choice.explained_by_hash == n
    assert others.max() < choice.threshold < 0.90
    assert all(r == 1.0 for r in choice.recall.values())
