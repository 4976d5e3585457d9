"""benchmarks/gold_free_heads.py's scoring and summary on synthetic pools: pure logic."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.gold_free_heads import curve_of_expected, score, summarise
from estimator.offline.labels.gold_free import with_targets
from tests.estimator.offline.evaluation.test_comparison import ConstantHead, synthetic_records


def test_a_constant_head_sits_exactly_on_the_fixed_n_curve():
    """A head that gives every question the same N is a fixed N: zero above the curve, where
    the curve is still rising (past its peak the running maximum is not beaten for free)."""
    records = synthetic_records(1, count=30)
    result = score(ConstantHead(0.25), 1.0, records, np.zeros((30, 1, 1)))
    accuracy = np.array([r["accuracy"] for r in records]).mean(axis=0)
    at_margin = result["at_margin"][0]
    assert at_margin["samples"] == 4.0 and at_margin["accuracy"] == pytest.approx(accuracy[3])
    best = np.maximum.accumulate(accuracy)
    for point in result["points"]:
        n = int(point["samples"])
        assert point["samples"] == n  # one N for every question
        assert point["above"] == pytest.approx(accuracy[n - 1] - best[n - 1])
    assert result["mid_above"] <= 1e-12


def test_the_summary_pools_directions_by_test_questions_and_divides_by_gold():
    folders = {"a": ([{}] * 300, None), "b": ([{}] * 100, None)}
    runs = [
        {
            "rule": rule,
            "train": train,
            "test": test,
            "seed": seed,
            "mid_above": value,
            "mean_target_n_star": 4.0,
        }
        for rule, values in {"gold": (0.004, 0.008), "rule": (0.002, 0.004)}.items()
        for seed in (0, 1)
        for (train, test), value in zip((("a", "b"), ("b", "a")), values, strict=True)
    ]
    gold, rule = summarise(runs, ["gold", "rule"], folders)
    # b -> a weighs 300 test questions, a -> b 100.
    assert gold["mid_above"] == pytest.approx((100 * 0.004 + 300 * 0.008) / 400)
    assert gold["seed_spread"] == pytest.approx(0.0) and gold["share_of_gold"] == pytest.approx(1.0)
    assert rule["share_of_gold"] == pytest.approx(0.5)
    assert rule["by_direction"] == {"a->b": pytest.approx(0.002), "b->a": pytest.approx(0.004)}


def test_the_earlier_rule_takes_n_star_of_the_expected_curve():
    records = [{**r, "id": str(i)} for i, r in enumerate(synthetic_records(2, count=5))]
    expected = with_targets(records, "share")
    earlier = curve_of_expected(expected, 0.0)
    for now, before in zip(expected, earlier, strict=True):
        curve = np.array(now["target_accuracy"])
        assert before["target_n_star"] == int(np.argmax(curve >= curve.max() - 1e-9)) + 1
        assert before["target_accuracy"] == now["target_accuracy"]  # only N* changes
