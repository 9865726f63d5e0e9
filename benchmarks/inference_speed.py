"""Images through the network on a CPU (issue 28): PyTorch against onnxruntime, and what a user waits for.

1. forward: a batch of 32 at 224 px through EfficientNet-Lite0's pooled features: PyTorch, PyTorch with
   channels_last, onnxruntime through plmetric's runtime (:mod:`plmetric.data.runtime`), in one process;
2. pass: the embedding pass over N real images, decode included: ``embed_dataset`` with ``runtime=torch``
   and ``runtime=onnxruntime`` for 0, 1 and 2 decoding worker processes, against the reference a user
   would write (the ``plmetric export --format onnx`` file run by onnxruntime, the images decoded one
   after the other in the same process);
3. commands (subprocesses, wall time from start to exit): ``plmetric --help``, ``plmetric train --help``,
   ``plmetric index`` of the N images with ``--runtime torch`` and ``auto``, ``plmetric search`` of one
   query on that index (median of 3 runs), ``plmetric train --images`` on the first ``--train-count``
   images with the defaults, its printed estimate against the measured caching and training parts.

    python benchmarks/inference_speed.py --json benchmarks/results/inference_speed.json

Timings on a shared machine are worthless: run it alone, compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cub_subset_root  # noqa: E402

from plmetric.core.checkpoint import atomic_write_json

PLMETRIC = [sys.executable, "-m", "plmetric.cli"]


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_rates(batch: int, size: int, repeats: int) -> dict[str, float]:
    """Images/s of one batch through Lite0's pooled features, three ways, in this process."""
    from plmetric.data.backbones import create_model
    from plmetric.data.runtime import inference_model
    from plmetric.training.cached import PooledTrunk

    net = PooledTrunk(create_model("efficientnet_lite0", embedding_dim=0)).eval()
    x = torch.randn(batch, 3, size, size)
    runner = inference_model(net, (3, size, size), "onnxruntime")
    rates = {}
    with torch.no_grad():
        net(x)
        rates["torch"] = batch / median_seconds(lambda: net(x), repeats)
        net_cl, x_cl = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        net_cl(x_cl)
        rates["torch_channels_last"] = batch / median_seconds(lambda: net_cl(x_cl), repeats)
        net.to(memory_format=torch.contiguous_format)
    from plmetric.data import runtime as rt

    default_rows = rt.ORT_ROWS_PER_RUN
    try:
        for rows in (1, 4, 8, 16, 32):
            rt.ORT_ROWS_PER_RUN = rows
            runner(x)
            rates[f"onnxruntime_rows{rows}"] = batch / median_seconds(lambda: runner(x), repeats)
    finally:
        rt.ORT_ROWS_PER_RUN = default_rows
    rates["onnxruntime"] = rates[f"onnxruntime_rows{default_rows}"]
    with torch.no_grad():
        rates["max_abs_diff"] = float((runner(x) - net(x)).abs().max())
    return rates


def pass_rates(folder: Path, workers: list[int]) -> dict[str, float]:
    """Images/s of the whole embedding pass (decode, resize, network) over the images of ``folder``."""
    import onnxruntime

    from plmetric.core.checkpoint import save_model
    from plmetric.data.backbones import build_transform, create_model
    from plmetric.data.datasets import load_unlabelled_folder
    from plmetric.data.images import open_image
    from plmetric.evaluation.metrics import embed_dataset
    from plmetric.retrieval.export import export_model

    dataset = load_unlabelled_folder(str(folder)).train
    dataset.transform = build_transform("efficientnet_lite0", image_size=224, train=False)
    n = len(dataset)
    model = create_model("efficientnet_lite0", embedding_dim=0).eval()
    rates: dict[str, float] = {}
    from plmetric.data.runtime import inference_model

    start = time.perf_counter()  # the one-time export and check (a later pass finds it in the cache)
    inference_model(model, (3, 224, 224), "onnxruntime")
    rates["first_export_seconds"] = time.perf_counter() - start
    start = time.perf_counter()
    inference_model(model, (3, 224, 224), "onnxruntime")
    rates["cache_hit_seconds"] = time.perf_counter() - start
    for runtime in ("onnxruntime", "torch"):
        for w in workers if runtime == "onnxruntime" else [max(workers)]:
            start = time.perf_counter()
            emb, _, _ = embed_dataset(model, dataset, batch_size=128, num_workers=w, runtime=runtime)
            rates[f"{runtime}_workers{w}"] = n / (time.perf_counter() - start)
            print(f"  pass {runtime:<12} workers {w}: {rates[f'{runtime}_workers{w}']:6.1f} images/s", flush=True)
    # the reference: the exported file, onnxruntime's own session, decode one image after the other
    with tempfile.TemporaryDirectory() as tmp:
        model16 = create_model("efficientnet_lite0", embedding_dim=16)
        ckpt = save_model(Path(tmp) / "m.safetensors", model16, {"backbone": "efficientnet_lite0", "embedding_dim": 16,
                                                                  "image_size": 224})
        export_model(ckpt, Path(tmp) / "m.onnx", "onnx")
        session = onnxruntime.InferenceSession(str(Path(tmp) / "m.onnx"), providers=["CPUExecutionProvider"])
        transform = dataset.transform
        start = time.perf_counter()
        batch = []
        for path in dataset.paths:
            batch.append(transform(open_image(path)).numpy())
            if len(batch) == 32:
                session.run(None, {"images": np.stack(batch)})
                batch = []
        if batch:
            session.run(None, {"images": np.stack(batch)})
        rates["reference_onnxruntime_sequential_decode"] = n / (time.perf_counter() - start)
    print(f"  reference (export + onnxruntime, sequential decode): {rates['reference_onnxruntime_sequential_decode']:6.1f}"
          " images/s", flush=True)
    return rates


def wall(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=cwd)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout + done.stderr


def timed_lines(argv: list[str], env: dict[str, str], cwd: Path) -> list[tuple[float, str]]:
    """Every output line of a command with the seconds since its start when it arrived (progress bars'
    carriage returns split lines too)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    lines, buffer = [], b""
    while True:
        chunk = proc.stdout.read1(4096)
        if not chunk:
            break
        buffer += chunk
        *done, buffer = re.split(rb"[\r\n]", buffer)
        lines += [(time.perf_counter() - start, d.decode(errors="replace")) for d in done if d.strip()]
    proc.wait()
    lines.append((time.perf_counter() - start, buffer.decode(errors="replace")))
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {lines[-5:]}")
    return lines


def train_parts(lines: list[tuple[float, str]]) -> dict[str, float]:
    """The estimate printed by ``train --images`` and the measured parts: caching from the estimate line to
    the last caching progress line, training from there to the exit."""
    estimate = next(text for _, text in lines if "expected about" in text)
    numbers = re.search(r"caching ([0-9.]+) min, training ([0-9.]+) min", estimate)
    t_estimate = next(t for t, text in lines if "expected about" in text)
    t_cached = max(t for t, text in lines if "caching views" in text)
    return {
        "estimate_caching_s": 60 * float(numbers.group(1)),
        "estimate_training_s": 60 * float(numbers.group(2)),
        "caching_s": t_cached - t_estimate,
        "training_s": lines[-1][0] - t_cached,
        "whole_command_s": lines[-1][0],
        "before_caching_s": t_estimate,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=None, help="a folder of images (default: the CUB subset's first --count)")
    parser.add_argument("--count", type=int, default=1000, help="images for the pass and the index")
    parser.add_argument("--train-count", type=int, default=1000, help="images of the train --images pile")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="plmetric-speed-"))
    env = {**os.environ, "PLMETRIC_CACHE": str(tmp / "cache")}
    os.environ["PLMETRIC_CACHE"] = env["PLMETRIC_CACHE"]
    source = Path(args.images) if args.images else cub_subset_root() / "CUB_200_2011" / "images"
    files = sorted(p for p in source.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if len(files) < args.count:
        raise SystemExit(f"{source} holds {len(files)} images; --count {args.count} asked")
    # every 2nd image of the sorted list: all classes, fewer per class
    pile = tmp / "pile"
    pile.mkdir()
    step = max(1, len(files) // args.count)
    for i, path in enumerate(files[::step][: args.count]):
        shutil.copy(path, pile / f"{i:05d}{path.suffix.lower()}")
    result: dict = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "processor": platform.processor() or platform.machine()},
        "images": {"source": str(source), "count": args.count},
    }
    import onnxruntime

    result["machine"]["onnxruntime"] = onnxruntime.__version__
    print("1. forward, batch 32 at 224 px, Lite0 pooled features", flush=True)
    result["forward_images_per_s"] = forward_rates(32, 224, 5)
    for k, v in result["forward_images_per_s"].items():
        print(f"  {k:<22} {v:8.3g}")
    print(f"2. the embedding pass over {args.count} images, decode included", flush=True)
    result["pass_images_per_s"] = pass_rates(pile, args.workers)
    print("3. commands", flush=True)
    commands: dict[str, float] = {}
    for name, argv in (("help", ["--help"]), ("train_help", ["train", "--help"])):
        commands[f"{name}_s"] = statistics.median(wall([*PLMETRIC, *argv], env, tmp)[0] for _ in range(5))
        print(f"  plmetric {' '.join(argv)}: {commands[f'{name}_s']:.2f} s", flush=True)
    for runtime in ("torch", "auto"):
        seconds, _ = wall([*PLMETRIC, "index", str(pile), "--out", str(tmp / f"{runtime}.safetensors"),
                           "--runtime", runtime, "--no-progress"], env, tmp)
        commands[f"index_{runtime}_s"] = seconds
        commands[f"index_{runtime}_images_per_s"] = args.count / seconds
        print(f"  plmetric index --runtime {runtime}: {seconds:.1f} s ({args.count / seconds:.1f} images/s)", flush=True)
    query = sorted(pile.iterdir())[0]
    for runtime in ("auto", "torch"):
        times = [wall([*PLMETRIC, "search", str(query), "--index", str(tmp / "auto.safetensors"), "--runtime", runtime,
                       "--out", str(tmp / f"q{i}.png")], env, tmp)[0] for i in range(3)]
        commands[f"search_one_query_{runtime}_s"] = statistics.median(times)
        print(f"  plmetric search (one query) --runtime {runtime}: {statistics.median(times):.2f} s", flush=True)
    result["commands"] = commands
    if not args.skip_train:
        train_pile = tmp / "train_pile"
        train_pile.mkdir()
        for path in sorted(pile.iterdir())[: args.train_count]:
            shutil.copy(path, train_pile / path.name)
        lines = timed_lines([*PLMETRIC, "train", "--images", str(train_pile), "--out", str(tmp / "run")], env, tmp)
        parts = train_parts(lines)
        for part in ("caching", "training"):
            parts[f"{part}_estimate_error"] = parts[f"estimate_{part}_s"] / max(parts[f"{part}_s"], 1e-9) - 1
        result["train_images"] = {"images": args.train_count, **parts}
        print(f"  plmetric train --images ({args.train_count} images): {parts['whole_command_s']:.0f} s; caching "
              f"{parts['caching_s']:.0f} s (estimated {parts['estimate_caching_s']:.0f}), training "
              f"{parts['training_s']:.0f} s (estimated {parts['estimate_training_s']:.0f})", flush=True)
    forward, passes = result["forward_images_per_s"], result["pass_images_per_s"]
    best = max(v for k, v in passes.items() if k.startswith("onnxruntime"))
    result["ratios"] = {
        "forward_onnxruntime_over_torch": forward["onnxruntime"] / forward["torch"],
        "pass_best_over_reference": best / passes["reference_onnxruntime_sequential_decode"],
        "pass_2_workers_over_reference": passes.get("onnxruntime_workers2", float("nan"))
        / passes["reference_onnxruntime_sequential_decode"],
        "pass_best_over_torch": best / passes[f"torch_workers{max(args.workers)}"],
        "index_auto_over_torch": commands["index_auto_images_per_s"] / commands["index_torch_images_per_s"],
    }
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()))
    if args.json:
        atomic_write_json(args.json, result)
        print(f"wrote {args.json}")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
