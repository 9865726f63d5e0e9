"""The duplicates calibration of ``plmetric index`` (:mod:`plmetric.retrieval.calibration`) and its use by
``plmetric duplicates``: the options, the announcement with an estimate, the printed choice, and the
threshold a ``duplicates`` run uses when ``--threshold`` is not given.

``--add-to`` keeps the recorded calibration while the index holds at most twice the images it was
calibrated on (the rule's margin is the level the top look-alike of a pile twice as large reaches);
beyond that it is dropped, with a line saying so: re-index to calibrate again.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from plmetric.cli.common import int_at_least


def add_calibration_options(p: argparse.ArgumentParser) -> None:
    """``--no-calibrate``, ``--calibration-sample``, ``--calibration-seed`` of ``plmetric index``."""
    from plmetric.core.options import CALIBRATION_EDITS as EDITS  # no torch: --help stays fast
    from plmetric.core.options import CALIBRATION_MAX_SAMPLE as MAX_SAMPLE
    from plmetric.core.options import CALIBRATION_SAMPLE as DEFAULT_SAMPLE

    group = p.add_argument_group("duplicates calibration")
    group.add_argument(
        "--no-calibrate",
        action="store_true",
        help="skip calibrating the duplicates threshold (copies of a sample of the images, "
        f"{', '.join(EDITS)}, embedded and scored against each image's nearest other image)",
    )
    group.add_argument(
        "--calibration-sample",
        type=int_at_least(1, MAX_SAMPLE),
        default=DEFAULT_SAMPLE,
        help="images copied for the calibration (at most all of them)",
    )
    group.add_argument(
        "--calibration-seed", type=int_at_least(0, 2**32 - 1), default=0, help="which images are sampled"
    )


def calibrate_index(
    args: argparse.Namespace,
    model: Any,
    description: dict[str, Any],
    embeddings: Any,
    paths: list[str],
    images_per_second: float,
    hashes: Any = None,
) -> dict[str, Any] | None:
    """Run the calibration after ``plmetric index`` embedded the pile: announce it with an estimate, print
    what it chose and how long it took; the metadata to record (None with ``--no-calibrate``)."""
    if getattr(args, "no_calibrate", False) or len(paths) < 2:
        return None
    import torch

    from plmetric.cli.common import inference_runner
    from plmetric.core.devices import resolve_device
    from plmetric.data.backbones import description_transform
    from plmetric.retrieval.calibration import CALIBRATION_KEY, EDITS, calibrate, describe, estimated_seconds

    sample = min(args.calibration_sample, len(paths))
    estimate = estimated_seconds(sample, len(paths), images_per_second)
    print(
        f"calibrating the duplicates threshold: {sample} images x {len(EDITS)} copies "
        f"({', '.join(EDITS)}) against every image's nearest other (about {estimate:.0f} s; --no-calibrate skips it)",
        file=sys.stderr,
    )
    device = resolve_device(args.device)
    runner = inference_runner(args, model, dict(description), device)
    transform = description_transform(description)

    def embed(batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return runner(batch.to(device))

    try:
        calibration = calibrate(
            embeddings,
            paths,
            embed,
            transform,
            description,
            sample=sample,
            seed=args.calibration_seed,
            hashes=hashes,  # the pile's phash rows recorded by the same pass: no file is hashed again
            num_workers=args.num_workers,
        )
    except (OSError, ValueError) as err:  # e.g. the sampled files gone since: the index itself is still written
        print(f"plmetric: warning: duplicates calibration skipped: {err}", file=sys.stderr)
        return None
    took = f"{calibration.sample} copies each, {calibration.seconds:.1f} s"
    print(f"duplicates calibration ({took}): {describe(calibration)}")
    return {CALIBRATION_KEY: calibration.record()}


def kept_calibration(meta: dict[str, Any], count: int, where: str) -> dict[str, Any] | None:
    """``--add-to``: the recorded calibration to keep in the grown index of ``count`` images (see the module
    docstring), checked; None (with a line) when there is none to keep."""
    from plmetric.retrieval.calibration import CALIBRATION_KEY, recorded_calibration

    recorded = recorded_calibration(meta, where)
    if recorded is None:
        return None
    if count > 2 * recorded.count:
        print(
            f"note: the duplicates calibration was made on {recorded.count:,} images, the index now holds {count:,}: "
            "dropped (re-index with plmetric index --out to calibrate again)"
        )
        return None
    return {CALIBRATION_KEY: recorded.record()}


def duplicates_threshold(args: argparse.Namespace, default: float) -> tuple[float, int | None, str | None]:
    """The threshold of ``plmetric duplicates``: ``--threshold`` when given, else the index's recorded
    calibration, else ``default``; with the recorded hash limit (None: none) and the line that says
    which (None with ``--threshold``), for stderr once the index is loaded.

    Raises:
        ValueError: the index's calibration is forged or damaged (one line), even with ``--threshold``.
    """
    from plmetric.retrieval.calibration import recorded_calibration
    from plmetric.retrieval.index import read_index_metadata

    meta = read_index_metadata(args.index) or {}
    recorded = recorded_calibration(meta, f"index {args.index}")
    hash_distance = None if recorded is None else recorded.hash_distance
    if args.threshold is not None:
        return args.threshold, hash_distance, None
    if recorded is None:
        note = (
            f"threshold {default:g} (the library default): index {args.index} records no calibration "
            "(re-index with plmetric index to calibrate; --threshold sets one)"
        )
        return default, None, note
    note = (
        f"threshold {recorded.threshold:.4g} calibrated at index time on {recorded.sample} images x "
        f"{len(recorded.edits)} copies (expected recall "
        f"{min(recorded.recall.values()):.2f}-{max(recorded.recall.values()):.2f}, false pairs per image "
        f"{recorded.false_pair_rate:.2g}; --threshold overrides)"
    )
    return recorded.threshold, hash_distance, note


def resolve_duplicates_options(args: argparse.Namespace) -> str | None:
    """Fill ``args.threshold`` and ``args.hash_distance`` of ``plmetric duplicates``: each as given, else the
    index's recorded calibration, else the library default; the line that says which threshold (None when
    ``--threshold`` was given), for stderr.

    Raises:
        ValueError: the index's calibration is forged or damaged (one line).
    """
    from plmetric.core.options import DUPLICATES_HASH_DISTANCE, DUPLICATES_THRESHOLD

    args.threshold, recorded_hash_distance, note = duplicates_threshold(args, DUPLICATES_THRESHOLD)
    if args.hash_distance is None:
        args.hash_distance = DUPLICATES_HASH_DISTANCE if recorded_hash_distance is None else recorded_hash_distance
    return note
