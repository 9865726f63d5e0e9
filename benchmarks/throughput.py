"""Training throughput against the backbone's own ceiling (issue 7), in one run on one device.

1. bare: the backbone + embedding layer alone, forward + backward + AdamW on synthetic input;
2. plm step: plmetric's full PLM training step (`plmetric.training.loop.TrainStep`: teacher forward,
   student forward/backward, PLM loss with pieces and proxies, AdamW, EMA, memory bank) on
   synthetic input, plus the share of its parts measured on their own;
3. epoch: one real training epoch of `plmetric.training.loop.train` on ``cub200_subset100``
   (sampler, input pipeline, step), the images/s the trainer logs, for each input pipeline asked for.

All as images per second and as a ratio to (1). bf16 autocast + channels_last on CUDA, as in training.

    python benchmarks/throughput.py --json benchmarks/results/throughput_cpu.json           # CPU: batch 60, 128 px
    python benchmarks/throughput.py --device cuda --batch-size 240 --image-size 224 --json ...  # a lent GPU

Timings on a shared machine are noisy: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cub_subset_root  # noqa: E402

from plmetric.core.checkpoint import atomic_write_json
from plmetric.config.schema import load_config


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Seconds per call (median of ``steps`` calls after ``warmup`` calls)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def build_config(args: argparse.Namespace, device: torch.device, extra: list[str]):
    return load_config(
        "cub200",
        [
            f"data.root={args.data_root}",
            f"data.image_size={args.image_size}",
            f"data.num_workers={args.num_workers}",
            f"train.batch_size={args.batch_size}",
            f"train.device={device.type}",
            f"train.compile={args.compile}",
            "model.backbone=efficientnet_lite0",
            "model.embedding_dim=512",
            *extra,
        ],
    )


def main() -> None:  # noqa: PLR0915 - one readable measurement script
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 240 on CUDA, 60 on the CPU")
    parser.add_argument("--image-size", type=int, default=None, help="default: 224 on CUDA, 128 on the CPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: 20 CUDA, 4 CPU)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 5 CUDA, 1 CPU)")
    parser.add_argument("--num-workers", type=int, default=None, help="PIL DataLoader workers (default: all cores)")
    parser.add_argument("--pipelines", nargs="*", default=["cached", "pil"], help="input pipelines for (3)")
    parser.add_argument("--skip-epoch", action="store_true", help="only the synthetic measurements (1) and (2)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the networks (train.compile)")
    parser.add_argument("--data-root", default=str(cub_subset_root()))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from plmetric.core.devices import resolve_device
    from plmetric.methods import get_method
    from plmetric.data.backbones import create_model
    from plmetric.training.networks import freeze_batchnorm
    from plmetric.training.optimization import build_optimizer
    from plmetric.training.sampling import MemoryBank, ema_update, make_teacher
    from plmetric.training.loop import TrainStep

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.batch_size = args.batch_size or (240 if cuda else 60)
    args.image_size = args.image_size or (224 if cuda else 128)
    args.steps = args.steps or (20 if cuda else 4)
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.num_workers = args.num_workers if args.num_workers is not None else (os.cpu_count() or 1)
    if not args.skip_epoch and not Path(args.data_root).is_dir():
        parser.error(f"--data-root {args.data_root} does not exist (needed for the real epoch; or --skip-epoch)")
    torch.manual_seed(0)
    b, s = args.batch_size, args.image_size
    cfg = build_config(args, device, [])
    memory_format = torch.channels_last if cuda else torch.preserve_format
    use_bf16 = cuda
    x = torch.randn(b, 3, s, s, device=device).contiguous(memory_format=memory_format)
    results: dict[str, dict] = {}

    # (1) bare backbone step
    model = create_model("efficientnet_lite0", embedding_dim=512).to(device, memory_format=memory_format)
    model.train()
    freeze_batchnorm(model)
    forward = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def bare_step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = forward(x).float()
        optimizer.zero_grad(set_to_none=True)
        out.square().sum().backward()
        optimizer.step()

    def forward_only() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            forward(x)

    bare = timed(bare_step, device, args.warmup, args.steps)
    results["bare backbone step"] = {"seconds_per_step": bare}
    results["forward only (no grad)"] = {"seconds_per_step": timed(forward_only, device, args.warmup, args.steps)}

    # (2) the full PLM step, synthetic input
    student = create_model("efficientnet_lite0", embedding_dim=512).to(device, memory_format=memory_format)
    student.train()
    freeze_batchnorm(student)
    teacher = make_teacher(student)
    bank_size = 3000
    bank = MemoryBank(bank_size, 512, device=device)
    bank.update(torch.arange(bank_size, device=device), torch.randn(bank_size, 512, device=device))
    method = get_method("plm")(cfg)
    objective = method.build_objective(512, bank.embeddings, torch.Generator().manual_seed(0)).to(device)
    optimizer = build_optimizer(cfg.train, student, objective)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    ddp_student = torch.compile(student) if args.compile else student
    step = TrainStep(cfg, method, student, ddp_student, teacher, objective, optimizer, scheduler, bank, device)
    index = torch.randperm(bank_size)[:b]
    results["plm step (synthetic)"] = {
        "seconds_per_step": timed(lambda: step(x, x, index), device, args.warmup, args.steps)
    }

    # its parts, each on its own
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
        t_emb = teacher(x).float()
    s_emb = t_emb.clone().requires_grad_()

    def teacher_forward() -> None:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            teacher(x)

    def loss_part() -> None:
        terms = objective.terms(s_emb, t_emb)
        terms["loss"].backward()

    parts = {
        "part: teacher forward": teacher_forward,
        "part: PLM loss fwd+bwd (pieces, proxies)": loss_part,
        "part: EMA update": lambda: ema_update(teacher, student, 0.999),
        "part: memory-bank update": lambda: bank.update(index.to(device), t_emb),
        "part: neighbour table (once per epoch, not per step)": lambda: bank.neighbours(4),
    }
    for name, fn in parts.items():
        results[name] = {"seconds_per_step": timed(fn, device, args.warmup, args.steps)}

    # (3) one real epoch through the trainer
    if not args.skip_epoch:
        from plmetric.training.loop import train

        for pipeline in args.pipelines:
            run_cfg = build_config(
                args,
                device,
                [
                    f"data.pipeline={pipeline}",
                    "model.embedding_init=orthogonal",
                    "train.epochs=1",
                    "train.eval_every=1000",
                    "train.eval_batch_size=256",
                ],
            )
            run_cfg.train.eval_every = 1000  # no evaluation of a test split inside the timed epoch
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                result = _train_without_test(train, run_cfg, Path(tmp))
                wall = time.perf_counter() - start
            record = result.history[-1]
            results[f"epoch on CUB images ({pipeline})"] = {
                "images_per_second": record["images_per_second"],
                "seconds_per_step": b / record["images_per_second"],
                "epoch_seconds": record["seconds"],
                "run_seconds_incl_setup": wall,
            }

    plm_step = results["plm step (synthetic)"]["seconds_per_step"]
    for name, record in results.items():
        sec = record["seconds_per_step"]
        if name.startswith("part:"):  # a part of the PLM step: its share of the step's time
            record["share_of_plm_step"] = sec / plm_step
            continue
        record.setdefault("images_per_second", b / sec)
        record["ratio_to_bare"] = bare / sec
    device_name = torch.cuda.get_device_name(device) if cuda else f"cpu ({platform.processor() or 'unknown'})"
    print(f"\n{device_name}, batch {b}, {s} px, EfficientNet-Lite0 512-d{', bf16 + channels_last' if cuda else ''}")
    print(f"{'measurement':46}{'images/s':>12}{'ms/step':>12}{'ratio to (1)':>14}")
    for name, record in results.items():
        if name.startswith("part:"):
            share = f"{100 * record['share_of_plm_step']:.1f}% of (2)"
            print(f"{name:46}{'':>12}{1000 * record['seconds_per_step']:12.1f}{share:>14}")
            continue
        print(
            f"{name:46}{record['images_per_second']:12.1f}{1000 * record['seconds_per_step']:12.1f}"
            f"{record['ratio_to_bare']:14.3f}"
        )
    if args.json:
        atomic_write_json(
            args.json,
            {
                "device": device_name,
                "batch_size": b,
                "image_size": s,
                "steps": args.steps,
                "warmup": args.warmup,
                "compile": args.compile,
                "torch": torch.__version__,
                "results": results,
            },
        )
        print(f"wrote {args.json}")


def _train_without_test(train_fn, cfg, out_dir: Path):
    """Train one epoch with the test split dropped (its evaluation is not part of an epoch's throughput)."""
    from plmetric.data.datasets import DatasetSplits, load_dataset
    from plmetric.data.backbones import build_transform

    splits = load_dataset(
        cfg.data.dataset,
        cfg.data.root,
        train_transform=build_transform(
            cfg.model.backbone, cfg.data.image_size, train=True, crop_scale_min=cfg.data.crop_scale_min
        ),
        test_transform=build_transform(cfg.model.backbone, cfg.data.image_size, train=False),
        verbose=False,
    )
    return train_fn(cfg, out_dir, splits=DatasetSplits(splits.name, splits.train, None), progress=False)


if __name__ == "__main__":
    sys.exit(main())
