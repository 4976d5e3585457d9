"""`t2serve evaluate --leave-one-out`: does a head hold on a data set it never saw?

For each source S in the labels (the built-in generator, each real data file): fit the head,
its learned stopping table and (given open-ended states) its gate on the *other* sources'
train and validation splits as `t2serve train` does (but cross-fitting the stopping table's
predictions in 2 folds rather than 5: each fit takes ~40 s on 2 cores), then replay every
question of S through the policies a user gets by default:
  fixed N_max       standard parallel thinking
  t2                the server's default `auto` policy (policy "t2" at the fold's own margin,
                    chosen on the fold's validation split as `t2serve train` does)
  t2+learned        policy "t2+learned" at its default knobs
  oracle N*         each question's own sample-optimal N (a bound, not a policy)
Where the fold's gate calls a question unfamiliar, t2 and t2+learned start from the
server's safe default N instead of the head's guess, and where it calls one open-ended they
get one sample (--open-ended-parallelism), as the server does; how often the gate fires is
reported per source; where it trusts the head, t2's margin is multiplied by the gate's
margin_scale (larger far from the training questions). Fixed N and t2 are scored with the
exact A_x(N); t2+learned by the mean over `orderings` random finishing orders of each pool
(estimator.offline.evaluation.replay). MAE is |N_max * prediction - N*|.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from estimator.gate import Gate, route_shares
from estimator.head import T2Head
from estimator.learned_stopping import StoppingTable
from estimator.offline.evaluation.replay import OUTCOMES, Pool, replay_matrix
from estimator.offline.labels.targets import gold_of, source_of
from estimator.offline.training.gate_fit import fit_gate
from estimator.offline.training.margin_fit import fit_margin
from estimator.offline.training.probes import TrainConfig, cross_fitted_predictions, fit, targets
from estimator.offline.training.stopping_fit import fit_stopping
from estimator.policies import T2, Fixed, LearnedStop

TOLERANCE = 0.01  # "within 1 point of fixed N_max"
# T2 is also replayed at these margins (same heads, same orderings): what margin would hold
# off the training distribution.
SWEEP_MARGINS = (1.0, 1.5, 2.0, 2.5, 3.0)


def leave_one_out(
    records: list[dict],
    states: np.ndarray,
    *,
    default_parallelism: int,
    open_ended_parallelism: int,
    orderings: int,
    config: TrainConfig | None = None,
    stopping_folds: int = 2,
    seed: int = 0,
    open_ended: tuple[list[dict], np.ndarray] | None = None,
    margin: float | None = None,
    sources: list[str] | None = None,
    sweep: tuple[float, ...] = SWEEP_MARGINS,
) -> dict:
    """Per held-out source, the heads fitted without it scored on it (module docstring).
    `default_parallelism` and `open_ended_parallelism`: the server's N where the fold's gate
    calls a question unfamiliar or open-ended (server.config.ParallelismSettings)."""
    config = config or TrainConfig()
    n_max = len(records[0]["accuracy"])
    source = np.array([source_of(r) for r in records])
    split = np.array([r["split"] for r in records])
    held_out_sources = sources or sorted(set(source))
    if len(set(source)) < 2:
        raise ValueError("leave-one-out needs labels from at least two sources")
    from tqdm import tqdm

    rows = {}
    for held in tqdm(held_out_sources, desc="leave one out", unit="source"):
        if held not in source:
            raise ValueError(f"no labels from source {held!r}; the labels have {sorted(set(source))}")
        rest_train = np.flatnonzero((source != held) & (split == "train"))
        rest_val = np.flatnonzero((source != held) & (split == "validation"))
        test = np.flatnonzero(source == held)
        head, table, gate = fit_fold(
            records,
            states,
            rest_train,
            rest_val,
            config=config,
            stopping_folds=stopping_folds,
            seed=seed,
            open_ended=open_ended,
        )
        test_records = [records[i] for i in test]
        predictions = head.predict_batch(states[test])
        routes = scales = None
        if gate is not None:
            routes = [gate.route(s) for s in states[test]]
            scales = gate.margin_scale(states[test])
        # margin None: the fold's own, chosen on its validation split (margin_fit).
        fold_margin = (
            margin if margin is not None else validation_margin(records, states, rest_val, head, gate)
        )
        rows[held] = score_source(
            test_records,
            predictions,
            table,
            routes,
            margin_scales=scales,
            orderings=orderings,
            seed=seed,
            margin=fold_margin,
            default_parallelism=default_parallelism,
            open_ended_parallelism=open_ended_parallelism,
            sweep=sweep,
        )
        rows[held]["margin"] = fold_margin
        rows[held]["trained_on"] = {"train": len(rest_train), "validation": len(rest_val)}
        tqdm.write(format_row(held, rows[held]))
    return {
        "n_max": n_max,
        "orderings": orderings,
        "margin": margin if margin is not None else "each fold's, chosen on its validation split",
        "default_parallelism": default_parallelism,
        "tolerance": TOLERANCE,
        "sources": rows,
        "mean": mean_over_sources(rows),
        "margin_sweep": margin_sweep(rows),
    }


def validation_margin(records: list[dict], states: np.ndarray, validation: np.ndarray, head, gate) -> float:
    """The fold's T2 margin, chosen on its validation questions as `t2serve train` does."""
    return fit_margin(
        np.array([records[i]["accuracy"] for i in validation]),
        head.predict_batch(states[validation]),
        scales=gate.margin_scale(states[validation]) if gate is not None else None,
    )["margin"]


def fit_fold(
    records: list[dict],
    states: np.ndarray,
    train: np.ndarray,
    validation: np.ndarray,
    *,
    config: TrainConfig,
    stopping_folds: int,
    seed: int,
    open_ended: tuple[list[dict], np.ndarray] | None,
) -> tuple[T2Head, StoppingTable, Gate | None]:
    """One fold's head, stopping table and (given open-ended states) gate, fitted on the
    `train` and `validation` rows as `t2serve train` fits them."""
    train_records = [records[i] for i in train]
    val_targets = targets([records[i] for i in validation])
    head = fit(
        states[train],
        targets(train_records),
        states[validation],
        val_targets,
        model_name="",
        n_max=len(records[0]["accuracy"]),
        config=config,
        progress=False,
    )
    predictions = cross_fitted_predictions(
        states[train],
        targets(train_records),
        states[validation],
        val_targets,
        folds=stopping_folds,
        config=config,
        progress=False,
    )
    table = fit_stopping(train_records, predictions, seed=seed, progress=False)
    gate = None
    if open_ended is not None:
        prompts, open_states = open_ended
        kind = np.array([p["split"] for p in prompts])
        gate = fit_gate(
            states[train],
            open_states[kind == "train"],
            states[validation],
            open_states[kind == "validation"],
            layers=list(range(states.shape[1])),
        )
    return head, table, gate


def score_source(
    records: list[dict],
    predictions: np.ndarray,
    table: StoppingTable,
    routes: list[str] | None,
    *,
    margin_scales: np.ndarray | None = None,
    orderings: int,
    seed: int,
    margin: float,
    default_parallelism: int,
    open_ended_parallelism: int,
    sweep: tuple[float, ...] = (),
) -> dict:
    n_max = len(records[0]["accuracy"])
    trusted = [
        float(p) if routes is None or routes[i] == "answerable" else None for i, p in enumerate(predictions)
    ]
    scales = np.ones(len(records)) if margin_scales is None else np.asarray(margin_scales)
    pools = [
        Pool(r["answers"], r["tokens"], gold_of(r), p, float(k))
        for r, p, k in zip(records, trusted, scales, strict=True)
    ]
    policies = {"fixed N_max": Fixed(n_max), "t2": T2(margin), "t2+learned": LearnedStop(table)}
    swept = {f"t2 x{m:g}": T2(m) for m in sweep}
    matrix = replay_matrix(
        pools,
        [*policies.values(), *swept.values()],
        orderings=orderings,
        seed=seed,
        default=default_parallelism,
        desc="  replay",
    )
    a, n = OUTCOMES.index("accuracy"), OUTCOMES.index("launched")
    accuracy = np.array([r["accuracy"] for r in records])
    # Fixed N and T2 choose N before decoding: score them with the exact A_x(N), free of the
    # orderings' noise (the replay converges to it; estimator.offline.evaluation.replay).
    for i, policy in enumerate([*policies.values(), *swept.values()]):
        if not policy.adapts:
            chosen = matrix[:, i, n].astype(int)
            matrix[:, i, a] = accuracy[np.arange(len(records)), chosen - 1]
    if routes is not None:
        # The server stops an open-ended request's vote at --open-ended-parallelism samples.
        cut = np.array([route == "open_ended" for route in routes])
        for i, name in enumerate([*policies, *swept]):
            if name != "fixed N_max":
                matrix[cut, i, a] = accuracy[cut, open_ended_parallelism - 1]
                matrix[cut, i, n] = open_ended_parallelism
    out = {
        name: {"accuracy": float(matrix[:, i, a].mean()), "samples": float(matrix[:, i, n].mean())}
        for i, name in enumerate(policies)
    }
    sweep_out = {
        float(m): {
            "accuracy": float(matrix[:, len(policies) + j, a].mean()),
            "samples": float(matrix[:, len(policies) + j, n].mean()),
        }
        for j, m in enumerate(sweep)
    }
    n_star = np.array([r["n_star"] for r in records])
    out["oracle N*"] = {
        "accuracy": float(accuracy[np.arange(len(records)), n_star - 1].mean()),
        "samples": float(n_star.mean()),
    }
    result = {
        "questions": len(records),
        "policies": out,
        "mae_n": float(np.abs(np.asarray(predictions) * n_max - n_star).mean()),
        "mean_estimate": float(np.mean(predictions) * n_max),
        "mean_n_star": float(n_star.mean()),
        "accuracy_at_1": float(accuracy[:, 0].mean()),
        "t2_margins": sweep_out,
    }
    if routes is not None:
        result["gate"] = route_shares(routes)
    return result


def mean_over_sources(rows: dict[str, dict]) -> dict:
    names = next(iter(rows.values()))["policies"]
    mean = {
        name: {
            k: float(np.mean([r["policies"][name][k] for r in rows.values()]))
            for k in ("accuracy", "samples")
        }
        for name in names
    }
    fixed = mean["fixed N_max"]
    return {
        "policies": mean,
        "mae_n": float(np.mean([r["mae_n"] for r in rows.values()])),
        # The target: the default policy within TOLERANCE of fixed N_max at <= half its samples.
        "t2_accuracy_gap": mean["t2"]["accuracy"] - fixed["accuracy"],
        "t2_sample_share": mean["t2"]["samples"] / fixed["samples"],
        "t2_meets_target": mean["t2"]["accuracy"] >= fixed["accuracy"] - TOLERANCE
        and mean["t2"]["samples"] <= 0.5 * fixed["samples"],
    }


def margin_sweep(rows: dict[str, dict]) -> list[dict]:
    """t2 at each swept margin, averaged over the held-out sources, against fixed N_max."""
    margins = next(iter(rows.values())).get("t2_margins", {})
    fixed = np.mean([r["policies"]["fixed N_max"]["accuracy"] for r in rows.values()])
    n_max = np.mean([r["policies"]["fixed N_max"]["samples"] for r in rows.values()])
    out = []
    for m in margins:
        accuracy = float(np.mean([r["t2_margins"][m]["accuracy"] for r in rows.values()]))
        samples = float(np.mean([r["t2_margins"][m]["samples"] for r in rows.values()]))
        out.append(
            {
                "margin": m,
                "accuracy": accuracy,
                "samples": samples,
                "accuracy_gap": accuracy - float(fixed),
                "sample_share": samples / float(n_max),
                "meets_target": bool(accuracy >= fixed - TOLERANCE and samples <= 0.5 * n_max),
            }
        )
    return out


def format_row(name: str, row: dict) -> str:
    cells = "  ".join(f"{p['accuracy']:.3f} /{p['samples']:5.2f}" for p in row["policies"].values())
    gate = row.get("gate")
    fired = f"  {1 - gate.get('answerable', 0):6.0%}" if gate is not None else ""
    return f"{name[:18]:<18} {row['questions']:5d}  {row['margin']:6g}  {cells}  {row['mae_n']:5.2f}{fired}"


def report_table(result: dict) -> str:
    rows = result["sources"]
    names = list(next(iter(rows.values()))["policies"])
    head = "  ".join(f"{n[:13]:>13}" for n in names)
    gated = any("gate" in r for r in rows.values())
    lines = [
        f"leave-one-dataset-out, N_max {result['n_max']}, accuracy / mean samples "
        f"({result['orderings']} orderings per pool), t2 margin: {result['margin']}",
        f"{'held-out source':<18} {'qs':>5}  {'margin':>6}  {head}  {'MAE N':>5}"
        + ("  gate fired" if gated else ""),
    ]
    lines += [format_row(name, row) for name, row in rows.items()]
    mean = result["mean"]
    lines.append(
        f"{'mean over sources':<18} {'':>5}  {'':>6}  "
        + "  ".join(f"{p['accuracy']:.3f} /{p['samples']:5.2f}" for p in mean["policies"].values())
        + f"  {mean['mae_n']:5.2f}"
    )
    lines.append(
        f"t2 vs fixed N_max: {100 * mean['t2_accuracy_gap']:+.1f} points at {mean['t2_sample_share']:.0%} of its "
        f"samples (target: >= -1 point at <= 50%): {'met' if mean['t2_meets_target'] else 'missed'}"
    )
    for m in result.get("margin_sweep", []):
        lines.append(
            f"  t2 x{m['margin']:<4g} {m['accuracy']:.3f} /{m['samples']:5.2f}: {100 * m['accuracy_gap']:+.1f} points "
            f"at {m['sample_share']:.0%} ({'met' if m['meets_target'] else 'missed'})"
        )
    return "\n".join(lines)


def write_report(result: dict, out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["sources"]
    names = list(next(iter(rows.values()))["policies"])
    colors = {"fixed N_max": "#999", "t2": "#3b7dd8", "t2+learned": "#e07b39", "oracle N*": "#2a9d5c"}
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    x = np.arange(len(rows))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        for j, metric in enumerate(("accuracy", "samples")):
            ax[j].bar(
                x + (k - (len(names) - 1) / 2) * width,
                [r["policies"][name][metric] for r in rows.values()],
                width,
                label=name,
                color=colors.get(name),
            )
    for j, title in enumerate(("accuracy on the held-out source", "mean samples launched")):
        ax[j].set_xticks(x, list(rows), rotation=25, ha="right")
        ax[j].set_title(title)
    ax[0].legend(fontsize=8)
    fig.suptitle("Leave one data set out: head trained on the other sources")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
