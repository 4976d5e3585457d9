"""Fitting the learned stopping table (estimator/offline/training/stopping_fit.py) on synthetic pools,
and the fitted table served through its policy, policy spec and head."""

from __future__ import annotations

import numpy as np
import pytest

from estimator.learned_stopping import StoppingTable, table_path
from estimator.offline.evaluation.replay import Pool, replay_matrix, summarise
from estimator.offline.training.stopping_fit import fit_stopping, vote_states
from estimator.policies import Budget, Fixed, LearnedStop, Tally
from estimator.policy_spec import describe, parse_policy

N_MAX = 8


def pools_of_two_kinds(count: int, seed: int) -> tuple[list[dict], np.ndarray]:
    """Hopeless questions (the gold answer is never sampled; answers scattered), which the
    head estimates low, and fixable ones (gold in 40% of samples, five wrong answers in 12%
    each), which it estimates high: only the estimate tells their first votes apart."""
    rng = np.random.default_rng(seed)
    records, predictions = [], []
    for q in range(count):
        if q % 2:
            answers = [str(a) for a in rng.choice(["1", "2", "3", "4"], size=N_MAX)]
            predictions.append(0.1)
        else:
            answers = [str(a) for a in rng.choice(list("012345"), size=N_MAX, p=[0.4] + [0.12] * 5)]
            predictions.append(0.9)
        records.append({"answers": answers, "tokens": [10] * N_MAX, "answer": "0"})
    return records, np.array(predictions)


@pytest.fixture(scope="module")
def fitted():
    records, predictions = pools_of_two_kinds(60, seed=0)
    return fit_stopping(records, predictions, orderings=40, progress=False)


def replay(table: StoppingTable, cost: float, seed: int = 0):
    records, predictions = pools_of_two_kinds(60, seed=seed)
    pools = [
        Pool(r["answers"], r["tokens"], r["answer"], float(p))
        for r, p in zip(records, predictions, strict=True)
    ]
    policies = [LearnedStop(table, cost=cost), Fixed(1), Fixed(N_MAX)]
    matrix = replay_matrix(pools, policies, orderings=20, seed=0, default=N_MAX, desc="test")
    kinds = {"fixable": slice(0, None, 2), "hopeless": slice(1, None, 2)}
    return {k: summarise(policies, matrix[rows]) for k, rows in kinds.items()}


def test_vote_states_count_leader_and_runner_up_and_skip_abstentions():
    assert vote_states(("a", None, "b", "a", "c")) == [(1, 1, 0), (2, 1, 0), (3, 1, 1), (4, 2, 1), (5, 2, 1)]


def test_the_estimate_separates_hopeless_from_fixable_votes(fitted):
    # The same first vote: stop when the head expects nothing from more samples, go on when
    # it expects them to fix the vote.
    assert fitted.should_stop(0.1 * N_MAX, (1, 1, 0), cost=0.01)
    assert not fitted.should_stop(0.9 * N_MAX, (1, 1, 0), cost=0.01)
    out = replay(fitted, cost=0.01)
    learned, one, every = (out["fixable"][i] for i in range(3))
    assert out["hopeless"][0]["launched"] < 1.5  # it gives up on the hopeless at once
    assert learned["accuracy"] > one["accuracy"] + 0.1
    assert learned["accuracy"] > every["accuracy"] - 0.02  # as good as all samples, with fewer
    assert learned["launched"] < every["launched"] - 1


def test_cost_trades_samples_for_accuracy(fitted):
    launched = [
        sum(kind[0]["launched"] for kind in replay(fitted, cost).values())
        for cost in (0.001, 0.01, 0.05, 0.3, 1.0)
    ]
    assert launched == sorted(launched, reverse=True)
    assert launched[-1] == pytest.approx(3.0)  # nothing is worth 1.0: the first launches only (2 + 1)


def test_policy_launches_the_t2_estimate_then_one_at_a_time(fitted):
    policy = LearnedStop(fitted, cost=0.001, margin=0.5)
    budget = Budget(prediction=0.9, n_max=N_MAX, default=N_MAX, cap=N_MAX)
    assert policy.first_launch(budget) == 4  # round(8 * 0.9 * 0.5)
    tally = Tally()
    for answer in ("0", "1", "2"):
        tally.add(answer)
        assert policy.on_result(tally, 4, budget).launch == 0  # the estimate is still running
    tally.add("3")
    assert policy.on_result(tally, 4, budget).launch == 1  # undecided, all in: one more
    assert describe(policy) == "t2+learned:cost=0.001,margin=0.5"


def test_save_load_and_the_head_carries_its_table(fitted, tmp_path):
    from estimator.head import HeadMeta, LayerProbes, T2Head

    fitted.save(tmp_path / "head")
    assert table_path(tmp_path / "head.json") == tmp_path / "head.stopping.safetensors"
    loaded = StoppingTable.load(tmp_path / "head")
    assert loaded is not None and loaded.states == fitted.states
    for cost in (0.001, 0.01, 0.1):
        assert np.array_equal(loaded.rule(cost), fitted.rule(cost))
    head = T2Head(LayerProbes(2, 8), HeadMeta("m", 2, 8, N_MAX, 1 / 8, layers=[1], weights=[1.0]))
    head.save(tmp_path / "head")  # a new head: the old head's table no longer applies
    assert T2Head.load(tmp_path / "head").stopping is None
    fitted.save(tmp_path / "head")
    assert T2Head.load(tmp_path / "head").stopping is not None


def test_policy_spec_needs_the_table(fitted):
    policy = parse_policy("t2+learned:cost=0.005,extend=2", fixed_n=N_MAX, margin=1.5, stopping=fitted)
    assert policy == LearnedStop(fitted, cost=0.005, extend=2)
    assert policy.margin == 0.25  # its own default, not the server's T2 margin
    with pytest.raises(ValueError, match="needs a stopping table"):
        parse_policy("t2+learned", fixed_n=N_MAX, margin=1.5)
    with pytest.raises(ValueError, match="bad knob"):
        parse_policy("t2+learned:c=0.9", fixed_n=N_MAX, margin=1.5, stopping=fitted)
