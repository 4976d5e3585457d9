"""benchmarks/deployment.py's pure logic: which questions are held out, when checkpoints run,
the fixed-N curve between its points, the gauge read from /metrics, the replay of recorded
pools against gold, the exploration cost and the held-out scores (no engine)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.deployment import (
    count_for_split,
    due_checkpoints,
    exploration_cost,
    fixed_curve_at,
    gauge_policies,
    held_out_policies,
    parse_gauge,
    plot,
    report_table,
    score_held_out,
    traffic_truth,
)
from estimator.gate import Gate
from estimator.head import DEFAULT_HEAD, T2Head
from estimator.learned_stopping import StoppingTable
from estimator.offline.inputs.datasets import stable_subset
from estimator.offline.inputs.problems import Problem
from estimator.offline.labels.labeling import LabelConfig, label_record
from estimator.policies import Fixed


def problem(i: int, split: str) -> Problem:
    return Problem(f"q{i}", f"question {i}?", str(i % 7), "f", 0, split, source="s")


def test_the_count_holds_exactly_the_wanted_test_questions():
    problems = [problem(i, ("train", "test", "validation")[i % 3]) for i in range(60)]
    count = count_for_split(problems, 7)
    assert sum(p.split == "test" for p in stable_subset(problems, count)) == 7
    assert sum(p.split == "test" for p in stable_subset(problems, count - 1)) == 6
    assert count_for_split(problems, 1000) == 60  # fewer than wanted: all


def test_checkpoints_run_once_each_when_reached():
    assert due_checkpoints(24, [25, 50], []) == []
    assert due_checkpoints(27, [25, 50], []) == [25]
    assert due_checkpoints(55, [25, 50], [25]) == [50]
    assert due_checkpoints(120, [25, 50, 100], []) == [25, 50, 100]


def test_the_fixed_curve_is_linear_between_its_points_and_flat_past_them():
    curve = [0.1, 0.3, 0.4]
    assert (
        fixed_curve_at(curve, 1) == 0.1
        and fixed_curve_at(curve, 2) == 0.3
        and fixed_curve_at(curve, 3) == 0.4
    )
    assert fixed_curve_at(curve, 1.5) == pytest.approx(0.2)
    assert fixed_curve_at(curve, 0.5) == 0.1 and fixed_curve_at(curve, 9) == 0.4


def test_the_gauge_is_read_per_policy_from_a_scrape():
    text = "\n".join(
        [
            "# TYPE t2serve_shadow_agreement gauge",
            't2serve_shadow_agreement{policy="auto"} 0.9',
            't2serve_shadow_agreement{policy="fixed:n=1"} 0.5',
            "# TYPE t2serve_shadow_samples gauge",
            't2serve_shadow_samples{policy="auto"} 4.5',
            "# TYPE t2serve_other gauge",
            't2serve_other{policy="auto"} 7',
        ]
    )
    assert parse_gauge(text) == {"auto": {"agreement": 0.9, "samples": 4.5}, "fixed:n=1": {"agreement": 0.5}}


def test_recorded_pools_replay_against_gold_and_the_loss_stays_within_its_bound():
    records = [
        {"request_id": "a", "answers": ["1", "2", "2", "2"]},  # fixed 1 disagrees, and is wrong
        {"request_id": "b", "answers": ["3", "3", "4", "3"]},
        {"request_id": "c", "answers": ["5", "6", "6", "6"]},  # no gold: agreement only
    ]
    gold = {"a": {"2"}, "b": {"3"}}
    rows = traffic_truth(records, gold, {"fixed:n=1": Fixed(1), "fixed:n=4": Fixed(4)}, default=4)
    one, four = rows["fixed:n=1"], rows["fixed:n=4"]
    assert one["agreement"] == pytest.approx(1 / 3) and one["samples"] == 1 and one["graded"] == 2
    assert one["accuracy"] == 0.5 and one["accuracy_n_max"] == 1.0 and one["loss"] == 0.5
    assert one["loss"] <= one["bound"] + 1e-12
    assert four["agreement"] == 1.0 and four["loss"] == 0.0 and four["bound"] == 0.0


def test_exploration_costs_what_it_launches_beyond_auto():
    replies = [
        {"explored": True, "launched": 16},
        {"explored": True, "launched": 16},
        {"explored": False, "launched": 4},
        {"explored": False, "launched": 4},
    ]
    cost = exploration_cost(replies, auto_on_explored=8.0)  # auto would have run 4 on each explored pool
    assert cost["samples_spent"] == 40 and cost["samples_auto_would_spend"] == 16
    assert cost["extra_fraction"] == pytest.approx(24 / 16) and cost["extra_per_explored_request"] == 12
    assert cost["extra_fraction_at_p05"] == pytest.approx(0.05 * 12 / 4)


def held_out_labels(count: int = 12) -> tuple[list[dict], np.ndarray]:
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        answers = [str(rng.integers(0, 3)) for _ in range(16)]
        records.append(label_record(problem(i, "test"), answers, [10] * 16, LabelConfig(), grader=None))
    return records, rng.normal(size=(count, 30, 576)).astype(np.float32)


def test_held_out_scores_put_fixed_n_on_its_own_curve_and_score_every_policy(tmp_path):
    head, stopping = T2Head.load(DEFAULT_HEAD), StoppingTable.load(DEFAULT_HEAD)
    records, states = held_out_labels()
    policies = held_out_policies(head, stopping, "esc:window=2,max=16")
    assert {"auto (default)", "t2+learned", "tuned", "fixed:n=1", "fixed:n=16"} <= set(policies)
    scored = score_held_out(records, states, head, Gate.load(DEFAULT_HEAD), policies, orderings=5, seed=0)
    curve = np.mean([r["accuracy"] for r in records], axis=0)
    assert scored["fixed_curve"] == pytest.approx(curve.tolist())
    for n in (1, 8, 16):
        row = scored["policies"][f"fixed:n={n}"]
        assert (
            row["samples"] == n and row["accuracy"] == pytest.approx(curve[n - 1]) and row["over_curve"] == 0
        )
    assert 1 <= scored["policies"]["tuned"]["samples"] <= 16 and sum(
        scored["gate"].values()
    ) == pytest.approx(1)
    gauge = gauge_policies(head, stopping, ["auto", "esc", "fixed:n=3"])
    assert set(gauge) == {"auto", "esc", "fixed:n=3"} and gauge["fixed:n=3"] == Fixed(3)
    point = {
        "explored": 25,
        "requests": 50,
        "tuned": "esc:window=2,max=16",
        "tune_tuning": {"agreement": 0.99, "samples": 9.0},
        "head": "smollm2-135m-instruct",
        "retrain": {"status": "off"},
        "reload": {"status": "policy"},
        "gauge": {
            label: {**row, "live_agreement": row["agreement"]}
            for label, row in traffic_truth(
                [{"request_id": "a", "answers": ["1"] * 16}], {"a": {"1"}}, gauge, default=8
            ).items()
        },
        "gauge_truth_pools": 1,
        "held_out": scored,
    }
    result = {
        "checkpoints": [point],
        "exploration_cost": exploration_cost([{"explored": True, "launched": 16}], 4.0),
    }
    table = report_table(result)
    assert "tuned" in table and "checkpoint 25 explored" in table and "exploration: 1 of 1" in table
    plot(result, tmp_path / "deployment.png")
    assert (tmp_path / "deployment.png").stat().st_size > 0
