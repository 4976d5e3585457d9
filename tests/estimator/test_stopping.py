"""Sampling policies (estimator/stopping.py) and their offline replay (estimator/replay.py)."""

import json

import numpy as np
import pytest

from estimator.labels import expected_accuracy
from estimator.replay import (
    Pool,
    PoolReplay,
    drive,
    oracle_frontier,
    orderings_for,
    replay_matrix,
    summarise,
)
from estimator.stopping import (
    ESC,
    STOP,
    T2,
    WAIT,
    AdaptiveConsistency,
    Budget,
    Composition,
    Decision,
    Fixed,
    Tally,
    beta_confidence,
    confidence,
    dirichlet_confidence,
)

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
    assert comp.knob == "agree=0.5xN*,margin=1"
    assert Composition("beta", 0.9, 0.5, max_factor=3.0).knob == "c=0.9,margin=0.5,max=3xN"


def test_esc_and_adaptive_consistency_stop_at_their_own_budget():
    assert ESC(3, max_samples=4).on_result(tally("1", "2", "3"), 3, BUDGET) == Decision(launch=1)
    assert ESC(3, max_samples=4).on_result(tally("1", "2", "3", "4"), 4, BUDGET) == STOP
    ac = AdaptiveConsistency("beta", 0.95, max_samples=2)
    assert ac.on_result(tally("1", "2"), 2, BUDGET) == STOP


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


# --- replay ------------------------------------------------------------------------------


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


# --- the comparison report ---------------------------------------------------------------


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
    from estimator import comparison

    val, test = synthetic_records(0), synthetic_records(1)
    result = comparison.compare_policies(
        ConstantHead(0.25),
        val,
        np.zeros((len(val), 1, 1)),
        test,
        np.zeros((len(test), 1, 1)),
        orderings=10,
        families=("fixed", "T2", "ESC", "T2+beta"),
    )
    assert set(result["selected"]) == {"fixed", "T2", "ESC", "T2+beta"}
    val_rows = result["splits"]["validation"]["rows"]
    for family, pick in result["selected"].items():
        # The selected knob is the cheapest on validation that reaches the validation target.
        reaching = [
            r
            for r in val_rows
            if r["family"] == family and r["accuracy"] >= result["splits"]["validation"]["target"] - 1e-12
        ]
        assert pick["validation_launched"] == min(r["launched"] for r in reaching)
    assert result["selected"]["fixed"]["launched"] <= 16
    table = comparison.report_table(result)
    assert "T2+beta" in table and "fewest samples" in table
    comparison.write_report(result, tmp_path / "policies")
    assert (tmp_path / "policies.png").stat().st_size > 0
    assert json.loads((tmp_path / "policies.json").read_text())["orderings"] == 10


def test_samples_at_interpolates_on_the_pareto_front():
    from estimator.comparison import pareto, samples_at

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


def test_evaluate_command_takes_the_replay_options():
    from server.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--labels", "l", "--head", "h", "--policies", "T2,ESC"])
    assert (args.orderings, args.replay_seed, args.policies) == (200, 0, "T2,ESC")
    args = build_parser().parse_args(["evaluate", "--labels", "l", "--head", "h", "--orderings", "0"])
    assert args.orderings == 0 and str(args.policies_out) == "benchmarks/results/policies"
