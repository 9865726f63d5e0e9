"""``plmetric similarity-study``: how well PLM and competing similarity estimates agree with the
labels (slide 14); the study itself is :mod:`plmetric.studies.similarity`."""

from __future__ import annotations

import argparse
import os
from typing import Any

from plmetric.cli.common import (
    DATASET_CHOICES,
    add_command,
    batch_size,
    image_side,
    int_at_least,
    seed,
    workers,
)
from plmetric.core.validation import MAX_BATCH_SIZE, MAX_STEPS


def add_parser(subparsers: Any) -> None:
    ss = add_command(
        subparsers,
        "similarity-study",
        "how well PLM and competing similarity estimates agree with the labels (slide 14)",
    )
    similarity_study_arguments(ss)
    ss.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Correlation with the ground truth of PLM and competing similarity estimates (slide 14)."""
    from plmetric.studies.similarity import similarity_study_command

    return similarity_study_command(args)


def similarity_study_arguments(p: argparse.ArgumentParser) -> None:
    """Register the options of ``plmetric similarity-study`` on an argparse (sub)parser."""
    src = p.add_argument_group("input: a data set + backbone (features embedded once and cached), or a features file")
    src.add_argument("--dataset", default=None, choices=DATASET_CHOICES)
    src.add_argument("--data-root", default=None, help="data set root in its official layout")
    src.add_argument("--split", default="both", choices=["train", "test", "both"], help="default: both halves")
    src.add_argument("--backbone", default="efficientnet_lite0", help="pretrained backbone (raw pooled features)")
    src.add_argument("--weights", default=None, help="local backbone weights file instead of the packaged ones")
    src.add_argument("--image-size", type=image_side, default=224)
    src.add_argument("--cache-dir", default=None, help="feature cache (default ~/.cache/plmetric/features)")
    src.add_argument("--embed-batch-size", type=batch_size, default=64)
    src.add_argument("--num-workers", type=workers, default=min(2, os.cpu_count() or 1))
    src.add_argument("--device", default="auto", help="auto, cpu, cuda, ... (embedding only)")
    src.add_argument(
        "--features", default=None, help="features file (.npy (N, d) or .safetensors) instead of a data set"
    )
    src.add_argument("--labels", default=None, help="labels file (.npy/.txt, N integers) for --features")
    st = p.add_argument_group("study")
    st.add_argument(
        "--estimators",
        default="all",
        help="comma-separated names of plmetric.evaluation.estimators.ESTIMATORS (a wrong one lists them), or all",
    )
    st.add_argument("--set", action="append", metavar="EST.OPT=VALUE", help="estimator option, e.g. plm.tau=1.0")
    st.add_argument("--batch-size", type=int_at_least(2, MAX_BATCH_SIZE), default=120, help="B, points per neighbourhood batch")
    st.add_argument("--neighbours-per-seed", "-k", type=int_at_least(1, MAX_BATCH_SIZE), default=5, help="k: a seed and its k-1 neighbours")
    st.add_argument("--batches", type=int_at_least(0, MAX_STEPS), default=50, help="number of batches (0: whole set only)")
    st.add_argument("--seed", type=seed, default=0)
    st.add_argument("--no-whole-set", action="store_true", help="skip the whole-set measurement")
    st.add_argument("--no-normalize", action="store_true", help="do not L2-normalise the features")
    st.add_argument(
        "--sweep",
        action="store_true",
        help="also sweep PLM's N_α, N_β, m, τ, k and the baselines' own options, one at a time",
    )
    st.add_argument(
        "--sweep-whole-set", action="store_true", help="sweeps: also measure on the whole set (slow: N×N per setting)"
    )
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    p.add_argument("--plot", default=None, help="bar chart PNG (default: the --json path with .png)")
    p.add_argument("--no-progress", action="store_true")
