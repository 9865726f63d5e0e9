"""Speed of the PLM machinery beside one backbone training step, in the same run.

Times, at B = 120, d = 512, m = 2, N_ρ = 300 (defaults), the pieces (greedy subset selection),
the point-point and proxy-point similarities, the three losses forward + backward, and the
whole ``PLMLoss`` forward + backward; the whole ``PLMLoss`` with the presets' recipe (no proxies,
point targets from 1280-d pooled features; issue 19's target: at most 25 ms on two CPU cores),
and with the teacher's 512-d embedding as targets; and one EfficientNet-Lite0
(``tf_efficientnet_lite0``, random weights: the speed is the same) forward + backward at batch B,
128 px. The timings are interleaved, repeated, and reported as medians; the headline is the ratio
of the whole PLM step to the backbone step (target: under 5 %).

    python benchmarks/manifold_speed.py [--device cpu] [--repeats 7] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from plmetric.methods.losses import neighbourhood_loss, point_loss, proxy_loss
from plmetric.manifold.pieces import fit_pieces, point_similarity, proxy_point_similarity
from plmetric.config.schema import load_config
from plmetric.methods.plm import PLMLoss

RECIPE_NAME = "PLMLoss fwd+bwd, the recipe (features 1280-d, no proxies)"


def clustered_embeddings(n: int, d: int, group: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """Unit vectors in groups of `group` close points, like a neighbourhood-sampled batch."""
    centres = F.normalize(torch.randn((n + group - 1) // group, d, generator=generator), dim=1)
    x = centres.repeat_interleave(group, 0)[:n] + noise * torch.randn(n, d, generator=generator)
    return F.normalize(x, dim=1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=120)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--feature-dim", type=int, default=1280, help="pooled features of the recipe's targets")
    parser.add_argument("--m", type=int, default=2)
    parser.add_argument("--proxies", type=int, default=300)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds; medians are reported")
    parser.add_argument("--inner", type=int, default=5, help="PLM timings per round (they are short)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="write the timings here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    import timm

    g = torch.Generator().manual_seed(0)
    teacher = clustered_embeddings(args.batch, args.dim, 5, 0.15, g).to(device)
    student = (teacher + 0.05 * torch.randn(args.batch, args.dim, generator=g).to(device)).requires_grad_()
    criterion = PLMLoss(args.dim, num_proxies=args.proxies, m=args.m).to(device)
    criterion.proxies.init_from_embeddings(clustered_embeddings(2000, args.dim, 5, 0.15, g).to(device), generator=g)
    proxies = criterion.proxies

    features = clustered_embeddings(args.batch, args.feature_dim, 5, 0.15, g).to(device)
    recipe = load_config("cub200").plm  # the presets' PLM options (no proxies, feature targets)
    recipe_criterion = PLMLoss(args.dim, recipe).to(device)
    embedding_criterion = PLMLoss(args.dim, recipe, target_space="embedding").to(device)

    backbone = timm.create_model("tf_efficientnet_lite0", pretrained=False).to(device).train()
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g).to(device)

    pieces = fit_pieces(teacher, m=args.m)
    with torch.no_grad():
        s_point = point_similarity(pieces)
        s_proxy = proxy_point_similarity(pieces, proxies.locations, proxies.bases)

    def backbone_step() -> None:
        backbone.zero_grad(set_to_none=True)
        backbone(images).float().pow(2).mean().backward()

    def plm_step() -> None:
        student.grad = None
        criterion.zero_grad(set_to_none=True)
        criterion.terms(student, teacher)["loss"].backward()

    def recipe_step() -> None:
        student.grad = None
        recipe_criterion.terms(student, teacher, features)["loss"].backward()

    def embedding_targets_step() -> None:
        student.grad = None
        embedding_criterion.terms(student, teacher)["loss"].backward()

    def losses_step() -> None:
        student.grad = None
        criterion.zero_grad(set_to_none=True)
        locations, bases = proxies()
        loss = (
            point_loss(student, s_point)
            + proxy_loss(student, s_proxy, locations)
            + neighbourhood_loss(teacher, locations, bases, s_proxy)
        )
        loss.backward()

    def proxy_similarity_step() -> None:
        with torch.no_grad():
            proxy_point_similarity(pieces, proxies.locations, proxies.bases)

    def point_similarity_step() -> None:
        with torch.no_grad():
            point_similarity(pieces)

    parts: dict[str, Callable[[], None]] = {
        "pieces (greedy subset selection)": lambda: fit_pieces(teacher, m=args.m),
        "pieces (plain kNN + PCA, ablation)": lambda: fit_pieces(teacher, m=args.m, subset_selection=False),
        "point-point similarity": point_similarity_step,
        "proxy-point similarity": proxy_similarity_step,
        "three losses fwd+bwd": losses_step,
        "PLM total: PLMLoss fwd+bwd": plm_step,
        RECIPE_NAME: recipe_step,
        "PLMLoss fwd+bwd, embedding targets, no proxies": embedding_targets_step,
    }
    backbone_name = f"EfficientNet-Lite0 fwd+bwd ({args.batch}x3x{args.image_size}x{args.image_size})"

    backbone_step()  # warm-up
    for fn in parts.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in [*parts, backbone_name]}
    for _ in range(args.repeats):
        times[backbone_name].append(timed(backbone_step, device))
        for name, fn in parts.items():
            times[name].extend(timed(fn, device) for _ in range(args.inner))

    medians = {name: statistics.median(values) for name, values in times.items()}
    step = medians[backbone_name]
    total = medians["PLM total: PLMLoss fwd+bwd"]
    print(
        f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"B={args.batch} d={args.dim} m={args.m} N_rho={args.proxies}; medians of "
        f"{args.repeats} (backbone) / {args.repeats * args.inner} (PLM) timings"
    )
    print(f"{'part':48s} {'median ms':>10s} {'min ms':>8s} {'% of backbone':>14s}")
    for name, values in times.items():
        print(f"{name:48s} {1e3 * medians[name]:10.2f} {1e3 * min(values):8.2f} {100 * medians[name] / step:13.2f}%")
    ratio = total / step
    verdict = "under" if ratio < 0.05 else "OVER"
    print(f"ratio PLM total / backbone step = {100 * ratio:.2f} % ({verdict} the 5 % target)")
    recipe_ms = 1e3 * medians[RECIPE_NAME]
    print(f"the presets' recipe: {recipe_ms:.1f} ms ({'within' if recipe_ms <= 25 else 'OVER'} issue 19's 25 ms)")

    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.platform(),
            "processor": platform.processor(),
            "median_s": medians,
            "times_s": times,
            "ratio_plm_to_backbone": ratio,
        }
        args.json.write_text(json.dumps(record, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
