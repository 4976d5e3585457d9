"""Policies at equal accuracy on questions labelled after development: a fresh holdout.

`t2serve evaluate` reports on the test split of the labels the head, the stopping table and
their knobs were developed against. This replays the same policy grid (estimator.offline.evaluation.comparison)
on the test-split questions of `--holdout` folders that none of the `--labels` folders hold,
so nothing about them informed any choice. Per policy (by registered name): launched
samples at the target (fixed N_max - 1 point) on its Pareto front, and the knobs `evaluate`
chose on validation (read from --policies) replayed here.

    .venv/bin/t2serve label --count 2400 --seed 2 --split test --out labels/smollm2-s2-test
    .venv/bin/python benchmarks/holdout_policies.py --labels labels/smollm2 --labels labels/smollm2-s1 \
        --holdout labels/smollm2-s2-test
Writes benchmarks/results/holdout_policies.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS  # noqa: E402
from estimator.head import DEFAULT_HEAD, T2Head  # noqa: E402
from estimator.offline.evaluation import comparison  # noqa: E402
from estimator.offline.evaluation.replay import oracle_frontier, replay_matrix, summarise  # noqa: E402
from estimator.offline.labels.labeling import load_label_sets  # noqa: E402


def holdout_report(head, holdout: list[dict], states: np.ndarray, chosen: dict, orderings: int = 200) -> dict:
    """The policy grid replayed on `holdout` questions: each policy's launched samples at the
    target on its Pareto front, and the knobs `chosen` on validation (evaluate's `selected`)."""
    n_max = len(holdout[0]["answers"])
    grid = comparison.policy_grid(n_max, stopping=getattr(head, "stopping", None))
    matrix = replay_matrix(
        comparison.pools(holdout, head.predict_batch(states)),
        grid,
        orderings=orderings,
        seed=0,
        default=n_max,
        desc="holdout",
    )
    rows = summarise(grid, matrix)
    reference = comparison.fixed_n_max_row(rows, n_max)
    target = reference["accuracy"] - comparison.TOLERANCE
    front = comparison.fronts_at(rows, oracle_frontier(np.array([r["accuracy"] for r in holdout])), target)
    selected = {
        name: next(r for r in rows if r["policy"] == name and r["knobs"] == pick["knobs"])
        for name, pick in chosen.items()
        if name in front and name != "oracle"
    }
    gap = None
    t2, learned, oracle = front["t2"], front.get("t2+learned"), front["oracle"]
    if oracle is not None and t2 is not None and learned is not None and t2 > oracle:
        gap = (t2 - learned) / (t2 - oracle)
    return {
        "questions": len(holdout),
        "orderings": orderings,
        "target": target,
        "fixed_n_max": reference,
        "front_at_target": front,
        "selected": selected,
        "gap_closed_front": gap,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--labels", type=Path, action="append", required=True, help="the development labels")
    parser.add_argument("--holdout", type=Path, action="append", required=True, help="labels made after")
    parser.add_argument("--head", type=Path, default=DEFAULT_HEAD)
    parser.add_argument("--policies", type=Path, default=RESULTS / "policies.json", help="evaluate's report")
    parser.add_argument("--orderings", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS / "holdout_policies.json")
    args = parser.parse_args()

    seen = {r["id"] for r in load_label_sets(args.labels)[0]}
    records, states, _ = load_label_sets(args.holdout)
    keep = [i for i, r in enumerate(records) if r["split"] == "test" and r["id"] not in seen]
    if not keep:
        raise SystemExit("no test-split questions in --holdout that --labels do not hold")
    chosen = json.loads(args.policies.read_text())["selected"]
    result = holdout_report(
        T2Head.load(args.head), [records[i] for i in keep], states[keep], chosen, args.orderings
    )
    front, selected = result["front_at_target"], result["selected"]
    print(
        f"{result['questions']} holdout questions; target {result['target']:.3f} "
        f"(fixed N_max {result['fixed_n_max']['accuracy']:.3f} - {comparison.TOLERANCE:g})"
    )
    print(
        f"{'policy':<13} {'front@target':>12}  {'knobs chosen on validation':<34} {'acc':>6} {'launched':>8}"
    )
    for name, at in front.items():
        s = selected.get(name)
        shown = f"{at:.2f}" if at is not None else "-"
        pick = f"{s['knobs']:<34} {s['accuracy']:6.3f} {s['launched']:8.2f}" if s else ""
        print(f"{name:<13} {shown:>12}  {pick}")
    if result["gap_closed_front"] is not None:
        print(
            f"t2+learned closes {result['gap_closed_front']:.0%} of t2's gap to the oracle frontier (fronts)"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
