"""The answer posterior's states part (estimator/offline/labels/leader_states.py): on made-up
gold pools that all look alike (one close split), whether the leader is right shows only in
one layer of the states."""

from __future__ import annotations

import numpy as np
import pytest

from estimator.offline.labels.answer_posterior import AnswerPosterior, fit_posterior
from estimator.offline.labels.leader_states import auc, fit_leader_states

N_MAX = 16
LAYERS, HIDDEN = 3, 12
CLOSE = ["a"] * 6 + ["b"] * 5 + ["c"] * 5


def made_up(count: int, signal: float, seed: int = 0) -> tuple[list[dict], np.ndarray]:
    """`count` pools of the same split; the leader "a" is right in half of them, else "b" is.
    Layer 1's first unit is shifted by +signal where "a" is right, -signal where not."""
    rng = np.random.default_rng(seed)
    right = rng.random(count) < 0.5
    states = rng.normal(0, 1, (count, LAYERS, HIDDEN))
    states[:, 1, 0] += np.where(right, signal, -signal)
    records = [{"id": str(i), "answers": CLOSE, "answer": "a" if r else "b"} for i, r in enumerate(right)]
    return records, states


def test_the_states_part_finds_the_layer_that_knows_and_beats_the_pool_alone():
    records, states = made_up(400, signal=2.0)
    posterior = fit_posterior(records, states=states)
    report = posterior.fitted["states"]
    assert report["kept"] and report["layer"] == 1 and posterior.leader_states is not None
    # The pool features cannot tell these pools apart; the states can.
    assert report["pool_only"]["auc"] <= 0.55
    assert report["with_states"]["auc"] > 0.9
    assert report["with_states"]["log_loss"] < report["pool_only"]["log_loss"]
    test, test_states = made_up(200, signal=2.0, seed=1)
    p = np.array(
        [posterior.probabilities(r["answers"], s)["a"] for r, s in zip(test, test_states, strict=True)]
    )
    assert auc(p, np.array([r["answer"] == "a" for r in test], dtype=float)) > 0.9


def test_the_other_answers_share_what_the_leader_leaves():
    records, states = made_up(400, signal=2.0)
    posterior = fit_posterior(records, states=states)
    pool_only = fit_posterior(records)
    for state in states[:20]:
        p, base = posterior.probabilities(CLOSE, state), pool_only.probabilities(CLOSE)
        assert sum(p.values()) <= 1 + 1e-9
        scale = min(1.0, (1 - p["a"]) / (base["b"] + base["c"]))
        assert p["b"] == pytest.approx(base["b"] * scale) and p["c"] == pytest.approx(base["c"] * scale)


def test_states_without_signal_are_not_kept_and_too_few_pools_are_said():
    records, states = made_up(400, signal=0.0)
    posterior = fit_posterior(records, states=states)
    assert posterior.leader_states is None and not posterior.fitted["states"]["kept"]
    assert posterior.probabilities(CLOSE) == fit_posterior(records).probabilities(CLOSE)  # no states needed
    few = np.array([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    part, report = fit_leader_states(np.zeros((6, 6)), np.zeros((6, LAYERS, HIDDEN)), few)
    assert part is None and "too few gold pools: 3 right and 3 wrong leaders" in report["reason"]


def test_saved_and_loaded_it_reads_the_same_and_asks_for_states_of_its_shape(tmp_path):
    records, states = made_up(400, signal=2.0)
    posterior = fit_posterior(records, states=states)
    posterior.save(tmp_path / "calibration.json")
    loaded = AnswerPosterior.load(tmp_path / "calibration.json")
    assert loaded.leader_states == posterior.leader_states
    assert loaded.probabilities(CLOSE, states[0]) == pytest.approx(posterior.probabilities(CLOSE, states[0]))
    with pytest.raises(ValueError, match="reads the questions' states"):
        loaded.probabilities(CLOSE)
    with pytest.raises(ValueError, match="states of 3 layers x 12, these are 2 x 12"):
        loaded.probabilities(CLOSE, states[0, :2])
