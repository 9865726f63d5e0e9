"""How good is each label-free stopping rule? Regret and rank correlation over every run of the studies.

Reads the JSON of ``head_to_head.py`` / ``recipe_study.py`` runs (each run holds R@1 and the
selection criteria of the start, epoch 0, and of every epoch) and, for each rule of
``plmetric.evaluation.selection.SELECTION_RULES`` (``final``: the last epoch; otherwise the epoch that
maximises the criterion, the start included):

* regret: R@1 of the label-chosen best epoch (an oracle, the start included) minus R@1 of the
  epoch the rule picks, mean and max over the runs (x100);
* Spearman's rank correlation of the criterion with test R@1 over the epochs of a run, averaged
  over the runs;
* the same per data set and per method (row).

Runs of the ``none`` method (nothing to select) are left out.

    python benchmarks/selection_report.py benchmarks/results/head_to_head_head.json \\
        benchmarks/results/recipe_head.json \\
        --json benchmarks/results/selection_report.json
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from plmetric.evaluation.selection import ANCHOR_EXPONENT, SELECTION_RULES  # noqa: E402


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN for fewer than 3 points or a constant side."""
    if len(a) < 3:
        return math.nan

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var > 0 else math.nan


def run_curve(run: dict) -> tuple[dict[int, float], dict[int, dict]]:
    """R@1 by epoch (the start as epoch 0) and the criteria by epoch."""
    r1 = {0: run["start"]["recall@1"], **{int(e): v for e, v in run["r1_by_epoch"]}}
    criteria = {int(e): dict(c) for e, c in run.get("selection_by_epoch", []) if c}
    for c in criteria.values():  # runs logged before anchored_mutual_knn existed: it is a function of two
        if "anchored_mutual_knn" not in c and {"mutual_knn", "start_agreement"} <= set(c):
            c["anchored_mutual_knn"] = c["mutual_knn"] * c["start_agreement"] ** ANCHOR_EXPONENT
    return r1, criteria


# Candidate rules beyond the library's (explored here; a rule that wins is moved into
# plmetric.evaluation.selection): name -> score of an epoch's criteria (the epoch with the highest is picked).
EXTRA_RULES = {
    f"mutual*agreement^{a}": (lambda c, a=a: c["mutual_knn"] * c["start_agreement"] ** a) for a in (0.25, 0.5, 2.0)
}


EXTRA_NEEDS = {name: {"mutual_knn", "start_agreement"} for name in EXTRA_RULES}


def score(rule: str, criteria: dict) -> float:
    return EXTRA_RULES[rule](criteria) if rule in EXTRA_RULES else criteria[rule]


def pick(rule: str, r1: dict[int, float], criteria: dict[int, dict]) -> int:
    epochs = sorted(e for e in r1 if e in criteria)
    if rule == "final":
        return max(r1)
    return max(epochs, key=lambda e: (score(rule, criteria[e]), -e))


def evaluate(runs: list[dict]) -> dict:
    """Per rule: mean/max regret (x100) and mean Spearman correlation, overall, by data set, by row."""
    table: dict = {}
    for rule in (*SELECTION_RULES, *EXTRA_RULES):
        regrets, rhos = defaultdict(list), defaultdict(list)
        for run in runs:
            r1, criteria = run_curve(run)
            if not criteria:
                continue
            needed = EXTRA_NEEDS.get(rule, {rule}) if rule != "final" else set()
            if any(not needed <= set(c) for c in criteria.values()):
                continue  # a run logged before this criterion existed
            oracle = max(r1.values())
            chosen = pick(rule, r1, criteria)
            regret = 100 * (oracle - r1[chosen])
            for key in ("all", f"dataset:{run['dataset']}", f"row:{run['row']}"):
                regrets[key].append(regret)
                if rule != "final":
                    epochs = sorted(e for e in r1 if e in criteria)
                    rho = spearman([score(rule, criteria[e]) for e in epochs], [r1[e] for e in epochs])
                    if not math.isnan(rho):
                        rhos[key].append(rho)
        table[rule] = {
            key: {
                "runs": len(values),
                "regret_mean": statistics.fmean(values),
                "regret_max": max(values),
                "spearman_mean": statistics.fmean(rhos[key]) if rhos.get(key) else None,
            }
            for key, values in regrets.items()
        }
    return table


def picks(entries: list[dict], rule: str) -> list[dict]:
    """Per (data set, row): R@1 (x100, mean ± std over seeds) of the start, the final epoch, the
    epoch ``rule`` picks (the start included), the best epoch (an oracle), the pick's gain and share of
    the ceiling's gain (the best epoch of the ``supervised``/``ceiling`` row of the same data set,
    over every study given), and the worst R@1 below the start after epoch 1."""
    ceilings: dict[str, list[float]] = defaultdict(list)
    for entry in entries:
        if entry["row"] in ("supervised", "ceiling"):
            ceilings[entry["dataset"]] += [max(run_curve(run)[0].values()) for run in entry["runs"]]

    def mean_std(values: list[float]) -> tuple[float, float]:
        return 100 * statistics.fmean(values), 100 * (statistics.stdev(values) if len(values) > 1 else 0.0)

    rows = []
    for entry in entries:
        starts, finals, picked, bests, worsts, epochs = [], [], [], [], [], []
        for run in entry["runs"]:
            r1, criteria = run_curve(run)
            unscored = not criteria or rule != "final" and not all(rule in c for c in criteria.values())
            if unscored and entry["row"] != "none":
                break  # a run logged before this criterion existed
            chosen = max(r1) if entry["row"] == "none" else pick(rule, r1, criteria)
            starts.append(r1[0])
            finals.append(r1[max(r1)])
            picked.append(r1[chosen])
            bests.append(max(r1.values()))
            later = [v for e, v in r1.items() if e > 1] or [r1[max(r1)]]
            worsts.append(min(later) - r1[0])
            epochs.append(chosen)
        else:
            ceiling = statistics.fmean(ceilings[entry["dataset"]]) if ceilings.get(entry["dataset"]) else math.nan
            start = statistics.fmean(starts)
            room = ceiling - start
            gain = statistics.fmean(picked) - start
            rows.append(
                {
                    "dataset": entry["dataset"],
                    "row": entry["row"],
                    "seeds": len(starts),
                    "start": mean_std(starts),
                    "final": mean_std(finals),
                    "pick": mean_std(picked),
                    "pick_epochs": epochs,
                    "best_oracle": mean_std(bests),
                    "gain_pick": 100 * gain,
                    "ceiling_oracle": 100 * ceiling,
                    "share_of_ceiling": gain / room if room > 0 else math.nan,
                    "worst_after_epoch1": mean_std(worsts),
                }
            )
    return rows


def print_picks(rows: list[dict], rule: str) -> None:
    def f(pair: tuple[float, float]) -> str:
        return f"{pair[0]:.2f} ± {pair[1]:.2f}"

    print(
        f"\nR@1 at the epoch {rule} picks (mean ± std over seeds; "
        "ceiling = the supervised row's best epoch, an oracle)\n"
    )
    print(
        "| data set | row | seeds | start | final | pick | pick epochs | best (oracle) | pick - start "
        "| share of ceiling | worst after ep 1 |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dataset']} | {r['row']} | {r['seeds']} | {r['start'][0]:.2f} | {f(r['final'])} | {f(r['pick'])} | "
            f"{' '.join(map(str, r['pick_epochs']))} | {f(r['best_oracle'])} | {r['gain_pick']:+.2f} | "
            f"{100 * r['share_of_ceiling']:.0f}% | {r['worst_after_epoch1'][0]:+.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="+", help="JSON files written by head_to_head.py or recipe_study.py")
    parser.add_argument("--picks", default="mutual_knn", help="the rule whose picks are tabulated per row")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    runs, entries = [], []
    for path in args.studies:
        study = json.loads(Path(path).read_text())
        for entry in study["results"].values():
            entries.append({**entry, "row": entry.get("row", "?"), "dataset": entry.get("dataset", "?")})
            if entry.get("row") == "none":
                continue
            runs += [
                {**run, "row": entry.get("row", "?"), "dataset": entry.get("dataset", "?")} for run in entry["runs"]
            ]
    table = evaluate(runs)
    keys = sorted({k for rule in table.values() for k in rule}, key=lambda k: (k != "all", k))
    print(f"{len(runs)} runs from {len(args.studies)} studies: regret (x100 R@1, mean / max) and mean Spearman rho\n")
    print("| rule | " + " | ".join(keys) + " |")
    print("|---" * (len(keys) + 1) + "|")
    for rule, by_key in table.items():
        cells = []
        for key in keys:
            s = by_key.get(key)
            if s is None:
                cells.append("")
                continue
            rho = "" if s["spearman_mean"] is None else f", ρ {s['spearman_mean']:+.2f}"
            cells.append(f"{s['regret_mean']:.2f} / {s['regret_max']:.2f}{rho}")
        print(f"| {rule} | " + " | ".join(cells) + " |")
    merged: dict[tuple[str, str], dict] = {}  # one row per (data set, row): studies split by seeds combine
    for entry in entries:
        key = (entry["dataset"], entry["row"])
        if key in merged:
            merged[key] = {**merged[key], "runs": merged[key]["runs"] + entry["runs"]}
        else:
            merged[key] = entry
    picked = picks(list(merged.values()), args.picks)
    print_picks(picked, args.picks)
    if args.json:
        from plmetric.core.checkpoint import atomic_write_json

        atomic_write_json(
            args.json, {"studies": args.studies, "runs": len(runs), "rules": table, "picks": {args.picks: picked}}
        )
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
