"""Gold-free training targets (estimator/offline/labels/gold_free.py) on hand-made pools."""

from __future__ import annotations

import numpy as np
import pytest

from estimator.offline.labels.answer_posterior import FEATURES, AnswerPosterior
from estimator.offline.labels.gold_free import answer_probabilities, expected_curve, pool_target, with_targets
from estimator.offline.labels.targets import expected_accuracy, sample_optimal_n

N_MAX = 16
UNANIMOUS = ["a"] * N_MAX
SPLIT = ["a"] * 7 + ["b"] * 5 + ["c"] * 4  # a leads, far from a majority of the pool


def share_posterior(weight: float, bias: float) -> AnswerPosterior:
    """p(a) = sigmoid(weight * share(a) + bias): a hand-set calibration on the vote share alone."""
    weights = [weight] + [0.0] * (len(FEATURES) - 1)
    return AnswerPosterior(weights, bias, [0.0] * len(FEATURES), [1.0] * len(FEATURES), N_MAX)


# A unanimous answer is right with p 0.95; one named by 7 of 16 with p 0.05.
LOGIT_95 = float(np.log(19))  # sigmoid(LOGIT_95) = 0.95
WEIGHT = 2 * LOGIT_95 / (1 - 7 / 16)
CONFIDENT_WHEN_UNANIMOUS = share_posterior(weight=WEIGHT, bias=LOGIT_95 - WEIGHT)


def test_the_expected_curve_is_the_gold_curve_when_one_answer_is_certain():
    assert expected_curve(SPLIT, {"a": 1.0}) == pytest.approx(expected_accuracy(SPLIT, "a"))
    assert expected_curve(SPLIT, {}) == pytest.approx(np.zeros(N_MAX))  # no answer right: A = 0
    # Linear in p: half the mass on a, a quarter on b.
    mixed = 0.5 * expected_accuracy(SPLIT, "a") + 0.25 * expected_accuracy(SPLIT, "b")
    assert expected_curve(SPLIT, {"a": 0.5, "b": 0.25}) == pytest.approx(mixed)


def test_majority_and_share_rules():
    assert answer_probabilities(SPLIT, "majority") == {"a": 1.0}
    assert answer_probabilities(SPLIT, "share") == {"a": 7 / 16, "b": 5 / 16, "c": 4 / 16}
    # With answers as likely right as their shares, one sample is right with sum share^2.
    share_curve = expected_curve(SPLIT, answer_probabilities(SPLIT, "share"))
    assert share_curve[0] == pytest.approx((49 + 25 + 16) / 256)
    assert answer_probabilities([None] * N_MAX, "majority") == {}
    with pytest.raises(ValueError, match="need a calibration"):
        answer_probabilities(SPLIT, "posterior")


def test_the_hand_set_posterior_is_what_it_says():
    p = CONFIDENT_WHEN_UNANIMOUS.probabilities(UNANIMOUS)
    assert p == {"a": pytest.approx(0.95)}
    assert CONFIDENT_WHEN_UNANIMOUS.probabilities(SPLIT)["a"] == pytest.approx(0.05)


def test_a_split_pool_whose_majority_is_unlikely_right_gets_a_small_n_star():
    """Against its own majority the split pool reaches agreement 1 only late; under a posterior
    that trusts its majority little, its curve is flat and its N* small."""
    unanimous, split = {"id": "u", "answers": UNANIMOUS}, {"id": "s", "answers": SPLIT}
    majority = pool_target(split, "majority", eps=0.02)
    posterior = pool_target(split, "posterior", posterior=CONFIDENT_WHEN_UNANIMOUS, eps=0.02)
    assert majority.curve[-1] == pytest.approx(1.0) and majority.n_star >= 10
    assert posterior.curve.max() - posterior.curve.min() < 0.1  # flat
    assert posterior.n_star < majority.n_star and posterior.n_star <= N_MAX // 4
    # The unanimous pool: flat at p(a) = 0.95 under the posterior, N* = 1 under every rule.
    assert pool_target(unanimous, "posterior", posterior=CONFIDENT_WHEN_UNANIMOUS).curve == pytest.approx(
        np.full(N_MAX, 0.95)
    )
    assert {
        pool_target(unanimous, rule, posterior=CONFIDENT_WHEN_UNANIMOUS).n_star
        for rule in ("majority", "share", "posterior")
    } == {1}
    # A posterior that trusts every pool's leader gives the split pool the majority's N* back.
    leader = FEATURES.index("leader")
    trusting = AnswerPosterior(
        [20.0 if i == leader else 0.0 for i in range(len(FEATURES))], -10.0, [0.0] * 6, [1.0] * 6, N_MAX
    )
    assert pool_target(split, "posterior", posterior=trusting, eps=0.02).n_star == pytest.approx(
        majority.n_star, abs=0.01
    )


def test_the_target_is_the_gold_n_star_expected_under_the_rule():
    """Not the N* of the expected curve: a pool whose leader is right half the time mixes a
    curve that rises to N_max with falling ones, and the mix still peaks late."""
    split = {"id": "s", "answers": SPLIT}
    n_star = {a: sample_optimal_n(expected_accuracy(SPLIT, a)) for a in "abc"}
    assert n_star["a"] >= 10 and n_star["b"] == n_star["c"] == 1
    share = pool_target(split, "share")
    assert share.n_star == pytest.approx(7 / 16 * n_star["a"] + 9 / 16 * 1)
    assert share.n_star < sample_optimal_n(share.curve) - 4  # the mixed curve's N* is much later
    trusting_a_third = share_posterior(weight=0.0, bias=-float(np.log(2)))  # p = 1/3 for each answer
    assert pool_target(split, "posterior", posterior=trusting_a_third).n_star == pytest.approx(
        (n_star["a"] + 2) / 3
    )
    # No answer right (every sample abstained): N* = 1.
    assert pool_target({"id": "n", "answers": [None] * N_MAX}, "share").n_star == 1


def test_records_keep_gold_unless_a_rule_is_asked_and_gold_is_refused_without_gold():
    labelled = {
        "id": "l",
        "answers": SPLIT,
        "answer": "b",
        "accuracy": list(expected_accuracy(SPLIT, "b")),
        "n_star": 1,
    }
    traffic = {"id": "t", "answers": SPLIT}
    default = with_targets([labelled, traffic], None, fallback="share", eps=0.02)
    assert [r["target_rule"] for r in default] == ["gold", "share"]
    assert default[0]["target_n_star"] == 1 and default[0]["target_accuracy"] == pytest.approx(
        labelled["accuracy"]
    )
    assert [r["target_rule"] for r in with_targets([labelled, traffic], "majority")] == ["majority"] * 2
    with pytest.raises(ValueError, match="record t has no gold answer"):
        with_targets([labelled, traffic], "gold")
