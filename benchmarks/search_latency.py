"""Wall time of ``plmetric search`` with one query on a 1,000-image index, end to end (issue 28's
target: at most 2 s), through the torch-free path (``--runtime auto``: the cached ONNX export the
index names, :mod:`plmetric.retrieval.quick_search`) and through PyTorch (``--runtime torch``).

The index is built once with ``plmetric index`` (``--runtime auto``) from the first ``--images``
images of the CUB-200 subset (sorted paths), copied to a work folder outside the checkout; the
query is the next image (not in the index). Each run is a fresh ``plmetric search QUERY --index X
--out q.png`` process (the console script, what a user types), timed by wall clock; the two paths
alternate so that a change in the machine's load hits both. The load average is recorded before and
after: on a busy machine both times grow.

    python benchmarks/search_latency.py                      # writes benchmarks/results/search_latency.json
    python benchmarks/search_latency.py --runs 3 --work /tmp/sl --json /tmp/sl.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, dataset_root  # noqa: E402


def _images(count: int) -> list[Path]:
    root = Path(dataset_root("cub200")) / "CUB_200_2011" / "images"
    if not root.is_dir():
        raise SystemExit(f"CUB-200 subset not found at {root} (set PLMETRIC_DATA)")
    found = sorted(p for p in root.rglob("*.jpg") if p.is_file())
    if len(found) <= count:
        raise SystemExit(f"{root} holds {len(found)} images; need more than {count}")
    return found[: count + 1]


def _plmetric() -> str:
    script = Path(sys.executable).with_name("plmetric")
    return str(script) if script.is_file() else shutil.which("plmetric") or "plmetric"


def _build(work: Path, count: int, env: dict[str, str]) -> tuple[Path, Path, float | None]:
    images = _images(count)
    folder, index = work / "images", work / "index.safetensors"
    if not index.is_file():
        for source in images[:count]:
            target = folder / source.parent.name / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        started = time.perf_counter()
        subprocess.run([_plmetric(), "index", str(folder), "--out", str(index), "--no-progress"], env=env, check=True)
        built = time.perf_counter() - started
    else:
        built = None  # the work folder's index, built before
    query = work / f"query{images[count].suffix}"
    shutil.copyfile(images[count], query)
    return index, query, built


def _time_search(index: Path, query: Path, runtime: str, env: dict[str, str], work: Path) -> float:
    argv = [_plmetric(), "search", str(query), "--index", str(index), "--out", str(work / f"q_{runtime}.png"),
            "--runtime", runtime]
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000, help="images in the index")
    parser.add_argument("--runs", type=int, default=7, help="timed searches per runtime")
    parser.add_argument("--work", default=None, help="work folder (kept; default: a temporary one, removed)")
    parser.add_argument("--json", default=str(REPO_ROOT / "benchmarks" / "results" / "search_latency.json"))
    args = parser.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="plmetric-search-latency-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PLMETRIC_CACHE": str(work / "cache")}
    try:
        index, query, built = _build(work, args.images, env)
        for runtime in ("auto", "torch"):  # warm the file cache and the export once, untimed
            _time_search(index, query, runtime, env, work)
        load_before = os.getloadavg()
        times: dict[str, list[float]] = {"auto": [], "torch": []}
        for _ in range(args.runs):
            for runtime in times:
                times[runtime].append(_time_search(index, query, runtime, env, work))
        load_after = os.getloadavg()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    rows = {
        runtime: {"median_s": statistics.median(t), "min_s": min(t), "max_s": max(t), "runs_s": t}
        for runtime, t in times.items()
    }
    print(f"{'runtime':<16}{'median s':>10}{'min s':>8}{'max s':>8}   ({args.runs} runs each, {args.images} images)")
    for runtime, row in rows.items():
        label = "auto (no torch)" if runtime == "auto" else runtime
        print(f"{label:<16}{row['median_s']:>10.2f}{row['min_s']:>8.2f}{row['max_s']:>8.2f}")
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}; {os.cpu_count()} CPUs")
    result = {
        "benchmark": "search_latency",
        "images": args.images,
        "runs": args.runs,
        "index_build_s": built,
        "results": rows,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
