"""Why the faiss path of evaluation was slower than the torch path: k-NN search and evaluation timed
per backend, k and thread count, wall-clock *and* CPU seconds (CPU time above wall time x threads
means threads waiting for each other or spinning; wall time far above CPU time means the process
was waiting for a core that another process held).

Each case runs in its own child process (fresh thread pools); the data are SOP-like synthetic
embeddings from ``eval_speed.py``.

    nice -n 19 python benchmarks/knn_speed.py --n 20000 --classes 3740 --ks 10,1000 --threads 1,2
    python benchmarks/knn_speed.py --json knn_speed.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_speed import synthetic_embeddings  # noqa: E402

CASES = ("torch-knn", "faiss-knn", "torch-eval", "faiss-eval")


def run_case(case: str, data: Path, k: int, threads: int) -> dict:
    """One case in this process: search the k nearest others of every point, or evaluate with ks up to k."""
    import torch

    torch.set_num_threads(threads)
    x = torch.from_numpy(np.load(data / "embeddings.npy"))
    y = torch.from_numpy(np.load(data / "labels.npy"))
    if case.startswith("faiss"):
        import faiss

        faiss.omp_set_num_threads(threads)
    from plmetric.evaluation.metrics import evaluate, nearest_neighbors

    ks = sorted({1, min(10, k), k})
    wall, cpu = time.perf_counter(), time.process_time()
    backend = case.split("-")[0]
    if case.endswith("knn"):
        nearest_neighbors(x, k, backend=backend)
        result = {}
    else:
        result = evaluate(x, y, ks, backend=backend, compute_nmi=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {"case": case, "k": k, "threads": threads, "wall_s": wall, "cpu_s": cpu, "metrics": result}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="number of embeddings")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=3740, help="classes of 2..12 items (SOP-like)")
    parser.add_argument("--ks", default="10,1000", help="k of the search (evaluation: ks up to k)")
    parser.add_argument("--threads", default="1,2", help="thread counts (torch and faiss alike)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",") if k]
    threads = [int(t) for t in args.threads.split(",") if t]
    if args.worker:
        print(json.dumps(run_case(args.worker, args.data, ks[0], threads[0])))
        return 0
    results = []
    print(f"n={args.n} dim={args.dim} classes={args.classes}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory() as tmp:
        x, y = synthetic_embeddings(args.n, args.dim, args.classes, 2.3, 0)
        np.save(Path(tmp) / "embeddings.npy", x)
        np.save(Path(tmp) / "labels.npy", y)
        for case in args.cases.split(","):
            for k in ks:
                for t in threads:
                    command = [sys.executable, __file__, "--worker", case, "--data", tmp, "--ks", str(k)]
                    done = subprocess.run([*command, "--threads", str(t)], capture_output=True, text=True)
                    if done.returncode:
                        print(f"{case} k={k} threads={t}: failed: {done.stderr.strip().splitlines()[-1:]}")
                        continue
                    r = json.loads(done.stdout.strip().splitlines()[-1])
                    r["load_after"] = os.getloadavg()[0]
                    results.append(r)
                    print(
                        f"{case:11s} k={k:5d} threads={t}: wall {r['wall_s']:7.2f} s  cpu {r['cpu_s']:7.2f} s  "
                        f"(load {r['load_after']:.2f})",
                        flush=True,
                    )
    if args.json:
        report = {
            "config": {k: v for k, v in vars(args).items() if k not in ("json", "worker", "data")},
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "results": results,
        }
        args.json.write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
