"""Recipe study: which training choices make PLM improve on its pretrained start, on three data sets?

Runs a grid of levers over ``configs/cub200_paper.yaml`` on each ``--datasets`` entry and prints, per
variant, R@1 of the start, the final epoch, the label-free pick (``train.select``), the best epoch
(chosen with test labels: an oracle), the pick's gain and its share of the supervised ceiling's gain
(the ``ceiling`` variant, run with the train labels), and the worst drop below the start after
epoch 1 (mean ± std over the seeds given).

    python benchmarks/recipe_study.py --setting head --datasets cub200 plankton106 cars98dev --seeds 0 \
        --json benchmarks/results/recipe_head.json
    python benchmarks/recipe_study.py --setting cpu --variants paper recipe --json benchmarks/results/recipe_cpu.json
    python benchmarks/recipe_study.py --setting gpu --variants paper recipe   # one lent GPU call

Settings are described in ``benchmarks/common.py``. ``--set key=value`` adds overrides to every variant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import DATASETS, REPO_ROOT, SETTINGS, results_table, run_one, summarize, write_results  # noqa: E402


RECIPE = [
    "train.keep=teacher",
    "train.momentum=0.99",
    "train.lr_backbone=1e-5",
    "train.lr_embedding=3e-4",
    "train.teacher_view=clean",
]
# name -> (overrides over configs/cub200_paper.yaml, what it tests); "paper" is METHOD.md's defaults,
# "recipe" the default of configs/cub200.yaml. The head setting drops teacher_view (features have one view).
VARIANTS: dict[str, tuple[list[str], str]] = {
    "ceiling": (
        ["train.method=supervised", *RECIPE],
        "supervised ceiling with the recipe's training settings (train labels; best epoch = oracle)",
    ),
    "paper": ([], "METHOD.md defaults: regression onto δ(1 - s), δ fixed 1, N_ρ 300, m 2, N_α 5, N_β 0.5"),
    "recipe": (
        RECIPE,
        "configs/cub200.yaml: gentle learning rates, momentum 0.99, clean teacher view, keep the EMA teacher",
    ),
    "orthogonal_init": (["model.embedding_init=orthogonal"], "random orthogonal embedding layer instead of PCA"),
    "no_proxies": (["plm.num_proxies=0"], "ablation: no proxies"),
    "proxies_100": (["plm.num_proxies=100"], "N_ρ = 100"),
    "no_subset_selection": (["plm.subset_selection=false"], "ablation: pieces from 5-NN + PCA"),
    "binary": (["plm.binary=true"], "ablation: binary similarity"),
    "n_beta_0": (["plm.n_beta=0"], "ablation: no decay along the piece"),
    "m3": (["plm.m=3"], "3-d pieces"),
    "n_alpha_3": (["plm.n_alpha=3"], "N_α = 3"),
    "n_alpha_8": (["plm.n_alpha=8"], "N_α = 8"),
    "sym_min": (["plm.symmetrize=min"], "symmetrisation by min"),
    "delta_batch": (["plm.delta_mode=batch"], "δ set so the mean target equals the mean distance"),
    "delta_teacher": (["plm.delta_mode=teacher"], "per-pair δ from the teacher's distances"),
    "contrastive": (["plm.loss_form=contrastive"], "STML's relaxed contrastive form with W = s, row-normalised"),
    "row_normalized": (["plm.normalize_rows=true"], "regression on row-normalised distances (as STML)"),
    "dim_1280": (["model.embedding_dim=1280"], "1280-d embedding layer (a full PCA rotation of the features)"),
    "momentum_0.99": (["train.momentum=0.99"], "teacher momentum 0.99"),
    "keep_teacher": (["train.keep=teacher"], "evaluate and keep the EMA teacher"),
    "lr_emb_3e-4": (["train.lr_embedding=3e-4"], "embedding lr 3e-4"),
    "lr_emb_3e-3": (["train.lr_embedding=3e-3"], "embedding lr 3e-3"),
    "neighbours_3": (["train.neighbours_per_seed=3"], "k = 3 neighbours per seed"),
    "lr_backbone_1e-5": (["train.lr_backbone=1e-5"], "backbone lr 1e-5"),
    "head_warmup": (["train.head_warmup_epochs=1"], "backbone frozen for the first epoch"),
    "bn_updated": (["model.freeze_bn=false"], "BatchNorm statistics updated"),
    "crop_0.5": (["data.crop_scale_min=0.5"], "milder crops (scale 0.5-1)"),
    "teacher_clean": (["train.teacher_view=clean"], "the teacher sees the un-augmented image, the student a crop"),
    # the design questions of the three-data-set study, each over the recipe
    "recipe_features": ([*RECIPE, "plm.target_space=features"], "recipe, manifold of the teacher's pooled features"),
    "recipe_local": ([*RECIPE, "plm.pair_scope=neighbourhood"], "recipe, pairs inside neighbourhoods + margin"),
    "recipe_m3": ([*RECIPE, "plm.m=3"], "recipe, 3-d pieces"),
    "recipe_delta_batch": ([*RECIPE, "plm.delta_mode=batch"], "recipe, δ matched to the batch's distances"),
    "recipe_no_proxies": ([*RECIPE, "plm.num_proxies=0"], "recipe without proxies"),
    "recipe_lr_emb_1e-3": ([*RECIPE, "train.lr_embedding=1e-3"], "recipe, embedding lr 1e-3"),
    "recipe_60_epochs": ([*RECIPE, "train.epochs=60"], "recipe, twice as long"),
    "recipe_momentum_0.999": ([*RECIPE, "train.momentum=0.999"], "recipe, slower teacher"),
    "recipe_features_lr_1e-3": (
        [*RECIPE, "plm.target_space=features", "train.lr_embedding=1e-3"],
        "recipe, feature manifold, embedding lr 1e-3",
    ),
    "recipe_features_m3": ([*RECIPE, "plm.target_space=features", "plm.m=3"], "recipe, feature manifold, 3-d pieces"),
    "recipe_features_contrastive": (
        [*RECIPE, "plm.target_space=features", "plm.loss_form=contrastive"],
        "recipe, feature manifold, STML's relaxed contrastive form",
    ),
    "recipe_features_no_proxies": (
        [*RECIPE, "plm.target_space=features", "plm.num_proxies=0"],
        "recipe, feature manifold, no proxies",
    ),
    "recipe_contrastive": ([*RECIPE, "plm.loss_form=contrastive"], "recipe, STML's relaxed contrastive form"),
    "ceiling_lr_3e-3": (
        ["train.method=supervised", *RECIPE, "train.lr_embedding=3e-3"],
        "supervised ceiling, embedding lr 3e-3 (is the ceiling's schedule holding it back?)",
    ),
    "ceiling_student": (
        ["train.method=supervised", *RECIPE, "train.keep=student", "train.lr_embedding=1e-3"],
        "supervised ceiling, the student kept, embedding lr 1e-3",
    ),
    # issue 19: targets that improve with the model, pieces on mutual neighbours (all without proxies)
    "i19_features": (
        [*RECIPE, "plm.num_proxies=0", "plm.target_space=features"],
        "the committed recipe: point targets from the (fixed) pooled features",
    ),
    "i19_embedding": ([*RECIPE, "plm.num_proxies=0"], "targets from the EMA teacher's embedding (improve with it)"),
    "i19_embedding_lr_1e-3": (
        [*RECIPE, "plm.num_proxies=0", "train.lr_embedding=1e-3"],
        "embedding targets, embedding lr 1e-3 (the pile recipe)",
    ),
    "i19_blend": (
        [*RECIPE, "plm.num_proxies=0", "plm.target_space=blend"],
        "s = (s_features + s_embedding) / 2 throughout",
    ),
    "i19_anneal": (
        [*RECIPE, "plm.num_proxies=0", "plm.target_space=anneal"],
        "targets anneal from the features (start) to the teacher's embedding (end)",
    ),
    "i19_features_mutual": (
        [*RECIPE, "plm.num_proxies=0", "plm.target_space=features", "plm.neighbourhoods=mutual"],
        "feature targets, pieces grown on mutual nearest neighbours only",
    ),
    "i19_embedding_mutual": (
        [*RECIPE, "plm.num_proxies=0", "plm.neighbourhoods=mutual"],
        "embedding targets, pieces grown on mutual nearest neighbours only",
    ),
    "i19_anneal_mutual": (
        [*RECIPE, "plm.num_proxies=0", "plm.target_space=anneal", "plm.neighbourhoods=mutual"],
        "annealed targets, pieces grown on mutual nearest neighbours only",
    ),
    "i19_anneal_contrastive": (
        [*RECIPE, "plm.num_proxies=0", "plm.target_space=anneal", "plm.loss_form=contrastive"],
        "annealed targets, STML's relaxed contrastive form with W = s",
    ),
    "i19_anneal_mutual_contrastive": (
        [
            *RECIPE,
            "plm.num_proxies=0",
            "plm.target_space=anneal",
            "plm.neighbourhoods=mutual",
            "plm.loss_form=contrastive",
        ],
        "annealed targets, mutual pieces, relaxed contrastive form",
    ),
    "i19_features_contrastive": (
        [*RECIPE, "plm.num_proxies=0", "plm.target_space=features", "plm.loss_form=contrastive"],
        "feature targets, relaxed contrastive form",
    ),
    "i19_features_mutual_contrastive": (
        [*RECIPE, "plm.num_proxies=0", "plm.target_space=features", "plm.neighbourhoods=mutual", "plm.loss_form=contrastive"],
        "feature targets, mutual pieces, relaxed contrastive form",
    ),
}
BACKBONE_LEVERS = {"lr_backbone_1e-5", "head_warmup", "bn_updated", "crop_0.5", "teacher_clean"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="head")
    parser.add_argument("--datasets", nargs="*", default=["cub200"], choices=sorted(DATASETS))
    parser.add_argument("--variants", nargs="*", default=None, help=f"default: all; choose from {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--data-root", default=None, help="one data set's folder (default ../shared/data/<name>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "recipe_study"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    names = args.variants or [v for v in VARIANTS if args.setting != "head" or v not in BACKBONE_LEVERS]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.data_root and len(args.datasets) > 1:
        parser.error("--data-root names one data set's folder: give one --datasets")

    results: dict = {}
    for dataset in args.datasets:
        for name in names:
            overrides = [*VARIANTS[name][0], *args.set]
            runs = []
            for seed in args.seeds:
                out = Path(args.out) / args.setting / dataset / f"{name}-seed{seed}"
                run = run_one(args.setting, overrides, seed, out, args.data_root, dataset=dataset)
                runs.append(run)
                trajectory = " ".join(f"{100 * v:.2f}" for _, v in run["r1_by_epoch"])
                print(
                    f"{dataset} {name} seed {seed}: start {100 * run['start']['recall@1']:.2f} | {trajectory} | "
                    f"pick {100 * run['selected']['recall@1']:.2f} (epoch {run['selected_epoch']}) ({run['seconds']}s)",
                    flush=True,
                )
            results[f"{dataset}/{name}"] = {
                "dataset": dataset,
                "row": name,
                "description": VARIANTS[name][1],
                "runs": runs,
                "summary": summarize(runs),
            }
            if args.json:  # after every variant, so a stopped study keeps what it measured
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
