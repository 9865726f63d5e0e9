"""``plmetric demo``: the main job in one command: train on the embedded digits (CPU, no download)
with the preset ``demo`` and report Recall@1 on the unseen digits before and after."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from plmetric.cli.common import add_command, config_help, print_before_after

DEMO_PRESET = "demo"
DEMO_OUT = "runs/demo"


def add_parser(subparsers: Any) -> None:
    demo = add_command(
        subparsers, "demo", "the main job: train on the embedded digits (CPU, no download), before/after"
    )
    demo.add_argument("--config", default=None, help=config_help(f"the preset {DEMO_PRESET}"))
    demo.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    demo.add_argument("--out", default=DEMO_OUT, help="run folder (the demo replaces its own earlier run there)")
    demo.add_argument("--overwrite", action="store_true", help="replace a run in a --out other than the default")
    demo.add_argument("--json", default=None, help="write recall@1_before / recall@1_after to this file")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=run)


def _config_label(source: str) -> str:
    """How the demo names its config: ``preset NAME`` or the file's name."""
    from plmetric.config.schema import is_preset_name, preset_names

    return f"preset {source}" if is_preset_name(source) and source in preset_names() else Path(source).name


def run(args: argparse.Namespace) -> int:
    from plmetric.config.schema import load_config
    from plmetric.core.checkpoint import atomic_write_json
    from plmetric.training.loop import train

    source = args.config or DEMO_PRESET
    cfg = load_config(source, list(args.set or []))
    print(f"plmetric demo: {_config_label(source)}, digits 0-4 train (no labels used), digits 5-9 test")
    # the demo replaces its own previous run in the default folder; any other --out is protected
    overwrite = args.overwrite or Path(args.out) == Path(DEMO_OUT)
    result = train(cfg, args.out, progress=not args.no_progress, overwrite=overwrite)
    print_before_after(result, cfg.train.epochs)
    before = result.start_metrics["recall@1"]
    kept = (result.selected_metrics or result.start_metrics)["recall@1"]
    which = "the untrained start" if not result.selected_epoch else f"epoch {result.selected_epoch}"
    verdict = "improved" if kept > before else "did NOT improve"
    print(
        f"Recall@1 on the unseen digits: {100 * before:.2f} before training, {100 * kept:.2f} with the model "
        f"kept ({which}, picked without labels): training {verdict} the pretrained start "
        f"({100 * (kept - before):+.2f} points)."
    )
    if args.json:
        atomic_write_json(
            args.json,
            {
                "recall@1_before": before,
                "recall@1_after": kept,  # the model kept: the label-free pick
                "selected_epoch": result.selected_epoch,
                "start": result.start_metrics,
                "selected": result.selected_metrics,
                "final": result.final_metrics,
                "best_oracle": result.best_metrics,
                "epochs": cfg.train.epochs,
                "run_dir": str(result.out_dir),
            },
        )
        print(f"wrote {args.json}")
    return 0 if kept > before else 1
