"""The offline replay of sampling policies on labelled pools (estimator/offline/evaluation/replay.py)."""

import numpy as np
import pytest

from estimator.offline.evaluation.replay import (
    Pool,
    PoolReplay,
    oracle_frontier,
    orderings_for,
    replay_matrix,
    summarise,
)
from estimator.offline.labels.targets import expected_accuracy
from estimator.policies import ESC, T2, AdaptiveConsistency, Composition, Fixed
from estimator.replay import drive


def test_replay_of_fixed_n_converges_to_exact_accuracy():
    answers = ["1", "2", "1", None, "3", "2", "1", "2"]
    pool = Pool(answers, [10] * len(answers), gold="1", prediction=0.5)
    count = 4000
    replay = PoolReplay(pool, orderings_for(1, len(answers), count, seed=3)[0], default=len(answers))
    exact = expected_accuracy(answers, "1")
    for n in range(1, len(answers) + 1):
        measured = replay.replay(Fixed(n))["accuracy"]
        assert measured == pytest.approx(exact[n - 1], abs=4 * 0.5 / np.sqrt(count))


def test_replay_fast_path_equals_driving_the_policy():
    answers = ["a", "b", "a", "a", "c", None]
    pool = Pool(answers, [5, 6, 7, 8, 9, 10], gold="a", prediction=0.5)
    replay = PoolReplay(pool, orderings_for(1, 6, 50, seed=0)[0], default=6)
    for seq in replay.sequences:
        assert drive(Fixed(4), replay.budget, seq) == drive(T2(4 / 3), replay.budget, seq)
        assert drive(Fixed(4), replay.budget, seq).finished == 4


def test_replay_costs_of_aborted_samples():
    # Unanimous pool: beta at 0.9 decides after 3 answers; the T2 estimate launched 8 at once.
    pool = Pool(["4"] * 8, [10, 20, 30, 40, 50, 60, 70, 80], gold="4", prediction=1.0)
    replay = PoolReplay(pool, np.array([[0, 1, 2, 3, 4, 5, 6, 7]]), default=8)
    out = replay.replay(Composition("beta", 0.9, margin=1.0))
    assert (out["launched"], out["finished"], out["rounds"], out["accuracy"]) == (8, 3, 1, 1.0)
    # finished 10+20+30, aborted 40..80 each charged the stopping sample's 30 tokens.
    assert out["tokens"] == pytest.approx((60 + 5 * 30) / 360)
    assert out["tokens_upper"] == pytest.approx(1.0)
    sequential = replay.replay(AdaptiveConsistency("beta", 0.9))
    assert (sequential["launched"], sequential["finished"], sequential["rounds"]) == (3, 3, 3)


def test_replay_gives_every_policy_the_same_samples():
    pools = [
        Pool(["0"] * 5 + ["1"] * 3, [5, 9, 7, 3, 8, 6, 4, 2], "0", 0.5),
        Pool(["2"] * 4 + [None] * 4, [5] * 8, "0", 0.1),
        Pool(["0", "1", "1", "2", "0", "0", "1", "0"], [1, 2, 3, 4, 5, 6, 7, 8], "0", 1.0),
    ]
    policies = [Fixed(8), ESC(3), Fixed(8)]
    rows = summarise(policies, replay_matrix(pools, policies, orderings=20, seed=0, default=8))
    assert rows[0] == rows[2]
    # No ties among all 8 samples, so the full vote does not depend on the order: 2 of 3 right.
    assert rows[0]["accuracy"] == pytest.approx(2 / 3)
    assert rows[0]["tokens"] == rows[0]["tokens_upper"] == pytest.approx(1.0)
    assert rows[1]["launched"] < 8


def test_oracle_frontier_starts_at_n_star_and_shrinks():
    acc = np.array([[0.2, 0.6, 0.6, 0.7], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    front = oracle_frontier(acc, np.array([0.0, 0.06, 1.0]))
    assert front[0] == {"lambda": 0.0, "accuracy": pytest.approx(1.7 / 3), "launched": 2.0}
    # lambda 0.06: +0.1 accuracy for 2 more samples is not worth 0.12.
    assert front[1] == {"lambda": 0.06, "accuracy": pytest.approx(1.6 / 3), "launched": pytest.approx(4 / 3)}
    assert front[2]["launched"] == 1.0


def test_vote_over_prefixes_uses_the_server_rule():
    # "first seen wins" on ties: the replay's correctness table must follow it.
    pool = Pool(["2", "1", "1", "2"], [1, 1, 1, 1], gold="2")
    replay = PoolReplay(pool, np.array([[0, 1, 2, 3]]), default=4)
    assert list(replay.correct[0, 1:]) == [1.0, 1.0, 0.0, 1.0]


def test_a_pool_with_several_correct_keys_counts_a_vote_for_any_of_them():
    pool = Pool(["a", "b", "b", "c"], [1, 1, 1, 1], gold=frozenset({"a", "b"}), prediction=1.0)
    replay = PoolReplay(pool, np.array([[3, 0, 1, 2], [0, 3, 1, 2]]), default=4)
    # After one sample: "c" (wrong), then "a" (right); after all four "b" wins (right).
    assert replay.correct[:, 1].tolist() == [0.0, 1.0]
    assert replay.correct[:, 4].tolist() == [1.0, 1.0]
