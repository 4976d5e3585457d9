"""The equal-accuracy policy comparison (estimator/offline/evaluation/comparison.py) and the `evaluate`
command's replay options, on synthetic records."""

import json

import numpy as np
import pytest

from estimator.offline.labels.targets import expected_accuracy


class ConstantHead:
    """Stands in for T2Head: the same prediction for every question."""

    identity = "constant"

    def __init__(self, prediction: float):
        self.prediction = prediction

    def predict_batch(self, states):
        return np.full(len(states), self.prediction)


def synthetic_records(seed: int, count: int = 12) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(count):
        answers = [str(a) if a < 4 else None for a in rng.choice(5, size=16, p=[0.5, 0.2, 0.1, 0.1, 0.1])]
        accuracy = expected_accuracy(answers, "0")
        records.append(
            {
                "answers": answers,
                "tokens": [int(t) for t in rng.integers(5, 48, size=16)],
                "answer": "0",
                "accuracy": list(accuracy),
                "n_star": int(np.argmax(accuracy >= accuracy.max() - 1e-9)) + 1,
            }
        )
    return records


def test_compare_policies_selects_on_validation_and_writes_the_report(tmp_path):
    from estimator.offline.evaluation import comparison

    val, test = synthetic_records(0), synthetic_records(1)
    result = comparison.compare_policies(
        ConstantHead(0.25),
        val,
        np.zeros((len(val), 1, 1)),
        test,
        np.zeros((len(test), 1, 1)),
        orderings=10,
        names=("fixed", "t2", "esc", "t2+beta"),
    )
    assert set(result["selected"]) == {"fixed", "t2", "esc", "t2+beta"}
    val_rows = result["splits"]["validation"]["rows"]
    for name, pick in result["selected"].items():
        # The selected knob is the cheapest on validation that reaches the validation target.
        reaching = [
            r
            for r in val_rows
            if r["policy"] == name and r["accuracy"] >= result["splits"]["validation"]["target"] - 1e-12
        ]
        assert pick["validation_launched"] == min(r["launched"] for r in reaching)
    assert result["selected"]["fixed"]["launched"] <= 16
    table = comparison.report_table(result)
    assert "t2+beta" in table and "fewest samples" in table
    comparison.write_report(result, tmp_path / "policies")
    assert (tmp_path / "policies.png").stat().st_size > 0
    assert json.loads((tmp_path / "policies.json").read_text())["orderings"] == 10


def test_the_comparison_runs_on_keys_from_any_aggregator():
    """Records keyed by similarity groups, with several right groups (`gold_keys`): the
    replayed fixed-N accuracy is the labels' own A(N)."""
    from estimator.offline.evaluation import comparison

    rng = np.random.default_rng(4)
    groups = ["#1: seven", "#2: it is 7", "#3: nine", "#4: no idea"]
    records = []
    for _ in range(10):
        answers = [str(g) for g in rng.choice(groups, size=16, p=[0.3, 0.2, 0.4, 0.1])]
        gold = ["#1: seven", "#2: it is 7"]
        accuracy = expected_accuracy(answers, gold)
        records.append(
            {
                "answers": answers,
                "gold_keys": gold,
                "answer": "7",
                "tokens": [10] * 16,
                "accuracy": list(accuracy),
                "n_star": int(np.argmax(accuracy >= accuracy.max() - 1e-9)) + 1,
            }
        )
    result = comparison.compare_policies(
        ConstantHead(0.5),
        records,
        np.zeros((10, 1, 1)),
        records,
        np.zeros((10, 1, 1)),
        orderings=400,
        names=("fixed", "t2"),
    )
    rows = {r["knobs"]: r for r in result["splits"]["test"]["rows"] if r["policy"] == "fixed"}
    for n in (1, 4, 16):
        labelled = np.mean([r["accuracy"][n - 1] for r in records])
        assert rows[f"n={n}"]["accuracy"] == pytest.approx(labelled, abs=0.04)
    # Counting only the first group as right (the answer-string rule) scores lower.
    assert rows["n=16"]["accuracy"] > np.mean(
        [expected_accuracy(r["answers"], "#1: seven")[-1] for r in records]
    )


def test_samples_at_interpolates_on_the_pareto_front():
    from estimator.offline.evaluation.comparison import pareto, samples_at

    points = [
        {"launched": 1.0, "accuracy": 0.40},
        {"launched": 3.0, "accuracy": 0.38},  # dominated: more samples, less accuracy
        {"launched": 4.0, "accuracy": 0.50},
        {"launched": 8.0, "accuracy": 0.55},
    ]
    assert [p["launched"] for p in pareto(points)] == [1.0, 4.0, 8.0]
    assert samples_at(points, 0.45) == pytest.approx(2.5)
    assert samples_at(points, 0.30) == 1.0
    assert samples_at(points, 0.60) is None


def test_the_grid_is_keyed_by_registry_names_and_its_rows_are_specs():
    """Every policy the comparison replays is named as `--policy` names it: its row's
    `policy:knobs` parses back to it."""
    from estimator.offline.evaluation.comparison import POLICY_NAMES, policy_grid
    from estimator.offline.training.stopping_fit import fit_stopping
    from estimator.policies import policy_names
    from estimator.policy_spec import parse_policy

    assert set(POLICY_NAMES) <= set(policy_names())
    table = fit_stopping(synthetic_records(3, count=8), np.full(8, 0.25), orderings=5, progress=False)
    grid = policy_grid(16, stopping=table)
    assert {p.name for p in grid} == set(POLICY_NAMES)
    for p in grid:
        assert parse_policy(f"{p.name}:{p.knobs}", fixed_n=16, margin=1.0, stopping=table) == p
    assert {p.name for p in policy_grid(16, ("esc",))} == {"esc", "fixed"}  # fixed N_max: the reference
