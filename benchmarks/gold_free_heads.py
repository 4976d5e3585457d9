"""Heads relearned without gold against the fixed-N curve (issue 29's third target).

Two label folders of one source stand for a deployment's traffic and its future: a head is
trained on one folder's pools (as `t2serve train` does: its train and test splits fit the
probes, its validation split picks the epochs and the margin) and scored on every question
of the other folder against gold, then the folders swap. Each target rule gets the same
probes, seeds and folders:

    gold              the traffic's own gold (what a gold-free rule would like to match)
    gold, calibration only   a gold head on the --calibration folder alone
    majority / share  gold-free (estimator/offline/labels/gold_free.py)
    posterior         the answer posterior fitted on --calibration's gold, pool features only
    posterior+states  the same with the states part (estimator/offline/labels/leader_states.py)
    ... (N* of E[A])  share and posterior with N* taken of the expected curve, not the
                      expected gold N*: the rule before the expected N*, at its tolerance
                      --curve-eps (0.02, as docs/estimator.md ran it: at 0 every such
                      curve peaks at N_max)

Each head's T2 runs at every margin of a grid; its points (mean samples, exact accuracy
mean A_x(N_x)) are set against the fixed-N curve's best accuracy at as many samples. The
summary is the mean height above the curve over the points between 4 and 12 samples,
pooled over both directions by questions, and each rule's share of the gold head's.

    .venv/bin/t2serve label --count 480 --seed 2 --out labels/gen-s2   # and seed 4, seed 3
    .venv/bin/python benchmarks/gold_free_heads.py --folders labels/gen-s2 labels/gen-s4 \
        --calibration labels/gen-s3
Writes benchmarks/results/gold_free_heads.{json,png} (`--out`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS  # noqa: E402
from estimator.offline.labels.answer_posterior import answer_features, leader_index  # noqa: E402
from estimator.offline.labels.gold_free import has_gold, with_targets  # noqa: E402
from estimator.offline.labels.leader_states import auc  # noqa: E402
from estimator.offline.labels.targets import gold_of, sample_optimal_n  # noqa: E402
from estimator.offline.labels.traffic import load_store  # noqa: E402
from estimator.offline.training.calibration_fit import fit_calibration  # noqa: E402
from estimator.offline.training.margin_fit import MULTIPLES, fit_margin, t2_parallelism  # noqa: E402
from estimator.offline.training.probes import TrainConfig, fit, targets  # noqa: E402

GRID = np.arange(0.5, 4.0001, 0.125)
MID = (4.0, 12.0)  # samples: the range the summary averages over


def load(folder: Path) -> tuple[list[dict], np.ndarray]:
    records, states, _ = load_store([folder])
    keep = [i for i, r in enumerate(records) if has_gold(r)]
    return [records[i] for i in keep], states[keep]


def curve_of_expected(records: list[dict], eps: float) -> list[dict]:
    """The rule before the expected N*: N* of the expected curve."""
    return [{**r, "target_n_star": sample_optimal_n(np.array(r["target_accuracy"]), eps)} for r in records]


def with_rule(
    rule: str, records: list[dict], states: np.ndarray, calibrations: dict, eps: float, curve_eps: float
) -> list[dict]:
    if rule == "gold":
        return with_targets(records, "gold")
    base, _, variant = rule.partition(" ")
    posterior = {"posterior": calibrations["pool"], "posterior+states": calibrations["states"]}.get(base)
    gold_free = "posterior" if posterior is not None else base
    if variant:
        out = with_targets(records, gold_free, posterior=posterior, eps=curve_eps, states=states)
        return curve_of_expected(out, curve_eps)
    return with_targets(records, gold_free, posterior=posterior, eps=eps, states=states)


def leader_auc_of(posterior, records: list[dict], states: np.ndarray) -> float:
    """How well the posterior's p(leader) ranks right leaders above wrong ones on gold pools."""
    p, y = [], []
    for record, state in zip(records, states, strict=True):
        keys, x = answer_features(record["answers"])
        if keys:
            lead = keys[leader_index(x)]
            p.append(posterior.probabilities(record["answers"], state)[lead])
            y.append(float(lead in gold_of(record)))
    return auc(np.array(p), np.array(y))


def train_head(records: list[dict], states: np.ndarray, seed: int, epochs: int):
    validation = np.array([r["split"] == "validation" for r in records])
    y = targets(records)
    head = fit(
        states[~validation],
        y[~validation],
        states[validation],
        y[validation],
        model_name="",
        n_max=len(records[0]["answers"]),
        config=replace(TrainConfig(), seed=seed, epochs=epochs),
        progress=False,
    )
    curves = np.array([r["target_accuracy"] for r, v in zip(records, validation, strict=True) if v])
    return head, fit_margin(curves, head.predict_batch(states[validation]))["margin"]


def score(head, margin: float, records: list[dict], states: np.ndarray) -> dict:
    accuracy = np.array([r["accuracy"] for r in records])
    n_questions, n_max = accuracy.shape
    fixed = np.maximum.accumulate(accuracy.mean(axis=0))
    predictions = head.predict_batch(states)

    def point(m: float) -> dict:
        n = t2_parallelism(predictions, n_max, m)
        value, samples = float(accuracy[np.arange(n_questions), n - 1].mean()), float(n.mean())
        return {
            "margin": m,
            "accuracy": value,
            "samples": samples,
            "above": value - float(np.interp(samples, np.arange(1, n_max + 1), fixed)),
        }

    points = [point(float(m)) for m in GRID]
    mid = [p["above"] for p in points if MID[0] <= p["samples"] <= MID[1]]
    return {
        "points": points,
        "mid_above": float(np.mean(mid)) if mid else None,
        "at_margin": [{"multiple": k, **point(margin * k)} for k in MULTIPLES],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--folders", type=Path, nargs=2, required=True, help="two label folders of one source"
    )
    parser.add_argument(
        "--calibration", type=Path, required=True, help="a third folder: the little gold there is"
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=TrainConfig().epochs)
    parser.add_argument("--target-eps", type=float, default=0.0)
    parser.add_argument("--curve-eps", type=float, default=0.02, help="the (N* of E[A]) rows' tolerance")
    parser.add_argument("--out", type=Path, default=RESULTS / "gold_free_heads")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]

    calibrations = {
        "pool": fit_calibration([args.calibration], states=False),
        "states": fit_calibration([args.calibration], states=True),
    }
    if calibrations["states"].leader_states is None:
        print("the calibration kept no states part: posterior+states is posterior")
    folders = {str(f): load(f) for f in args.folders}
    calibration_gold = load(args.calibration)
    rules = [
        "gold",
        "gold, calibration only",
        "majority",
        "share",
        "share (N* of E[A])",
        "posterior",
        "posterior (N* of E[A])",
        "posterior+states",
        "posterior+states (N* of E[A])",
    ]
    directions = [(args.folders[0], args.folders[1]), (args.folders[1], args.folders[0])]
    runs = []
    bar = tqdm(total=len(rules) * len(directions) * len(seeds), desc="heads", unit="head")
    for rule in rules:
        for train_folder, test_folder in directions:
            source = calibration_gold if rule == "gold, calibration only" else folders[str(train_folder)]
            records = with_rule(rule.split(",")[0], *source, calibrations, args.target_eps, args.curve_eps)
            for seed in seeds:
                head, margin = train_head(records, source[1], seed, args.epochs)
                runs.append(
                    {
                        "rule": rule,
                        "train": str(train_folder),
                        "test": str(test_folder),
                        "seed": seed,
                        "margin": margin,
                        "mean_target_n_star": float(np.mean([r["target_n_star"] for r in records])),
                        **score(head, margin, *folders[str(test_folder)]),
                    }
                )
                if seed != seeds[0]:
                    del runs[-1]["points"]  # kept for one seed (the plot's): the file stays small
                bar.update()
    bar.close()
    summary = summarise(runs, rules, folders)
    leader_auc = {
        Path(name).name: {kind: leader_auc_of(posterior, *data) for kind, posterior in calibrations.items()}
        for name, data in folders.items()
    }
    report = {
        "folders": [str(f) for f in args.folders],
        "calibration": {
            "folder": str(args.calibration),
            "pool": calibrations["pool"].fitted,
            "states": calibrations["states"].fitted.get("states"),
        },
        "seeds": seeds,
        "epochs": args.epochs,
        "target_eps": args.target_eps,
        "curve_eps": args.curve_eps,
        "mid_samples": MID,
        "leader_auc": leader_auc,
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    print(table(summary))
    for name, aucs in leader_auc.items():
        print(
            f"leader right on {name}, AUC: pool features {aucs['pool']:.3f}, with the states {aucs['states']:.3f}"
        )
    plot(report, args.out.with_suffix(".png"))
    print(f"wrote {args.out}.json and {args.out}.png")


def summarise(runs: list[dict], rules: list[str], folders: dict) -> list[dict]:
    """Per rule: the mid-range height above the curve pooled over directions (weighted by the
    test folder's questions), its spread over seeds, and its share of the gold head's."""
    rows = []
    for rule in rules:
        mine = [r for r in runs if r["rule"] == rule]
        by_seed = {}
        for run in mine:
            weight = len(folders[run["test"]][0])
            total, weights = by_seed.get(run["seed"], (0.0, 0))
            by_seed[run["seed"]] = (total + weight * (run["mid_above"] or 0.0), weights + weight)
        pooled = [total / weights for total, weights in by_seed.values()]
        rows.append(
            {
                "rule": rule,
                "mid_above": float(np.mean(pooled)),
                "seed_spread": float(np.std(pooled)),
                "by_direction": {
                    f"{Path(r['train']).name}->{Path(r['test']).name}": float(
                        np.mean([x["mid_above"] for x in mine if x["train"] == r["train"]])
                    )
                    for r in mine
                },
                "mean_target_n_star": float(np.mean([r["mean_target_n_star"] for r in mine])),
            }
        )
    gold = rows[0]["mid_above"]
    for row in rows:
        row["share_of_gold"] = row["mid_above"] / gold if gold > 0 else None
    return rows


def table(summary: list[dict]) -> str:
    lines = [
        f"{'targets':<32} {'above curve, 4-12 samples':>26} {'of gold':>8}  {'per direction':<30} mean N*"
    ]
    for row in summary:
        share = f"{row['share_of_gold']:.0%}" if row["share_of_gold"] is not None else "-"
        directions = "  ".join(f"{k} {100 * v:+.2f}" for k, v in row["by_direction"].items())
        lines.append(
            f"{row['rule']:<32} {100 * row['mid_above']:+18.2f} ± {100 * row['seed_spread']:.2f} pt "
            f"{share:>8}  {directions:<30} {row['mean_target_n_star']:.2f}"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    first = report["runs"][0]["test"]
    records = load(Path(first))[0]
    fixed = np.array([r["accuracy"] for r in records]).mean(axis=0)
    left.plot(np.arange(1, len(fixed) + 1), fixed, "k-o", markersize=3, label="fixed N")
    for rule in ("gold", "majority", "posterior", "posterior+states"):
        run = next(r for r in report["runs"] if r["rule"] == rule and r["test"] == first)
        left.plot([p["samples"] for p in run["points"]], [p["accuracy"] for p in run["points"]], label=rule)
    left.set(
        xlabel="mean samples", ylabel="accuracy (exact replay)", title=f"heads scored on {Path(first).name}"
    )
    left.legend(fontsize=8)
    y = np.arange(len(summary))
    right.barh(
        y,
        [100 * r["mid_above"] for r in summary],
        xerr=[100 * r["seed_spread"] for r in summary],
        color=["#555555" if r["rule"].startswith("gold") else "#4c72b0" for r in summary],
    )
    right.set_yticks(y, [r["rule"] for r in summary], fontsize=8)
    right.invert_yaxis()
    right.axvline(0, color="black", linewidth=0.8)
    right.set(xlabel="points above the fixed-N curve (mean over 4-12 samples, both directions)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
