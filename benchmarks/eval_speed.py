"""Speed and peak memory of exact retrieval evaluation on SOP-sized synthetic embeddings.

Compares ``plmetric.evaluation.metrics.evaluate`` (torch backend, optionally several chunk sizes; faiss
backend) with pytorch-metric-learning's ``AccuracyCalculator`` (precision_at_1,
mean_average_precision_at_r, r_precision). Each method runs in its own child process, which
reports its wall-clock time and its peak resident memory above the baseline of the loaded data
(``/proc/self/status`` VmHWM after resetting it through ``/proc/self/clear_refs``).

    python benchmarks/eval_speed.py --json eval_speed.json
    python benchmarks/eval_speed.py --n 20000 --classes 3740 --chunk-sizes 1024,2048,4096,8192 --skip-pml
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SOP_MIN_CLASS, SOP_MAX_CLASS = 2, 12


def sop_like_labels(n: int, classes: int, rng: np.random.Generator) -> np.ndarray:
    """Labels of ``classes`` classes of 2..12 items each, ``n`` items in all (SOP's test split shape)."""
    if not SOP_MIN_CLASS * classes <= n <= SOP_MAX_CLASS * classes:
        raise ValueError(f"--n {n} cannot be split into --classes {classes} of {SOP_MIN_CLASS}..{SOP_MAX_CLASS} items")
    sizes = np.full(classes, SOP_MIN_CLASS)
    remaining = n - sizes.sum()
    while remaining:
        room = np.flatnonzero(sizes < SOP_MAX_CLASS)
        extra = np.bincount(rng.choice(room, size=remaining), minlength=classes)
        sizes = np.minimum(sizes + extra, SOP_MAX_CLASS)
        remaining = n - sizes.sum()
    labels = np.repeat(np.arange(classes), sizes)
    return labels[rng.permutation(n)]


def synthetic_embeddings(n: int, dim: int, classes: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """L2-normalised random class centres plus isotropic noise of norm about ``noise``."""
    rng = np.random.default_rng(seed)
    labels = sop_like_labels(n, classes, rng)
    centres = rng.standard_normal((classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[labels] + rng.standard_normal((n, dim), dtype=np.float32) * np.float32(noise / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels.astype(np.int64)


# ----------------------------------------------------------------------------- child process


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def run_worker(method: str, data_dir: Path, ks: list[int], chunk_size: int | None) -> dict:
    """Run one method on the saved data; return its metrics, seconds and peak memory."""
    import torch

    x = torch.from_numpy(np.load(data_dir / "embeddings.npy"))
    y = torch.from_numpy(np.load(data_dir / "labels.npy"))
    if method.startswith("pml"):
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        pml_k: int | str = method.split("k=")[1].rstrip(")")
        pml_k = int(pml_k) if pml_k.isdigit() else pml_k
        calculator = AccuracyCalculator(
            include=("precision_at_1", "mean_average_precision_at_r", "r_precision"),
            k=pml_k,
            device=torch.device("cpu"),
        )
    else:
        from plmetric.evaluation.metrics import evaluate

    baseline = _proc_status_kib("VmRSS")
    reset = _reset_peak_rss()
    start = time.perf_counter()
    if method.startswith("pml"):
        result = calculator.get_accuracy(x, y)
        metrics = {
            "precision_at_1": result["precision_at_1"],
            "map@r": result["mean_average_precision_at_r"],
            "r_precision": result["r_precision"],
        }
    else:
        backend = "faiss" if "faiss" in method else "torch"
        metrics = evaluate(x, y, ks, backend=backend, chunk_size=chunk_size, compute_nmi=False)
    seconds = time.perf_counter() - start
    peak = _proc_status_kib("VmHWM")
    return {
        "method": method,
        "seconds": seconds,
        "peak_rss_delta_mib": (peak - baseline) / 1024,
        "peak_rss_mib": peak / 1024,
        "peak_reset": reset,
        "metrics": metrics,
    }


# ----------------------------------------------------------------------------- parent


def run_method(method: str, data_dir: Path, ks: list[int], chunk_size: int | None) -> dict:
    command = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--data",
        str(data_dir),
        "--ks",
        ",".join(map(str, ks)),
    ]
    if chunk_size:
        command += ["--worker-chunk", str(chunk_size)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"method": method, "error": done.stderr.strip().splitlines()[-1] if done.stderr else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(results: list[dict], reference: str | None) -> None:
    ref = next((r for r in results if r["method"] == reference and "error" not in r), None)
    header = (
        f"{'method':42s} {'seconds':>8s} {'x ref':>6s} {'peak MiB':>9s} {'R@1 / P@1':>10s} {'MAP@R':>8s} {'R-prec':>8s}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['method']:42s} ERROR {r['error']}")
            continue
        m = r["metrics"]
        first = m.get("recall@1", m.get("precision_at_1"))
        speedup = f"{ref['seconds'] / r['seconds']:6.2f}" if ref else "     -"
        print(
            f"{r['method']:42s} {r['seconds']:8.2f} {speedup} {r['peak_rss_delta_mib']:9.0f} "
            f"{first:10.6f} {m['map@r']:8.6f} {m['r_precision']:8.6f}"
        )
    if ref:
        print(f"(x ref = speed-up over {reference}; peak = resident memory above the loaded data)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60502, help="number of test embeddings (SOP: 60502)")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension")
    parser.add_argument("--classes", type=int, default=11316, help="number of classes (SOP: 11316)")
    parser.add_argument("--ks", default="1,10,100,1000", help="comma-separated K of Recall@K")
    parser.add_argument("--noise", type=float, default=2.3, help="noise norm relative to the unit class centre")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk-sizes", default="", help="extra torch chunk sizes to time, e.g. 2048,4096,8192")
    parser.add_argument("--pml-k", default="max_bin_count", help="comma-separated k for AccuracyCalculator")
    parser.add_argument("--skip-pml", action="store_true", help="skip pytorch-metric-learning")
    parser.add_argument("--skip-faiss", action="store_true", help="skip the faiss backend")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-chunk", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        ks = [int(k) for k in args.ks.split(",") if k]
        chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c]
    except ValueError:
        parser.error("--ks and --chunk-sizes take comma-separated integers")

    if args.worker:
        print(json.dumps(run_worker(args.worker, args.data, ks, args.worker_chunk)))
        return 0

    methods: list[tuple[str, int | None]] = [("plmetric torch", None)]
    methods += [(f"plmetric torch chunk={c}", c) for c in chunk_sizes]
    if not args.skip_faiss:
        methods.append(("plmetric faiss", None))
    pml_methods = [] if args.skip_pml else [f"pml AccuracyCalculator(k={k})" for k in args.pml_k.split(",") if k]
    methods += [(m, None) for m in pml_methods]

    print(
        f"data: n={args.n} dim={args.dim} classes={args.classes} noise={args.noise} ks={ks}; "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        x, y = synthetic_embeddings(args.n, args.dim, args.classes, args.noise, args.seed)
        np.save(data_dir / "embeddings.npy", x)
        np.save(data_dir / "labels.npy", y)
        del x, y
        for method, chunk in methods:
            print(f"running {method} ...", flush=True)
            results.append(run_method(method, data_dir, ks, chunk))
            last = results[-1]
            if "error" not in last:
                print(f"  {last['seconds']:.2f} s, peak +{last['peak_rss_delta_mib']:.0f} MiB", flush=True)

    print()
    print_table(results, pml_methods[0] if pml_methods else None)
    if args.json:
        report = {
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "worker", "worker_chunk", "data")},
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "load_average_at_end": os.getloadavg(),
            },
            "results": results,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
