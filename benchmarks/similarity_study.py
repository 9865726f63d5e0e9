"""Slide 14 on our data: how well PLM's similarity and its competitors agree with the labels.

A thin wrapper of ``plmetric similarity-study`` with the settings of the README's results: both
halves of the CUB subset (``cub_subset_root()`` of ``tests/shared_data.py``), ImageNet EfficientNet-Lite0 raw
pooled features at 224 px (embedded once, cached in ``~/.cache/plmetric/features``), 50
neighbourhood batches of B = 120 (k = 5), the whole set, and the PLM parameter sweep.

    python benchmarks/similarity_study.py --json OUT.json [any other similarity-study option]

Options given here override the defaults (e.g. ``--split test``, ``--batches 20``, ``--no-sweep``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cub_subset_root  # noqa: E402

from plmetric.cli import main  # noqa: E402


def build_argv(extra: list[str]) -> list[str]:
    """``similarity-study`` arguments: the defaults above, then ``extra`` (argparse: last wins)."""
    sweep = "--no-sweep" not in extra
    extra = [a for a in extra if a != "--no-sweep"]
    argv = ["similarity-study", "--dataset", "cub200", "--data-root", str(cub_subset_root())]
    argv += ["--backbone", "efficientnet_lite0", "--image-size", "224", "--split", "both", "--batches", "50"]
    return argv + (["--sweep"] if sweep else []) + extra


if __name__ == "__main__":
    sys.exit(main(build_argv(sys.argv[1:])))
