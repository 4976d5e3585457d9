"""Policies at equal accuracy: knob sweeps replayed on the same pools, knobs chosen on the
validation split, reported on the test split (`t2serve evaluate`, policies.json/.png).

Question answered: at accuracy within TOLERANCE (1 point) of fixed N_max, which policy
launches the fewest samples? Policies are keyed by their registered names (POLICY_NAMES,
estimator.policies); per name, the selected knobs are those with the fewest mean launched
samples among the knobs whose *validation* accuracy is >= validation accuracy of fixed
N_max - TOLERANCE; their test numbers are reported. The oracle reference is the
per-question fixed-N frontier (estimator.offline.evaluation.replay.oracle_frontier) at the
test target, and "gap closed" = (t2 samples - composition samples) / (t2 samples - oracle
samples).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from estimator.head import T2Head
from estimator.learned_stopping import StoppingTable
from estimator.offline.evaluation.replay import OUTCOMES, Pool, oracle_frontier, replay_matrix, summarise
from estimator.offline.labels.targets import TYPES, gold_of, sample_type
from estimator.offline.training.probes import in_split
from estimator.policies import ESC, T2, AdaptiveConsistency, Composition, Fixed, LearnedStop, Policy

TOLERANCE = 0.01
BOOTSTRAP = 200  # question resamples for the noise intervals
MARGINS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
WINDOWS = (2, 3, 4, 5, 6, 8)
CONFIDENCES = (0.8, 0.9, 0.95, 0.99)
# ESC and Adaptive-Consistency have a budget of their own (the papers' max samples); None = N_max.
MAX_SAMPLES = (4, 8, None)
COMPOSITION_MARGINS = (0.5, 0.75, 1.0, 1.5)
MAX_FACTORS = (1.5, 2.0, 3.0, None)  # composition: extend up to this multiple of the estimate
# Composition with the threshold set by the head's estimate (k = agreement x N_max x p votes):
# it extends one at a time from a small first launch, so it pairs with the small margins.
AGREEMENTS = (0.25, 0.3, 0.35, 0.4, 0.5)
AGREEMENT_MARGINS = (0.25, 0.5)
AGREEMENT_MAX_FACTORS = (3.0, 5.0, None)
# The learned stopping rule (from the head's table): cost per sample x first-launch margin.
COSTS = (0.002, 0.003, 0.005, 0.007, 0.009, 0.011, 0.013, 0.016, 0.02, 0.03)
LEARNED_MARGINS = (0.25, 0.5, 1.0)
# The registered names the grid holds policies of (`t2serve evaluate --policies`).
POLICY_NAMES = ("fixed", "t2", "esc", "ac-beta", "ac-dirichlet", "t2+beta", "t2+dirichlet", "t2+learned")


def policy_grid(
    n_max: int, names: tuple[str, ...] = POLICY_NAMES, stopping: StoppingTable | None = None
) -> list[Policy]:
    grid: list[Policy] = [Fixed(n) for n in range(1, n_max + 1)]
    grid += [T2(m) for m in MARGINS]
    grid += [ESC(w, mx) for w in WINDOWS for mx in MAX_SAMPLES if mx is None or w <= mx < n_max]
    grid += [
        AdaptiveConsistency(k, c, max_samples=mx)
        for k in ("beta", "dirichlet")
        for c in CONFIDENCES
        for mx in MAX_SAMPLES
        if mx is None or mx < n_max
    ]
    grid += [
        Composition(k, c, m, max_factor=f)
        for k in ("beta", "dirichlet")
        for c in CONFIDENCES
        for m in COMPOSITION_MARGINS
        for f in MAX_FACTORS
    ]
    grid += [
        Composition(k, margin=m, max_factor=f, agreement=a)
        for k in ("beta", "dirichlet")
        for a in AGREEMENTS
        for m in AGREEMENT_MARGINS
        for f in AGREEMENT_MAX_FACTORS
    ]
    if stopping is not None:  # a head without a table has no t2+learned policies
        grid += [LearnedStop(stopping, cost=c, margin=m) for c in COSTS for m in LEARNED_MARGINS]
    # Fixed N_max is the reference, so it is always in.
    return [p for p in grid if p.name in names or p == Fixed(n_max)]


def pools(records: list[dict], predictions: np.ndarray) -> list[Pool]:
    return [
        Pool(r["answers"], r["tokens"], gold_of(r), float(p))
        for r, p in zip(records, predictions, strict=True)
    ]


def _cheapest(rows: list[dict], target: float) -> dict | None:
    ok = [r for r in rows if r["accuracy"] >= target - 1e-12]
    return min(ok, key=lambda r: (r["launched"], r["tokens"])) if ok else None


def samples_at(points: list[dict], target: float) -> float | None:
    """Mean launched samples needed for `target` accuracy on the Pareto front of `points`,
    linear between neighbouring knobs (a random mix of the two knobs per request gets there)."""
    front = pareto(points)
    for i, p in enumerate(front):
        if p["accuracy"] >= target - 1e-12:
            if i == 0:
                return p["launched"]
            q = front[i - 1]
            return q["launched"] + (p["launched"] - q["launched"]) * (target - q["accuracy"]) / (
                p["accuracy"] - q["accuracy"]
            )
    return None


def _of(rows: list[dict], name: str) -> list[dict]:
    """The rows of the policies registered as `name`."""
    return [r for r in rows if r["policy"] == name]


def _names(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["policy"] for r in rows))


def fixed_n_max_row(rows: list[dict], n_max: int) -> dict:
    """Fixed N_max's row: the reference the target is set from."""
    reference = Fixed(n_max)
    return next(r for r in _of(rows, reference.name) if r["knobs"] == reference.knobs)


def fronts_at(rows: list[dict], frontier: list[dict], target: float) -> dict[str, float | None]:
    """Mean launched samples the oracle frontier and each policy's Pareto front need for
    `target` (samples_at; None where a front never reaches it)."""
    return {
        "oracle": samples_at(frontier, target),
        **{name: samples_at(_of(rows, name), target) for name in _names(rows)},
    }


def pareto(rows: list[dict], x: str = "launched") -> list[dict]:
    """Points no other point beats in both accuracy and cost, cheapest first."""
    best: list[dict] = []
    for r in sorted(rows, key=lambda r: (r[x], -r["accuracy"])):
        if not best or r["accuracy"] > best[-1]["accuracy"]:
            best.append(r)
    return best


def replay_split(
    grid: list[Policy], records: list[dict], predictions: np.ndarray, *, orderings: int, seed: int, desc: str
) -> tuple[dict, np.ndarray]:
    """One split's report (every knob's row, the oracle, fixed N_max and the target) and its
    replay matrix [question, policy, outcome]."""
    n_max = len(records[0]["answers"])
    matrix = replay_matrix(
        pools(records, predictions), grid, orderings=orderings, seed=seed, default=n_max, desc=desc
    )
    rows = summarise(grid, matrix)
    accuracy = np.array([r["accuracy"] for r in records])
    n_star = np.array([r["n_star"] for r in records])
    reference = fixed_n_max_row(rows, n_max)
    split = {
        "questions": len(records),
        "rows": rows,
        "oracle_n_star": {
            "accuracy": float(accuracy[np.arange(len(records)), n_star - 1].mean()),
            "launched": float(n_star.mean()),
        },
        "oracle_frontier": oracle_frontier(accuracy),
        "fixed_n_max": reference,
        "target": reference["accuracy"] - TOLERANCE,
    }
    return split, matrix


def select_on_validation(validation: dict, test: dict) -> dict[str, dict]:
    """Per policy name: the knobs cheapest on validation at its target (none reaching it: the
    most accurate), with their test numbers."""
    selected = {}
    for name in _names(test["rows"]):
        candidates = _of(validation["rows"], name)
        pick = _cheapest(candidates, validation["target"]) or max(candidates, key=lambda r: r["accuracy"])
        on_test = next(r for r in _of(test["rows"], name) if r["knobs"] == pick["knobs"])
        selected[name] = {
            **on_test,
            "validation_accuracy": pick["accuracy"],
            "validation_launched": pick["launched"],
            "meets_target_on_validation": pick["accuracy"] >= validation["target"] - 1e-12,
            "meets_target_on_test": on_test["accuracy"] >= test["target"] - 1e-12,
        }
    return selected


def gap_closed(selected: dict[str, dict], front: dict[str, float | None], oracle: float | None) -> dict:
    """The composition (t2 first, a stopping rule after) cheaper on validation, and the share
    of t2's gap to the oracle frontier it closes: with the selected knobs and on the test
    fronts. Empty without t2, a composition or an oracle at the target."""
    compositions = [name for name in selected if name.startswith("t2+")]
    if "t2" not in selected or not compositions or oracle is None:
        return {}
    # The composition's criterion is a knob too: the one cheaper on validation.
    comp = min(compositions, key=lambda name: selected[name]["validation_launched"])
    t2_n, comp_n = selected["t2"]["launched"], selected[comp]["launched"]
    gap = t2_n - oracle
    out = {"composition": comp, "gap_closed": (t2_n - comp_n) / gap if gap > 0 else None}
    if front["t2"] is not None and front[comp] is not None and front["oracle"] is not None:
        front_gap = front["t2"] - front["oracle"]
        out["gap_closed_front"] = (front["t2"] - front[comp]) / front_gap if front_gap > 0 else None
    return out


def compare_policies(
    head: T2Head,
    validation: list[dict],
    validation_states: np.ndarray,
    test: list[dict],
    test_states: np.ndarray,
    *,
    orderings: int,
    seed: int = 0,
    names: tuple[str, ...] = POLICY_NAMES,
) -> dict:
    n_max = len(test[0]["answers"])
    grid = policy_grid(n_max, names, getattr(head, "stopping", None))
    test_predictions = head.predict_batch(test_states)
    splits, matrices = {}, {}
    for name, records, predictions in (
        ("validation", validation, head.predict_batch(validation_states)),
        ("test", test, test_predictions),
    ):
        splits[name], matrices[name] = replay_split(
            grid, records, predictions, orderings=orderings, seed=seed, desc=f"replay {name}"
        )
    selected = select_on_validation(splits["validation"], splits["test"])
    tst = splits["test"]
    oracle_at_target = samples_at(tst["oracle_frontier"], tst["target"])
    # Selection-free view: each policy's Pareto front, interpolated at the target, per split.
    at_target = {
        name: {
            "target": split["target"],
            **fronts_at(split["rows"], split["oracle_frontier"], split["target"]),
        }
        for name, split in splits.items()
    }
    result = {
        "n_max": n_max,
        "orderings": orderings,
        "seed": seed,
        "tolerance": TOLERANCE,
        "head": head.identity,
        "splits": splits,
        "selected": selected,
        "oracle_launched_at_target": oracle_at_target,
        "front_at_target": at_target,
        **gap_closed(selected, at_target["test"], oracle_at_target),
    }
    result["by_type"] = by_type(grid, matrices["test"], test, test_predictions, selected)
    if "composition" in result:
        result["bootstrap"] = bootstrap_fronts(
            grid, matrices["test"], [r["accuracy"] for r in test], result["composition"], seed=seed
        )
    ranked = sorted(selected, key=lambda name: selected[name]["launched"])
    result["fewest_samples"] = next((name for name in ranked if selected[name]["meets_target_on_test"]), None)
    return result


def compare_on_labels(
    head: T2Head,
    records: list[dict],
    states: np.ndarray,
    *,
    orderings: int,
    seed: int = 0,
    names: tuple[str, ...] = POLICY_NAMES,
) -> dict:
    """`compare_policies` on labels read by load_label_sets: knobs chosen on their validation
    split, reported on their test split."""
    validation, validation_states = in_split(records, states, "validation")
    if not validation:
        raise ValueError("the policy comparison needs validation-split questions")
    test, test_states = in_split(records, states, "test")
    return compare_policies(
        head,
        validation,
        validation_states,
        test,
        test_states,
        orderings=orderings,
        seed=seed,
        names=names,
    )


def by_type(
    grid: list[Policy], matrix: np.ndarray, records: list[dict], predictions: np.ndarray, selected: dict
) -> dict:
    """Where the samples go (test split): per sample type, t2's mean estimate N*/N_max * N_max,
    the oracle's N*, and each selected policy's mean launched samples and accuracy."""
    n_max = len(records[0]["answers"])
    types = np.array([sample_type(np.array(r["accuracy"])) for r in records])
    a, n = OUTCOMES.index("accuracy"), OUTCOMES.index("launched")
    column = {(p.name, p.knobs): i for i, p in enumerate(grid)}
    out = {}
    for t, name in TYPES.items():
        rows = types == t
        if not rows.any():
            continue
        entry = {
            "share": float(rows.mean()),
            "t2_estimate": float(predictions[rows].mean() * n_max),
            "oracle_n_star": float(
                np.mean([r["n_star"] for r, keep in zip(records, rows, strict=True) if keep])
            ),
        }
        for policy, pick in selected.items():
            i = column[(policy, pick["knobs"])]
            entry[policy] = {
                "launched": float(matrix[rows, i, n].mean()),
                "accuracy": float(matrix[rows, i, a].mean()),
            }
        out[name] = entry
    return out


def bootstrap_fronts(
    grid: list[Policy],
    matrix: np.ndarray,
    accuracy: list[list[float]],
    composition: str,
    *,
    resamples: int = BOOTSTRAP,
    seed: int = 0,
) -> dict:
    """How much of the front comparison is question sampling noise: resample the test
    questions with replacement, recompute every policy's samples at the target (and the
    oracle's), and report 95% intervals of the composition's difference to each policy."""
    rng = np.random.default_rng(seed)
    acc = np.asarray(accuracy)
    names = list(dict.fromkeys(p.name for p in grid))
    reference = grid.index(Fixed(acc.shape[1]))
    a, n = OUTCOMES.index("accuracy"), OUTCOMES.index("launched")
    draws: dict[str, list[float]] = {name: [] for name in [*names, "oracle"]}
    for _ in range(resamples):
        pick = rng.integers(0, len(matrix), size=len(matrix))
        means = matrix[pick].mean(axis=0)
        target = means[reference, a] - TOLERANCE
        rows = [
            {"policy": p.name, "accuracy": m[a], "launched": m[n]} for p, m in zip(grid, means, strict=True)
        ]
        for name in names:
            value = samples_at(_of(rows, name), target)
            draws[name].append(np.nan if value is None else value)
        draws["oracle"].append(samples_at(oracle_frontier(acc[pick]), target) or np.nan)
    comp = np.array(draws[composition])
    out = {}
    for f, values in draws.items():
        if f == composition:
            continue
        diff = comp - np.array(values)
        ok = diff[~np.isnan(diff)]
        out[f] = {
            "difference_median": float(np.median(ok)) if len(ok) else None,
            "difference_95": [float(v) for v in np.percentile(ok, [2.5, 97.5])] if len(ok) else None,
            "composition_cheaper_share": float(np.mean(ok < 0)) if len(ok) else None,
        }
    t2, oracle = np.array(draws["t2"]), np.array(draws["oracle"])
    closed = (t2 - comp) / (t2 - oracle)
    closed = closed[np.isfinite(closed)]
    out["gap_closed_95"] = [float(v) for v in np.percentile(closed, [2.5, 97.5])] if len(closed) else None
    return {"resamples": resamples, "composition": composition, "versus": out}


def report_table(result: dict) -> str:
    tst = result["splits"]["test"]
    lines = [
        f"policies replayed on the same pools: {result['orderings']} orderings per question, seed "
        f"{result['seed']}; knobs chosen on validation ({result['splits']['validation']['questions']} q), "
        f"reported on test ({tst['questions']} q)",
        f"target: accuracy >= fixed N_max - {result['tolerance']:g} = {tst['target']:.3f} on test "
        f"({result['splits']['validation']['target']:.3f} on validation)",
        f"{'policy':<13} {'knobs':<34} {'acc':>6} {'launched':>8} {'finished':>8} {'rounds':>6} "
        f"{'tokens':>6} {'tok_up':>6}  target",
    ]
    for policy, s in result["selected"].items():
        mark = "yes" if s["meets_target_on_test"] else "no"
        if not s["meets_target_on_validation"]:
            mark += " (none on val)"
        lines.append(
            f"{policy:<13} {s['knobs']:<34} {s['accuracy']:6.3f} {s['launched']:8.2f} {s['finished']:8.2f} "
            f"{s['rounds']:6.2f} {s['tokens']:6.3f} {s['tokens_upper']:6.3f}  {mark}"
        )
    oracle = tst["oracle_n_star"]
    lines.append(f"{'oracle N*':<13} {'':<34} {oracle['accuracy']:6.3f} {oracle['launched']:8.2f}")
    at = result["oracle_launched_at_target"]
    lines.append(
        "oracle frontier (per-question fixed N) at the target: "
        + (f"{at:.2f} samples" if at is not None else "not reached")
    )
    if result.get("gap_closed") is not None:
        lines.append(
            f"{result['composition']} closes {result['gap_closed']:.0%} of t2's gap to the oracle frontier "
            "(mean launched samples)"
        )
    lines.append(
        f"fewest samples within {result['tolerance']:g} of fixed N_max on test (knobs chosen on validation): "
        f"{result['fewest_samples']}"
    )
    lines.append("mean launched samples at the target on each policy's Pareto front (no knob choice):")
    for name, front in result["front_at_target"].items():
        lines.append(
            f"  {name:<10} "
            + "  ".join(
                f"{f} {v:.2f}" if v is not None else f"{f} -" for f, v in front.items() if f != "target"
            )
        )
    if result.get("gap_closed_front") is not None:
        lines.append(
            f"  on the test fronts {result['composition']} closes {result['gap_closed_front']:.0%} of t2's gap "
            "to the oracle"
        )
    lines.append("launched samples per sample type (test), knobs as above:")
    names = list(result["selected"])
    lines.append(
        f"  {'type':<13} {'share':>5} {'t2 est':>6} {'N*':>5} " + " ".join(f"{name:>12}" for name in names)
    )
    for name, e in result["by_type"].items():
        lines.append(
            f"  {name:<13} {e['share']:5.0%} {e['t2_estimate']:6.2f} {e['oracle_n_star']:5.2f} "
            + " ".join(f"{e[name]['launched']:12.2f}" for name in names)
        )
    if "bootstrap" in result:
        b = result["bootstrap"]
        lines.append(
            f"  {b['composition']} minus each policy at the target, test fronts, 95% interval over "
            f"{b['resamples']} question resamples:"
        )
        for f, v in b["versus"].items():
            if f != "gap_closed_95" and v["difference_95"] is not None:
                lo, hi = v["difference_95"]
                lines.append(
                    f"    {f:<13} {v['difference_median']:+.2f} [{lo:+.2f}, {hi:+.2f}]  "
                    f"cheaper in {v['composition_cheaper_share']:.0%}"
                )
        if b["versus"]["gap_closed_95"] is not None:
            lo, hi = b["versus"]["gap_closed_95"]
            lines.append(f"    gap to the oracle closed: [{lo:.0%}, {hi:.0%}]")
    return "\n".join(lines)


COLORS = {
    "fixed": "#999999",
    "t2": "#3b7dd8",
    "esc": "#e08a1e",
    "ac-beta": "#2a9d4b",
    "ac-dirichlet": "#8cc63f",
    "t2+beta": "#c0392b",
    "t2+dirichlet": "#8e44ad",
    "t2+learned": "#d81b60",
}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tst = result["splits"]["test"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    for ax, x, label in zip(
        axes,
        ("launched", "tokens", "rounds"),
        ("mean samples launched", "generated tokens / those of N_max", "latency (rounds of one sample)"),
        strict=True,
    ):
        for name in result["selected"]:
            rows = _of(tst["rows"], name)
            # Fixed N is the reference curve: drawn whole, not only its Pareto front.
            front = rows if name == "fixed" else pareto(rows, x)
            color = COLORS.get(name, "#333333")
            ax.scatter([r[x] for r in rows], [r["accuracy"] for r in rows], s=8, color=color, alpha=0.35)
            ax.plot([r[x] for r in front], [r["accuracy"] for r in front], "-", color=color, label=name)
            s = result["selected"][name]
            ax.plot(s[x], s["accuracy"], "o", color=color, markersize=9, markeredgecolor="black")
        if x == "launched":
            front = sorted(tst["oracle_frontier"], key=lambda p: p["launched"])
            ax.plot(
                [p["launched"] for p in front],
                [p["accuracy"] for p in front],
                "--",
                color="black",
                label="oracle (per-question fixed N)",
            )
            oracle = tst["oracle_n_star"]
            ax.plot(
                oracle["launched"], oracle["accuracy"], "*", color="black", markersize=14, label="oracle N*"
            )
        reference = tst["fixed_n_max"]
        ax.plot(reference[x], reference["accuracy"], "s", color="#666666", markersize=8, label="fixed N_max")
        ax.axhline(tst["target"], color="#bbbbbb", linestyle=":", label="fixed N_max - 1 point")
        ax.set_xlabel(label)
        ax.set_ylabel("majority-vote accuracy (test)")
    axes[0].set_title(f"test split, {tst['questions']} questions x {result['orderings']} orderings")
    axes[1].set_title("aborted samples: tokens until the stop")
    axes[2].set_title("big markers: knob chosen on validation")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))
