"""Head to head (issue 6): the untrained start, STML and PLM with the paper's ablations, one trainer.

Every method shares the data, backbone, 512-d PCA-initialised embedding layer, neighbourhood
sampler, schedule, evaluation and seeds; only ``train.method`` and the method's options differ.
Prints R@1/2/4/8 of the final epoch (mean ± std over the seeds) and writes JSON.

    python benchmarks/head_to_head.py --setting head --seeds 0 1 2 --json benchmarks/results/head_to_head_head.json
    python benchmarks/head_to_head.py --setting cpu --seeds 0 1 2 --rows none stml plm --json ...
    python benchmarks/head_to_head.py --setting gpu --rows none stml plm     # one lent GPU call

Settings are described in ``benchmarks/common.py``. ``--set key=value`` adds overrides to every row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SETTINGS, fmt, run_one, summarize, write_results  # noqa: E402

from plmetric.paths import REPO_ROOT, cub_subset_root  # noqa: E402

# Every row uses configs/cub200.yaml (the recipe) except *_paper (configs/cub200_paper.yaml). STML keeps the
# recipe's shared settings (embedding init, learning rates, momentum, views, kept network) so that only the
# method differs.
ROWS: dict[str, tuple[list[str], str]] = {
    "none": (["train.method=none"], "pretrained start, same (untrained) embedding layer"),
    "stml": (["train.method=stml"], "STML: contextual similarity + relaxed contrastive + self-distillation"),
    "stml_paper": (
        ["train.method=stml", "train.teacher_view=other"],
        "STML with METHOD.md's literal training defaults and two views (configs/cub200_paper.yaml)",
    ),
    "plm": (["train.method=plm"], "PLM, configs/cub200.yaml recipe"),
    "plm_paper": (["train.method=plm"], "PLM with METHOD.md's literal defaults (configs/cub200_paper.yaml)"),
    "plm_no_proxies": (["train.method=plm", "plm.num_proxies=0"], "ablation: no proxies"),
    "plm_no_subset": (["train.method=plm", "plm.subset_selection=false"], "ablation: no subset selection (5-NN + PCA)"),
    "plm_binary": (["train.method=plm", "plm.binary=true"], "ablation: binary similarity"),
    "plm_n_beta_0": (["train.method=plm", "plm.n_beta=0"], "ablation: N_β = 0"),
    "plm_proxies_100": (["train.method=plm", "plm.num_proxies=100"], "N_ρ = 100"),
    "plm_proxies_600": (["train.method=plm", "plm.num_proxies=600"], "N_ρ = 600"),
}
PAPER_BASE = {"plm_paper", "stml_paper"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="head")
    parser.add_argument("--rows", nargs="*", default=None, help=f"default: all; choose from {', '.join(ROWS)}")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--data-root", default=str(cub_subset_root()))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "head_to_head"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    names = args.rows or list(ROWS)
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if not Path(args.data_root).is_dir():
        parser.error(f"--data-root {args.data_root} does not exist (the CUB subset in the official layout)")

    results = {}
    for name in names:
        runs = []
        for seed in args.seeds:
            out = Path(args.out) / args.setting / f"{name}-seed{seed}"
            base = "cub200_paper.yaml" if name in PAPER_BASE else "cub200.yaml"
            run = run_one(args.setting, [*ROWS[name][0], *args.set], seed, out, args.data_root, base=base)
            runs.append(run)
            print(
                f"{name} seed {seed}: start {100 * run['start']['recall@1']:.2f} "
                f"final {100 * run['final']['recall@1']:.2f} ({run['seconds']}s)"
            )
        results[name] = {"description": ROWS[name][1], "runs": runs, "summary": summarize(runs)}
        if args.json:
            write_results(args.json, args.setting, args.set, args.seeds, results)

    n = len(args.seeds)
    print(f"\nCUB subset, setting '{args.setting}', seeds {args.seeds}: final epoch, 50 unseen test species")
    print(f"{'method':18}" + "".join(f"{k:>16}" for k in ("R@1", "R@2", "R@4", "R@8", "R@1 - start")))
    for name, result in results.items():
        s = result["summary"]
        cells = [fmt(s[f"final_recall@{k}"], n) for k in (1, 2, 4, 8)] + [fmt(s["gain"], n)]
        print(f"{name:18}" + "".join(f"{c:>16}" for c in cells))
    if args.json:
        write_results(args.json, args.setting, args.set, args.seeds, results)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
