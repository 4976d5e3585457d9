"""Label math against brute force on small pools."""

from itertools import combinations

import numpy as np
import pytest

from estimator.offline.labels.targets import (
    expected_accuracy,
    expected_accuracy_mc,
    overscaling_index,
    sample_optimal_n,
    sample_type,
    system_optimal_n,
)
from server.voting import majority_vote


def brute_force(answers, gold):
    """Every N-subset of the pool; fractional credit for ties (the definition, literally):
    a tie is worth the share of its keys that are correct (`gold`: one key or a set)."""
    right = {gold} if isinstance(gold, str) else set(gold)
    out = []
    for n in range(1, len(answers) + 1):
        credit = []
        for subset in combinations(answers, n):
            vote = majority_vote(list(subset))
            tied = [a for a, c in vote.votes.items() if vote.votes and c == max(vote.votes.values())]
            credit.append(sum(a in right for a in tied) / len(tied) if tied else 0.0)
        out.append(np.mean(credit))
    return np.array(out)


POOLS = [
    (["1", "1", "2", None, "1", "3", "2"], "1"),
    (["2", "2", "1", "3", "1", "2", None, None], "1"),
    ([None, None, "5", None], "5"),
    (["a", "b", "c", "d", "a", "b"], "c"),
    (["7"] * 6, "7"),
    (["8", "9", "9", "9", "8"], "4"),
    (["x", "y", "y", "x", "z", "x", "y", "z", "x"], "y"),
]


@pytest.mark.parametrize(("answers", "gold"), POOLS)
def test_exact_matches_brute_force(answers, gold):
    np.testing.assert_allclose(expected_accuracy(answers, gold), brute_force(answers, gold), atol=1e-12)


@pytest.mark.parametrize(("answers", "gold"), POOLS)
def test_monte_carlo_within_standard_error(answers, gold):
    tau = 20_000
    exact = expected_accuracy(answers, gold)
    mc = expected_accuracy_mc(answers, gold, tau=tau, seed=1)
    assert np.all(np.abs(mc - exact) <= 4 * 0.5 / np.sqrt(tau))


MULTI_GOLD = [
    (["1", "1", "2", None, "1.0", "3", "2", "1.0"], {"1", "1.0"}),
    (["pi/2", "x", "x", "\\frac{pi}{2}", "x", "pi/2"], {"pi/2", "\\frac{pi}{2}"}),
    (["#1: a", "#2: b", "#2: b", "#1: a", "#3: c"], {"#1: a", "#3: c"}),
]


@pytest.mark.parametrize(("answers", "gold"), MULTI_GOLD)
def test_several_correct_keys_stay_apart_in_the_vote(answers, gold):
    """Labels keyed by another aggregator, or graded by math-verify, can have several right
    keys: A(N) (Monte Carlo then) matches brute force, and a one-key gold is still exact."""
    got = expected_accuracy(answers, gold)
    assert np.all(np.abs(got - brute_force(answers, gold)) <= 4 * 0.5 / np.sqrt(4_000))
    one = sorted(gold)[:1]
    np.testing.assert_allclose(expected_accuracy(answers, one), brute_force(answers, one[0]), atol=1e-12)


def test_exact_handles_large_pools():
    rng = np.random.default_rng(0)
    answers = [str(a) if a < 6 else None for a in rng.integers(0, 8, size=64)]
    exact = expected_accuracy(answers, "0")
    mc = expected_accuracy_mc(answers, "0", tau=10_000, seed=2)
    assert exact.shape == (64,)
    assert np.max(np.abs(exact - mc)) < 0.02


def test_sample_optimal_and_system_optimal():
    acc = np.array([[0.5, 0.5, 0.7, 0.7, 0.9], [1, 1, 1, 1, 1], [0.0, 0.1, 0.2, 0.1, 0.0]])
    assert [sample_optimal_n(a) for a in acc] == [5, 1, 3]
    assert sample_optimal_n(acc[0], eps=0.2) == 3
    # Mean curve [0.5, 0.53, 0.63, 0.6, 0.63]: N=3 and N=5 tie for the max; the smallest wins.
    assert system_optimal_n(acc) == 3
    assert system_optimal_n(acc[:2]) == 5
    assert overscaling_index([5, 1, 3], 5) == pytest.approx(0.6)


@pytest.mark.parametrize(
    ("curve", "kind"),
    [
        ([1, 1, 1, 1], 1),
        ([0.96, 0.99, 1, 1], 1),
        ([0, 0, 0, 0], 2),
        ([0.04, 0.01, 0, 0], 2),
        ([0.4, 0.3, 0.2, 0.1], 3),
        ([0.4, 0.4 + 1e-12, 0.2, 0.1], 3),  # float rounding does not count as a rise
        ([0.4, 0.405, 0.2, 0.1], 5),  # a real rise, then a fall
        ([0.4, 0.5, 0.5, 0.9], 4),
        ([0.4, 0.6, 0.5, 0.45], 5),
        ([0.4, 0.6, 0.5, 0.3], 5),
        ([0.5, 0.3, 0.4, 0.6], 5),
    ],
)
def test_sample_types(curve, kind):
    assert sample_type(np.array(curve, dtype=float)) == kind


def test_types_of_real_pools():
    assert sample_type(expected_accuracy(["7"] * 6, "7")) == 1
    assert sample_type(expected_accuracy(["8", "9", "9"], "4")) == 2
    assert sample_type(expected_accuracy(["1", "2", "2", "2", "3"], "1")) == 3
    assert sample_type(expected_accuracy(["1", "1", "1", "2", "3"], "1")) == 4
