"""The engineer's path, judged: ``plmetric train --images DIR --out RUN`` with nothing else, on piles of
real images, and how well the kept model finds an image's own class compared with the raw backbone.

Each pile is up to ``--max-images`` images of one development set (``../shared/data``), laid out as
links in a temporary folder with one sub-folder per class: ``plankton106`` (a labelled folder),
``cub200`` (the CUB subset's images) and ``cars98dev`` (Stanford Cars classes 1-98). The subset is
deterministic and stratified (classes taken round-robin, files in sorted order). Training reads
no label (``train --images`` searches the folder recursively); the sub-folders are read only to
score. Per pile:

* the wall time of the training command, the time its first line predicted (the estimate printed
  before any pass) and the longest stretch without any output (progress bars included);
* R@1 (= precision@1: the nearest other image has the query's class), precision@10 and MAP@R of the
  raw backbone's pooled features (``plmetric index DIR`` without a checkpoint: the start a user
  has) and of the kept model (``selected.safetensors``, the label-free pick), both by ``plmetric index``.

    python benchmarks/pile.py --json benchmarks/results/pile.json
    python benchmarks/pile.py --piles plankton106 --max-images 300

Run it on a quiet machine: its times are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import shared_data_root  # noqa: E402

from plmetric.core.checkpoint import atomic_write_json  # noqa: E402
from plmetric.data.datasets import load_dataset  # noqa: E402
from plmetric.retrieval.index import load_embeddings  # noqa: E402

PILES = {"plankton106": ("folder", "plankton106"), "cub200": ("cub200", "cub200_subset100"), "cars98dev": ("cars196", "cars98dev")}
ESTIMATE = re.compile(r"expected about ([0-9.]+) min")


def labelled_images(pile: str, data_root: Path) -> list[tuple[str, int]]:
    """Every image of the set with its class (train and test halves together)."""
    loader, folder = PILES[pile]
    splits = load_dataset(loader, str(data_root / folder), verbose=False)
    items = []
    for part in (splits.train, splits.test):
        if part is not None:
            items += [(part.describe(i), int(part.labels[i])) for i in range(len(part))]
    return items


def stratified(items: list[tuple[str, int]], limit: int) -> list[tuple[str, int]]:
    """Up to ``limit`` items, classes taken round-robin in sorted order (deterministic)."""
    by_class: dict[int, list[str]] = {}
    for path, label in sorted(items):
        by_class.setdefault(label, []).append(path)
    queues = [by_class[c] for c in sorted(by_class)]
    chosen: list[tuple[str, int]] = []
    depth = 0
    while len(chosen) < limit and any(depth < len(q) for q in queues):
        for label, queue in zip(sorted(by_class), queues, strict=True):
            if depth < len(queue) and len(chosen) < limit:
                chosen.append((queue[depth], label))
        depth += 1
    return chosen


def lay_out(items: list[tuple[str, int]], folder: Path) -> None:
    """Links ``folder/<class>/<n>_<name>`` to the images."""
    for n, (path, label) in enumerate(items):
        target = folder / f"class_{label:04d}"
        target.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.abspath(path), target / f"{n:05d}_{Path(path).name}")


def run_timed(command: list[str], log: Path) -> tuple[float, float, str]:
    """Run ``command``; return (wall seconds, longest silence in seconds, the output)."""
    start = last = time.perf_counter()
    longest = 0.0
    chunks: list[bytes] = []
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) as process:
        selector = selectors.DefaultSelector()
        selector.register(process.stdout, selectors.EVENT_READ)
        while True:
            ready = selector.select(timeout=1.0)
            now = time.perf_counter()
            if ready:
                data = os.read(process.stdout.fileno(), 65536)
                if not data:
                    break
                chunks.append(data)
                longest, last = max(longest, now - last), now
            elif process.poll() is not None:
                break
        process.wait()
    output = b"".join(chunks).decode(errors="replace")
    log.write_text(output)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {process.returncode}; see {log}")
    return time.perf_counter() - start, max(longest, time.perf_counter() - last), output


def scores(index: Path, labels_by_path: dict[str, int]) -> dict[str, float]:
    """R@1 (= precision@1), precision@10 and MAP@R of an index by the sub-folder classes."""
    from plmetric.evaluation.metrics import evaluate

    embeddings, _, paths, _ = load_embeddings(index)
    labels = torch.tensor([labels_by_path[os.path.realpath(p)] for p in paths])
    metrics = evaluate(embeddings, labels, ks=(1, 10), compute_nmi=False)
    unit = torch.nn.functional.normalize(embeddings.float(), dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-float("inf"))
    top = similarity.topk(10, dim=1).indices
    precision10 = (labels[top] == labels[:, None]).float().mean().item()
    return {"recall@1": metrics["recall@1"], "precision@10": precision10, "map@r": metrics["map@r"]}


def run_pile(pile: str, args: argparse.Namespace, work: Path) -> dict:
    items = stratified(labelled_images(pile, Path(args.data_root)), args.max_images)
    folder = work / pile
    lay_out(items, folder)
    labels_by_path = {os.path.realpath(p): label for p, label in items}
    plmetric = [sys.executable, "-m", "plmetric.cli"]
    run = work / f"{pile}-run"
    seconds, silence, output = run_timed([*plmetric, "train", "--images", str(folder), "--out", str(run)], work / f"{pile}.log")
    found = ESTIMATE.search(output)
    estimate = 60 * float(found.group(1)) if found else None
    raw, kept = work / f"{pile}-raw.safetensors", work / f"{pile}-kept.safetensors"
    subprocess.run([*plmetric, "index", str(folder), "--out", str(raw), "--no-progress"], check=True, capture_output=True)
    subprocess.run(
        [*plmetric, "index", str(folder), "--checkpoint", str(run / "selected.safetensors"), "--out", str(kept), "--no-progress"],
        check=True,
        capture_output=True,
    )
    summary = json.loads((run / "summary.json").read_text())
    change = summary.get("change") or {}
    row = {
        "pile": pile,
        "images": len(items),
        "classes": len({label for _, label in items}),
        "seconds": round(seconds, 1),
        "estimate_seconds": estimate,
        "estimate_error": None if estimate is None else round(estimate / seconds - 1, 3),
        "longest_silence_seconds": round(silence, 1),
        "mode": next((line for line in output.splitlines() if line.startswith("train.mode=auto")), None),
        "selected_epoch": summary.get("selected_epoch"),
        "criterion": {"name": change.get("criterion"), "start": change.get("start"), "kept": change.get("kept")},
        "neighbours_changed": change.get("neighbours_changed_mean"),
        "raw": scores(raw, labels_by_path),
        "kept": scores(kept, labels_by_path),
    }
    print(
        f"{pile}: {row['images']} images, {seconds / 60:.2f} min (estimate {estimate and estimate / 60:.2f} min), "
        f"silent at most {silence:.1f} s; R@1 raw {100 * row['raw']['recall@1']:.2f} -> kept "
        f"{100 * row['kept']['recall@1']:.2f} (epoch {row['selected_epoch']})",
        flush=True,
    )
    return row


def table(rows: list[dict]) -> str:
    head = "| pile | images | wall (min) | estimate (min) | longest silence (s) | R@1 raw | R@1 kept | P@10 raw | P@10 kept | MAP@R raw | MAP@R kept | kept epoch |"
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        est = f"{r['estimate_seconds'] / 60:.2f}" if r["estimate_seconds"] else "-"
        lines.append(
            f"| {r['pile']} | {r['images']} | {r['seconds'] / 60:.2f} | {est} | {r['longest_silence_seconds']:.1f} | "
            f"{100 * r['raw']['recall@1']:.2f} | {100 * r['kept']['recall@1']:.2f} | "
            f"{100 * r['raw']['precision@10']:.2f} | {100 * r['kept']['precision@10']:.2f} | "
            f"{100 * r['raw']['map@r']:.2f} | {100 * r['kept']['map@r']:.2f} | {r['selected_epoch']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--piles", nargs="*", default=list(PILES), choices=list(PILES))
    parser.add_argument("--max-images", type=int, default=1000)
    parser.add_argument("--data-root", default=str(shared_data_root()))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="plmetric-pile-") as tmp:
        for pile in args.piles:
            rows.append(run_pile(pile, args, Path(tmp)))
    print(table(rows))
    if args.json:
        machine = {"cpus": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
        atomic_write_json(args.json, {"max_images": args.max_images, "machine": machine, "rows": rows})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
