"""The answer posterior (estimator/offline/labels/answer_posterior.py): fitted on made-up
gold pools whose leader is right often when it is a large majority and seldom when not."""

from __future__ import annotations

import numpy as np
import pytest

from estimator.offline.labels.answer_posterior import AnswerPosterior, answer_features, fit_posterior

N_MAX = 16
CLOSE = ["a"] * 6 + ["b"] * 5 + ["c"] * 5
CLEAR = ["a"] * 14 + ["b"] * 2


def made_up_pools(count: int, seed: int = 0) -> list[dict]:
    """Half close splits whose leader is right 20 % of the time (b another 20 %), half clear
    majorities whose leader is right 90 % of the time."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        close = i % 2 == 0
        u = rng.random()
        right = {"a": 0.2, "b": 0.4} if close else {"a": 0.9}  # cumulative
        answer = next((a for a, bound in right.items() if u < bound), "z")
        records.append({"id": str(i), "answers": CLOSE if close else CLEAR, "answer": answer})
    return records


@pytest.fixture(scope="module")
def posterior() -> AnswerPosterior:
    return fit_posterior(made_up_pools(2000))


def test_features_of_a_pool():
    keys, x = answer_features(["a", "b", None, "a"])
    assert keys == ["a", "b"]
    share, log_share, leader, lead, distinct, abstain = x[0]
    assert (share, leader, lead, distinct, abstain) == (0.5, 1.0, 0.25, 0.5, 0.25)
    assert log_share == pytest.approx(np.log(0.5))
    assert list(x[1][[0, 2, 3]]) == [0.25, 0.0, -0.25]


def test_the_fit_is_calibrated_on_what_it_saw(posterior):
    close, clear = posterior.probabilities(CLOSE), posterior.probabilities(CLEAR)
    assert close["a"] == pytest.approx(0.2, abs=0.05) and clear["a"] == pytest.approx(0.9, abs=0.05)
    assert sum(close.values()) <= 1 + 1e-9
    fitted = posterior.fitted
    assert fitted["pools"] == 2000 and fitted["answers"] == 1000 * 3 + 1000 * 2
    assert fitted["top_answer_predicted"] == pytest.approx(fitted["top_answer_right"], abs=0.05)


def test_saved_and_loaded_it_gives_the_same_probabilities(posterior, tmp_path):
    posterior.save(tmp_path / "calibration.json")
    loaded = AnswerPosterior.load(tmp_path / "calibration.json")
    assert loaded.probabilities(CLOSE) == pytest.approx(posterior.probabilities(CLOSE))
    (tmp_path / "other.json").write_text('{"kind": "something else"}')
    with pytest.raises(ValueError, match="not an answer calibration"):
        AnswerPosterior.load(tmp_path / "other.json")
    with pytest.raises(ValueError, match="pools of 16, this one has 4"):
        posterior.probabilities(["a"] * 4)


def test_pools_without_a_right_answer_are_needed_to_fit():
    with pytest.raises(ValueError, match="right and with wrong"):
        fit_posterior([{"id": "0", "answers": ["a"] * N_MAX, "answer": "a"}])
