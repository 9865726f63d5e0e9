"""``plmetric train``: train an embedding without labels, from a preset or a config file, or on a
folder of images with the preset ``folder`` fitted to the number of images."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from plmetric.cli.common import CLIError, add_command, config_help, int_at_least, print_before_after
from plmetric.core.names import shown
from plmetric.core.validation import MAX_EPOCHS

FOLDER_PRESET = "folder"  # train --images DIR without --config
PROXIES_PER_IMAGE = 0.25  # the preset's proxies: at most a quarter of the folder's images
INTERRUPTED = 130  # the exit status of an interrupted command (plmetric.cli.dispatch.main)


def add_parser(subparsers: Any) -> None:
    from plmetric.methods import method_names

    tr = add_command(subparsers, "train", "train an embedding without labels")
    tr.add_argument(
        "--config", default=None, help=config_help(f"built-in defaults; with --images: the preset {FOLDER_PRESET}")
    )
    tr.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    tr.add_argument("--out", required=True, help="run folder (config, log, checkpoints, plots)")
    tr.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out exactly where it stopped (reads its config.yaml; "
        "--set train.epochs=N extends a finished run); a run stopped while caching its views keeps "
        "the chunks it finished and computes only the rest, then trains",
    )
    tr.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a run already in --out (cached views that still fit the images and model are reused)",
    )
    tr.add_argument(
        "--stop-after",
        type=int_at_least(1, MAX_EPOCHS),
        default=None,
        metavar="N",
        help="stop after N epochs of this call (resume later)",
    )
    tr.add_argument("--images", default=None, help="train on an unlabelled folder of images (searched recursively)")
    tr.add_argument("--data-root", default=None, help="shortcut for --set data.root=PATH")
    tr.add_argument(
        "--method",
        default=None,
        choices=method_names(),
        help="shortcut for --set train.method=...: none (evaluate the untrained start), plm, stml (the peer) "
        "or supervised (the ceiling, with the train split's labels)",
    )
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from plmetric.config.schema import load_config, set_value
    from plmetric.training.loop import CONFIG_FILE, train

    overrides = list(args.set or [])
    if args.images:
        overrides.append("data.dataset=images")
    if args.method:
        overrides.append(f"train.method={args.method}")
    source = args.config
    if args.resume and source is None:  # a run resumes from its own config (plus any --set)
        source = Path(args.out) / CONFIG_FILE
        if not source.is_file():
            raise CLIError(f"--resume: {args.out} holds no run to resume (no {CONFIG_FILE}); start it without --resume")
    preset = args.images and source is None  # a folder without a config: the folder preset
    if preset:
        source = FOLDER_PRESET
    cfg = load_config(source, overrides)
    root = args.images or args.data_root
    if root is not None:  # set directly, not through YAML: any folder name is a path
        set_value(cfg, "data.root", str(root))
        cfg.validate()
    if preset:
        fit_preset_to_folder(cfg, Path(args.images), overrides)
    try:
        result = train(
            cfg,
            args.out,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            stop_after_epochs=args.stop_after,
        )
    except KeyboardInterrupt:  # Ctrl-C: one line, what the run folder keeps and how to go on
        from plmetric.training.runs import interrupted_line

        print(f"plmetric: interrupted: {interrupted_line(Path(args.out))}", file=sys.stderr)
        return INTERRUPTED
    print_before_after(result, cfg.train.epochs)
    if result.skipped_images:
        print(f"left out {len(result.skipped_images)} unreadable training image(s): listed in summary.json")
    print(f"run folder: {shown(result.out_dir)}")
    _print_selected_and_next(cfg, result, args.images)
    return 0


def fit_preset_to_folder(cfg: Any, folder: Path, overrides: Sequence[str]) -> None:
    """Fit the folder preset's sizes to the number n of *readable* images in ``folder`` (each file's
    header is read, no pixels decoded): batch ≤ n (a multiple of the neighbours per seed), proxies ≤
    n/4, embedding ≤ n dimensions, selection neighbours < n. Keys the user set with ``--set`` are
    left alone.

    Raises:
        ValueError: fewer readable images than :func:`minimum_images` (the message gives both numbers).
    """
    from plmetric.config.schema import set_value
    from plmetric.data.datasets import find_images

    if not folder.is_dir():
        return  # the data loader names the problem
    listed = find_images(folder)
    if not listed:
        return  # the data loader names the problem
    unreadable = [path for path in listed if not _has_image_header(path)]
    n, needed = len(listed) - len(unreadable), minimum_images(cfg)
    if n < needed:
        left_out = f" ({len(unreadable)} of {len(listed)} files unreadable)" if unreadable else ""
        raise ValueError(
            f"image folder {folder}: {n} readable image(s){left_out}; training needs at least {needed} "
            f"(train.neighbours_per_seed {cfg.train.neighbours_per_seed}, plm.m + 1 = {cfg.plm.m + 1})"
        )
    given = {item.split("=", 1)[0].strip() for item in overrides}
    k = cfg.train.neighbours_per_seed
    fitted = {
        "train.batch_size": min(cfg.train.batch_size, max(k, n - n % k)),
        "plm.num_proxies": min(cfg.plm.num_proxies, int(PROXIES_PER_IMAGE * n)),
        "model.embedding_dim": min(cfg.model.embedding_dim, n),
        "train.select_k": min(cfg.train.select_k, max(n - 1, 1)),
    }
    changed = []
    for key, value in fitted.items():
        section, name = key.split(".")
        if key not in given and getattr(getattr(cfg, section), name) != value:
            set_value(cfg, key, value)
            changed.append(f"{key}={value}")
    cfg.validate()
    fit = f", fitted: {' '.join(changed)}" if changed else ""
    skipped = f" ({len(unreadable)} unreadable file(s) left out)" if unreadable else ""
    print(f"preset {FOLDER_PRESET} for {n:,} images{skipped}{fit} (change any with --set KEY=VALUE)")


def minimum_images(cfg: Any) -> int:
    """The fewest readable images the folder preset trains on: a batch holds at least one seed and
    its neighbours (``train.neighbours_per_seed``), and the embedding (≤ n dimensions) must exceed
    the pieces' dimension ``plm.m``."""
    return max(cfg.train.neighbours_per_seed, cfg.plm.m + 1)


def _has_image_header(path: Path) -> bool:
    """Whether ``path`` passes the decode policy's checks short of decoding the pixels (a regular
    file, an image header Pillow reads, within the pixel limit: :func:`plmetric.data.images.image_size`)."""
    from plmetric.data.datasets import DECODE_ERRORS
    from plmetric.data.images import image_size

    try:
        width, height = image_size(path)
    except DECODE_ERRORS:
        return False
    return width > 0 and height > 0


def _print_selected_and_next(cfg: Any, result: Any, images: str | None) -> None:
    """Name the model to use (the label-free pick) and the next command."""
    from plmetric.training.runs import MODEL_FILE, SELECTED_MODEL_FILE

    if result.history and result.history[-1]["epoch"] != cfg.train.epochs:
        return  # stopped early (--stop-after): nothing is final yet
    rule = cfg.train.select if result.history else "final"  # a method that does not train: its start
    model = result.out_dir / (SELECTED_MODEL_FILE if rule != "final" else MODEL_FILE)
    if rule != "final" and result.selected_epoch == 0:
        print(
            f"training did not improve the label-free criterion {rule} over the untrained start: "
            f"{shown(model)} is the start (the last epoch is {shown(result.out_dir / MODEL_FILE)})"
        )
    elif rule != "final":
        picked = f"epoch {result.selected_epoch} of {cfg.train.epochs}, picked without labels by {rule}"
        print(f"model: {shown(model)} ({picked})")
    elif result.history:
        print(f"model: {shown(model)} (the last epoch; train.select=final)")
    else:
        print(f"model: {shown(model)}")
    change = result.change
    if change is not None:
        print(f"label-free criterion {change['criterion']}: start {change['start']:.4f}, kept {change['kept']:.4f}")
        if change.get("neighbours_changed_mean") is not None:
            print(
                f"training changed {100 * change['neighbours_changed_mean']:.1f} % of each image's {change['k']} "
                f"nearest neighbours (the nearest one of {100 * change['top1_changed']:.1f} % of the images); "
                f"before/after: {shown(result.out_dir / change['report_html'])}"
            )
    folder = images if images else "IMAGES_DIR"
    print(shown(f"next:  plmetric index {folder} --checkpoint {model} --out {result.out_dir / 'index.safetensors'}"))
