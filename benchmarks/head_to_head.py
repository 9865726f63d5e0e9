"""Head to head: the untrained start, STML, PLM and the supervised ceiling, one trainer, three data sets.

Every method shares the data, backbone, 512-d PCA-initialised embedding layer, schedule, evaluation
and seeds; only ``train.method`` and the method's options differ. The supervised ceiling trains with
the train split's labels (its best epoch, chosen with test labels, is an oracle: the ceiling). Per
data set it prints R@1 of the start, the final epoch, the label-free pick (``train.select``), the
best epoch (oracle), the label-free pick's gain over the start and its share of the ceiling's
gain, ``(pick - start) / (ceiling - start)``, and the worst drop below the start after epoch 1
(mean ± std over the seeds), and writes JSON.

    python benchmarks/head_to_head.py --setting head --datasets cub200 plankton106 cars98dev --seeds 0 1 2 \\
        --json benchmarks/results/head_to_head_head.json
    python benchmarks/head_to_head.py --setting cpu --datasets cub200 --rows none stml plm supervised --seeds 0

Settings and data sets are described in ``benchmarks/common.py``. ``--set key=value`` adds overrides to every row.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATASETS, REPO_ROOT, SETTINGS, results_table, run_one, summarize, write_results  # noqa: E402


# Every row uses configs/cub200.yaml (the recipe, its data section replaced by the data set's) except
# *_paper (configs/cub200_paper.yaml). STML and the ceiling keep the recipe's shared settings (embedding
# init, learning rates, momentum, views, kept network) so that only the method differs.
ROWS: dict[str, tuple[list[str], str]] = {
    "none": (["train.method=none"], "pretrained start, same (untrained) embedding layer"),
    "stml": (["train.method=stml"], "STML: contextual similarity + relaxed contrastive + self-distillation"),
    "stml_paper": (
        ["train.method=stml", "train.teacher_view=other"],
        "STML with METHOD.md's literal training defaults and two views (configs/cub200_paper.yaml)",
    ),
    "plm": (["train.method=plm"], "PLM, configs/cub200.yaml recipe"),
    "plm_paper": (["train.method=plm"], "PLM with METHOD.md's literal defaults (configs/cub200_paper.yaml)"),
    "supervised": (
        ["train.method=supervised"],
        "supervised ceiling: multi-similarity loss with the train split's labels (best epoch = oracle)",
    ),
    "plm_no_proxies": (["train.method=plm", "plm.num_proxies=0"], "ablation: no proxies"),
    "plm_no_subset": (["train.method=plm", "plm.subset_selection=false"], "ablation: no subset selection (5-NN + PCA)"),
    "plm_binary": (["train.method=plm", "plm.binary=true"], "ablation: binary similarity"),
    "plm_n_beta_0": (["train.method=plm", "plm.n_beta=0"], "ablation: N_β = 0"),
    "plm_proxies_100": (["train.method=plm", "plm.num_proxies=100"], "N_ρ = 100"),
    "plm_proxies_600": (["train.method=plm", "plm.num_proxies=600"], "N_ρ = 600"),
}
PAPER_BASE = {"plm_paper", "stml_paper"}
DEFAULT_ROWS = ["none", "stml", "stml_paper", "plm", "plm_paper", "supervised"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="head")
    parser.add_argument("--datasets", nargs="*", default=["cub200"], choices=sorted(DATASETS))
    parser.add_argument(
        "--rows", nargs="*", default=None, help=f"default: {' '.join(DEFAULT_ROWS)}; from {', '.join(ROWS)}"
    )
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--data-root", default=None, help="one data set's folder (default ../shared/data/<name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "head_to_head"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    names = args.rows or DEFAULT_ROWS
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    if args.data_root and len(args.datasets) > 1:
        parser.error("--data-root names one data set's folder: give one --datasets")

    results: dict = {}
    for dataset in args.datasets:
        for name in names:
            runs = []
            for seed in args.seeds:
                out = Path(args.out) / args.setting / dataset / f"{name}-seed{seed}"
                base = "cub200_paper.yaml" if name in PAPER_BASE else "cub200.yaml"
                overrides = [*ROWS[name][0], *args.set]
                run = run_one(args.setting, overrides, seed, out, args.data_root, base=base, dataset=dataset)
                runs.append(run)
                print(
                    f"{dataset} {name} seed {seed}: start {100 * run['start']['recall@1']:.2f} "
                    f"final {100 * run['final']['recall@1']:.2f} pick {100 * run['selected']['recall@1']:.2f} "
                    f"(epoch {run['selected_epoch']}) ({run['seconds']}s)",
                    flush=True,
                )
            results[f"{dataset}/{name}"] = {
                "dataset": dataset,
                "row": name,
                "description": ROWS[name][1],
                "runs": runs,
                "summary": summarize(runs),
            }
            if args.json:
                write_results(args.json, args.setting, args.set, args.seeds, results)

    n = len(args.seeds)
    print(f"\nsetting '{args.setting}', seeds {args.seeds}: R@1 (%) on each data set's unseen test classes")
    for dataset in args.datasets:
        print("\n" + "\n".join(results_table(results, dataset, n)))
    if args.json:
        write_results(args.json, args.setting, args.set, args.seeds, results)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
