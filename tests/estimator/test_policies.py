"""Sampling policies (estimator/policies.py): criteria and decisions; `drive` (the replay's
driver, estimator/replay.py) checks that every policy keeps the launch/stop protocol."""

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest

from estimator.criteria import beta_confidence, confidence, dirichlet_confidence
from estimator.policies import (
    ESC,
    STOP,
    T2,
    WAIT,
    AdaptiveConsistency,
    Budget,
    Composition,
    Decision,
    Fixed,
    LearnedStop,
    Tally,
    choose_parallelism,
)
from estimator.replay import drive

BUDGET = Budget(prediction=0.25, n_max=16, default=8, cap=16)  # T2 estimate: 4 samples


def tally(*answers):
    t = Tally()
    for a in answers:
        t.add(a)
    return t


ALL_POLICIES = [
    Fixed(1),
    Fixed(16),
    T2(1.0),
    T2(4.0),
    ESC(2),
    ESC(5),
    AdaptiveConsistency("beta", 0.95),
    AdaptiveConsistency("dirichlet", 0.8, batch=3),
    Composition("beta", 0.95, 1.0),
    Composition("dirichlet", 0.9, 0.5, extend=2),
    Composition("beta", 0.8, 0.5, max_factor=2.0),
    Composition("beta", margin=0.25, max_factor=5.0, agreement=0.35),
    Composition("dirichlet", margin=0.5, agreement=0.5),
    ESC(3, max_samples=4),
    AdaptiveConsistency("beta", 0.9, max_samples=8),
]


# --- criteria ---------------------------------------------------------------------------


@pytest.mark.parametrize(("v1", "v2"), [(0, 0), (1, 0), (3, 1), (4, 0), (5, 2), (7, 7), (2, 9)])
def test_beta_confidence_matches_numerical_integration(v1, v2):
    x = np.linspace(0.0, 1.0, 200_001)
    density = x**v1 * (1 - x) ** v2
    above = density[x > 0.5].sum() / density.sum()
    assert beta_confidence(v1, v2) == pytest.approx(above, abs=1e-4)


def test_beta_confidence_known_values():
    assert beta_confidence(4, 0) == pytest.approx(1 - 0.5**5)  # Beta(5, 1): 1 - (1/2)^5
    assert beta_confidence(3, 3) == pytest.approx(0.5)


@pytest.mark.parametrize("counts", [(3, 1), (5, 2, 1), (2, 2), (6,), (4, 3, 3, 1)])
def test_dirichlet_confidence_matches_an_independent_monte_carlo(counts):
    rng = np.random.default_rng(123)
    draws = rng.dirichlet(np.array([*counts, 0]) + 1.0, size=200_000)
    reference = np.mean(np.argmax(draws, axis=1) == 0)
    # 4096 draws: standard error <= 0.008; 4 sigma.
    assert dirichlet_confidence(counts) == pytest.approx(reference, abs=0.032)


def test_dirichlet_with_one_answer_equals_beta():
    for v in (1, 3, 6):
        assert dirichlet_confidence((v,)) == pytest.approx(beta_confidence(v, 0), abs=0.03)


def test_nobody_voted_is_never_decided():
    assert confidence("beta", tally(None, None)) == 0.0
    assert confidence("dirichlet", tally()) == 0.0


# --- decisions on hand-made sequences ----------------------------------------------------


def test_fixed_and_t2_launch_their_n_and_wait_for_all():
    assert Fixed(6).first_launch(BUDGET) == 6
    assert Fixed(40).first_launch(BUDGET) == 16  # never above the cap
    assert T2(1.0).first_launch(BUDGET) == 4
    assert T2(1.0).first_launch(Budget(None, n_max=16, default=8, cap=16)) == 8
    assert T2(1.0).on_result(tally("1", "1"), 4, BUDGET) == WAIT
    assert T2(1.0).on_result(tally("1", "1", "1", "1"), 4, BUDGET) == STOP


def test_the_gates_margin_scale_multiplies_t2s_margin_in_every_policy_that_launches_t2():
    far = dataclasses.replace(BUDGET, margin_scale=2.0)
    assert T2(1.0).first_launch(far) == T2(2.0).first_launch(BUDGET) == 8
    assert Composition("beta", 0.9, margin=1.0).first_launch(far) == 8
    assert T2(1.0).first_launch(dataclasses.replace(far, prediction=None)) == far.default  # no head: default


def test_esc_stops_on_a_unanimous_window_only():
    esc = ESC(3)
    assert esc.first_launch(BUDGET) == 3
    assert esc.on_result(tally("7", "7"), 3, BUDGET) == WAIT
    assert esc.on_result(tally("7", "7", "7"), 3, BUDGET) == STOP
    assert esc.on_result(tally("7", "8", "7"), 3, BUDGET) == Decision(launch=3)
    # The second window is judged alone: the first window's disagreement does not matter.
    assert esc.on_result(tally("7", "8", "7", "9", "9", "9"), 6, BUDGET) == STOP
    # Abstentions never decide, and the last window is cut by the cap.
    assert esc.on_result(tally(None, None, None), 3, BUDGET) == Decision(launch=3)
    answers = ["1", "2", "3"] * 5
    assert esc.on_result(tally(*answers), 15, BUDGET) == Decision(launch=1)
    assert esc.on_result(tally(*answers, "1"), 16, BUDGET) == STOP


def test_adaptive_consistency_beta_stops_when_lopsided_not_when_tied():
    ac = AdaptiveConsistency("beta", 0.95)
    assert ac.first_launch(BUDGET) == 1
    assert ac.on_result(tally("5", "5", "5"), 3, BUDGET) == Decision(launch=1)  # 0.9375 < 0.95
    assert ac.on_result(tally("5", "5", "5", "5"), 4, BUDGET) == STOP  # 0.969
    tied = tally(*["5", "6"] * 6)
    assert ac.on_result(tied, 12, BUDGET) == Decision(launch=1)
    assert ac.on_result(tally("5", "6", "5", "5", "5", "5", "5", "5"), 8, BUDGET) == STOP  # 7 vs 1


def test_adaptive_consistency_keeps_its_batch_in_flight_and_stops_at_the_cap():
    ac = AdaptiveConsistency("dirichlet", 0.99, batch=3)
    assert ac.first_launch(BUDGET) == 3
    assert ac.on_result(tally("1"), 3, BUDGET) == Decision(launch=1)
    small = Budget(0.5, n_max=16, default=8, cap=4)
    assert ac.on_result(tally("1", "2", "3"), 4, small) == WAIT  # one still running
    assert ac.on_result(tally("1", "2", "3", "4"), 4, small) == STOP


def test_composition_stops_before_the_estimate_when_decided():
    comp = Composition("beta", 0.9, margin=2.0)  # estimate 8
    assert comp.first_launch(BUDGET) == 8
    assert comp.on_result(tally("3", "3"), 8, BUDGET) == WAIT  # 0.875 < 0.9
    assert comp.on_result(tally("3", "3", "3"), 8, BUDGET) == STOP  # 0.9375: abort the other 5


def test_composition_extends_past_the_estimate_while_undecided_never_above_cap():
    comp = Composition("beta", 0.95, margin=1.0, extend=3)  # estimate 4
    assert comp.first_launch(BUDGET) == 4
    assert comp.on_result(tally("1", "2", "1"), 4, BUDGET) == WAIT
    assert comp.on_result(tally("1", "2", "1", "2"), 4, BUDGET) == Decision(launch=3)
    small = Budget(0.25, n_max=16, default=8, cap=5)
    assert comp.on_result(tally("1", "2", "1", "2"), 4, small) == Decision(launch=1)
    assert comp.on_result(tally("1", "2", "1", "2", "3"), 5, small) == STOP


def test_composition_extension_is_bounded_by_a_multiple_of_the_estimate():
    comp = Composition("beta", 0.95, margin=1.0, max_factor=1.5)  # estimate 4, at most 6
    assert comp.on_result(tally("1", "2", "1", "2"), 4, BUDGET) == Decision(launch=1)
    assert comp.on_result(tally("1", "2", "1", "2", "3", "4"), 6, BUDGET) == STOP
    one = Budget(0.0, n_max=16, default=8, cap=16)  # estimate 1: a hopeless question stays at 2
    assert Composition("beta", 0.95, max_factor=2.0).on_result(tally("1", "2"), 2, one) == STOP


def test_composition_agreement_sets_the_threshold_from_the_estimate():
    comp = Composition("beta", margin=1.0, agreement=0.5)
    # Estimate 1 (N_max * p): k = max(1, 0.5) = 1 vote, so the first answer decides.
    low = Budget(1 / 16, n_max=16, default=8, cap=16)
    assert comp.threshold(low) == 0.75
    assert comp.first_launch(low) == 1
    assert comp.on_result(tally("7"), 1, low) == STOP
    # Estimate 8: k = 4 unanimous votes (1 - 2^-5); 3 of them, or 6 to 1, are not enough.
    high = Budget(0.5, n_max=16, default=8, cap=16)
    assert comp.threshold(high) == 1 - 2**-5
    assert comp.on_result(tally("3", "3", "3"), 8, high) == WAIT
    assert comp.on_result(tally("3", "3", "3", "3"), 8, high) == STOP
    assert comp.on_result(tally(*"3313333"), 8, high) == WAIT  # 6 to 1: 0.965 < 0.969
    assert comp.on_result(tally(*"33133333"), 8, high) == STOP  # 7 to 1: 0.98
    # Without a prediction the default N stands in for the estimate: k = 0.5 * 8 = 4.
    assert comp.threshold(Budget(None, n_max=16, default=8, cap=16)) == 1 - 2**-5
    # The fixed confidence is not used once the estimate sets the threshold.
    assert Composition("beta", 0.99, agreement=0.5).threshold(low) == 0.75
    assert comp.knobs == "agree=0.5,margin=1"
    assert Composition("beta", 0.9, 0.5, max_factor=3.0).knobs == "c=0.9,margin=0.5,max=3"


def test_esc_and_adaptive_consistency_stop_at_their_own_budget():
    assert ESC(3, max_samples=4).on_result(tally("1", "2", "3"), 3, BUDGET) == Decision(launch=1)
    assert ESC(3, max_samples=4).on_result(tally("1", "2", "3", "4"), 4, BUDGET) == STOP
    ac = AdaptiveConsistency("beta", 0.95, max_samples=2)
    assert ac.on_result(tally("1", "2"), 2, BUDGET) == STOP


def test_every_stopping_policys_default_most_is_n_max_not_the_cap():
    """An undecided vote (every answer different) runs to N_max = 8 under a cap of 64, as
    fixed N_max would; an explicit `max` may go past N_max, within the cap."""
    budget = Budget(0.5, n_max=8, default=4, cap=64)
    never_agree = [str(i) for i in range(64)]
    go_on = SimpleNamespace(should_stop=lambda estimate, state, cost: False)  # a table that never stops
    for policy in (ESC(4), ESC(3), AdaptiveConsistency(), Composition(), LearnedStop(go_on)):
        assert drive(policy, budget, never_agree).launched == 8, policy
    assert drive(ESC(4, max_samples=20), budget, never_agree).launched == 20
    assert drive(Composition(max_factor=4.0), budget, never_agree).launched == 16  # 4 x the estimate 4


@pytest.mark.parametrize("policy", ALL_POLICIES)
def test_every_policy_launches_at_least_one_and_respects_the_cap(policy):
    rng = np.random.default_rng(0)
    for cap in (1, 3, 16):
        budget = Budget(0.0, n_max=16, default=8, cap=cap)
        assert 1 <= policy.first_launch(budget) <= cap
        for _ in range(30):
            answers = [None if a == 3 else str(a) for a in rng.integers(0, 4, size=16)]
            run = drive(policy, budget, answers)  # raises if the policy breaks the protocol
            assert 1 <= run.finished <= run.launched <= cap


# -- choose_parallelism: prediction -> N ---------------------------------------------------


def test_default_without_prediction():
    assert choose_parallelism(None, n_max=16, default=8, cap=16) == 8
    assert choose_parallelism(None, n_max=16, default=8, cap=4) == 4


@pytest.mark.parametrize(("prediction", "expected"), [(0.0, 1), (0.01, 1), (0.5, 8), (1.0, 16), (3.0, 16)])
def test_prediction_scaled_and_clamped(prediction, expected):
    assert choose_parallelism(prediction, n_max=16, default=8, cap=16) == expected


def test_margin():
    assert choose_parallelism(0.25, n_max=16, default=8, cap=16, margin=1.5) == 6


def test_bad_cap():
    with pytest.raises(ValueError):
        choose_parallelism(0.5, n_max=16, default=8, cap=0)
