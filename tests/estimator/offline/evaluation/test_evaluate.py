"""`t2serve evaluate`'s held-out report (estimator/offline/evaluation/evaluate.py) on synthetic labels."""

import numpy as np
import pytest

from estimator.gate import Gate
from estimator.offline.evaluation.evaluate import evaluate, report_table
from estimator.offline.training.probes import TrainConfig, fit, targets
from tests.estimator.offline.evaluation.test_leave_one_out import FALLBACKS, synthetic


def trained(records: list[dict], states: np.ndarray):
    split = np.array([r["split"] for r in records])
    train, val = np.flatnonzero(split == "train"), np.flatnonzero(split == "validation")
    return fit(
        states[train],
        targets([records[i] for i in train]),
        states[val],
        targets([records[i] for i in val]),
        model_name="synthetic",
        n_max=16,
        config=TrainConfig(epochs=10),
        progress=False,
    )


def test_the_default_policy_behind_the_gate_is_scored_as_the_server_routes_it():
    records, states = synthetic({"a": 0.7, "b": 0.3}, per_source=50)
    head = trained(records, states)
    test = [i for i, r in enumerate(records) if r["split"] == "test"]
    test_records, test_states = [records[i] for i in test], states[test].copy()
    test_states[:3, 0, 0] += 60.0  # what the probe below reads as open-ended
    test_states[3:6, 0, 1:] += 60.0  # far from everything, but not open-ended
    d = states.shape[2]
    gate = Gate(
        layer=0, mean=[0.0] * d, std=[1.0] * d, weights=[1.0] + [0.0] * (d - 1), bias=-30.0, radius=15.0
    )
    routes = [gate.route(s) for s in test_states]
    assert routes[:3] == ["open_ended"] * 3 and routes[3:6] == ["unfamiliar"] * 3
    assert set(routes[6:]) == {"answerable"}

    train = [r for r in records if r["split"] == "train"]
    result = evaluate(head, train, test_records, test_states, gate=gate, **FALLBACKS)
    assert result["gate"] == pytest.approx(
        {"open_ended": 3 / len(test), "unfamiliar": 3 / len(test), "answerable": 1 - 6 / len(test)}
    )
    ungated = evaluate(head, train, test_records, test_states, **FALLBACKS)
    assert ungated["gate"] is None and "t2 x1.5 + gate" not in ungated["policies"]

    # Expected: one sample for the open-ended ones, the default 8 for the unfamiliar ones and
    # the head's own choice (t2 x1.5) for the rest, each scored by its exact A_x(N).
    margin = ungated["policies"]["t2 x1.5 margin"]
    n_head = np.clip(np.round(16 * head.predict_batch(test_states) * 1.5), 1, 16).astype(int)
    n = np.concatenate([[1] * 3, [8] * 3, n_head[6:]])
    accuracy = np.array([r["accuracy"] for r in test_records])
    gated = result["policies"]["t2 x1.5 + gate"]
    assert gated["mean_n"] == pytest.approx(n.mean())
    assert gated["accuracy"] == pytest.approx(accuracy[np.arange(len(n)), n - 1].mean())
    assert margin["mean_n"] == pytest.approx(n_head.mean())
    assert "gate routes: answerable" in report_table(result)


def test_behind_the_gate_the_callers_fallback_n_is_used():
    from estimator.offline.evaluation.evaluate import gated

    routes = ["unfamiliar", "open_ended", "answerable"]
    n = gated(np.array([5, 5, 5]), routes, default_parallelism=3, open_ended_parallelism=2)
    assert n.tolist() == [3, 2, 5]
