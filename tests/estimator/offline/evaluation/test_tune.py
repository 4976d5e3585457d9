"""`t2serve tune` (estimator/offline/evaluation/tune.py): the operating point from explored
traffic, on a made-up store (pure data, no engine)."""

from __future__ import annotations

import pytest

from estimator.label_store import load_records
from estimator.offline.evaluation.tune import candidate_specs, load_store, split_pools, traffic_pools, tune
from estimator.policies import ESC, AdaptiveConsistency
from estimator.policy_spec import describe, parse_policy
from server.shadow import ShadowGauge
from server.voting import majority_vote
from tests.estimator.offline.evaluation.traffic import LAST, N_MAX, traffic_records, write_traffic_store
from tests.estimator.test_policy_spec import TABLE


def fixed_agreement(pools, n: int) -> float:
    """Fixed N's agreement with the N_max vote, straight from the pools."""
    return sum(majority_vote(p.answers[:n]).answer == majority_vote(p.answers).answer for p in pools) / len(
        pools
    )


def row(result: dict, spec: str) -> dict:
    return next(r for r in result["candidates"] if r["policy"] == spec)


@pytest.fixture(scope="module")
def tuned() -> dict:
    return tune(traffic_records(), target=0.99, held_out=0.3, seed=0, default=4)


def test_the_choice_meets_the_target_on_the_tuning_part_and_nothing_cheaper_does(tuned):
    chosen = row(tuned, tuned["policy"])
    assert chosen["tuning"]["agreement"] >= 0.99 and not tuned["fallback"]
    assert tuned["tuning"] == chosen["tuning"]
    cheaper = [r for r in tuned["candidates"] if r["tuning"]["samples"] < chosen["tuning"]["samples"]]
    assert cheaper and all(r["tuning"]["agreement"] < 0.99 for r in cheaper)
    # On these pools the head's prediction tells split from unanimous: t2 beats every fixed N.
    assert tuned["policy"].startswith("t2:") and chosen["tuning"]["samples"] < 5
    assert tuned["held_out"]["above_fixed_curve"] and tuned["held_out"]["samples_saved"] > 0
    assert "above the fixed-N curve" in tuned["message"]


def test_fixed_n_numbers_are_the_pools_own_votes_on_each_part(tuned):
    tuning, held = split_pools(traffic_pools(traffic_records()), 0.3, 0)
    for n in (1, 4, 5, N_MAX):
        assert row(tuned, f"fixed:n={n}")["tuning"]["agreement"] == pytest.approx(fixed_agreement(tuning, n))
        assert row(tuned, f"fixed:n={n}")["held_out"]["agreement"] == pytest.approx(fixed_agreement(held, n))
    assert row(tuned, f"fixed:n={N_MAX}")["tuning"]["agreement"] == 1.0


def test_the_held_out_numbers_are_computed_on_the_other_requests(tuned):
    tuning, held = split_pools(traffic_pools(traffic_records()), 0.3, 0)
    assert not {p.group for p in tuning} & {p.group for p in held}  # a request's choices stay together
    assert len(held) == 2 * 30 and len(tuning) == 2 * 70  # 30 % of 100 requests, two choices each
    assert tuned["tuning"]["pools"] == len(tuning) and tuned["held_out"]["pools"] == len(held)
    # Another seed draws other requests, so other held-out numbers.
    other = split_pools(traffic_pools(traffic_records()), 0.3, 1)[1]
    assert {p.group for p in other} != {p.group for p in held}
    at_target = tuned["held_out"]["cheapest_fixed_at_target"]
    assert at_target["policy"] == "fixed:n=5" and at_target["agreement"] == fixed_agreement(held, 5) == 1.0


def test_the_replay_is_the_live_gauges():
    pools = split_pools(traffic_pools(traffic_records()), 0.3, 0)[0]
    specs = ["t2:margin=1.5", "esc:window=4,max=8", "ac-beta:c=0.9,max=8", "fixed:n=3", f"fixed:n={N_MAX}"]
    gauge = ShadowGauge(
        {s: parse_policy(s, fixed_n=N_MAX, margin=1.0) for s in specs}, n_max=N_MAX, default=4
    )
    for pool in pools:
        gauge.observe(pool.answers, pool.prediction, pool.margin_scale)
    result = tune(traffic_records(), target=0.99, held_out=0.3, seed=0, default=4)
    for spec in specs:
        totals = gauge.totals[spec]
        assert row(result, spec)["tuning"] == {
            "pools": totals.pools,
            "agreement": pytest.approx(totals.agreement, abs=1e-12),
            "samples": pytest.approx(totals.mean_samples, abs=1e-12),
        }


def test_a_target_only_n_max_reaches_falls_back_to_fixed_n_max_and_says_so():
    records = traffic_records(split_share=1.0, split=LAST)  # every vote changes with the last sample
    result = tune(records, target=0.99, held_out=0.3, seed=0, default=4)
    assert result["fallback"] and result["policy"] == f"fixed:n={N_MAX}"
    assert result["tuning"] == {"pools": 140, "agreement": 1.0, "samples": float(N_MAX)}
    assert f"falling back to fixed:n={N_MAX} (no samples saved)" in result["message"]
    assert "not above the fixed-N curve" in result["message"]
    with pytest.raises(ValueError, match="must be in"):
        tune(records, target=1.5, default=4)


def test_candidates_are_registry_specs_with_the_budget_written_in():
    specs = candidate_specs(16, predictions=True)
    assert specs[:16] == [f"fixed:n={n}" for n in range(1, 17)]
    assert "t2:margin=1.5" in specs and "esc:window=4,max=8" in specs and "ac-beta:c=0.9,max=16" in specs
    for spec in specs:
        policy = parse_policy(spec, fixed_n=16, margin=1.0)
        assert describe(policy) == spec
        if isinstance(policy, ESC | AdaptiveConsistency):
            assert policy.max_samples is not None  # never the server's --max-parallelism
    assert not [s for s in candidate_specs(16, predictions=False) if s.startswith("t2")]


def test_label_records_without_predictions_have_no_t2_candidates():
    records = [{"id": f"q{i}", "answers": ["a"] * 4 if i % 3 else ["b", "a", "a", "c"]} for i in range(30)]
    result = tune(records, target=0.9, held_out=0.3, default=4)
    assert result["records_with_prediction"] == 0
    assert not [r for r in result["candidates"] if r["policy"].startswith("t2")]


def test_records_of_several_n_max_are_refused():
    records = traffic_records(requests=4)
    records[0] = {**records[0], "answers": ["a"] * 4, "n_max": 4}
    with pytest.raises(ValueError, match=r"several N_max \(\[4, 8\]\)"):
        traffic_pools(records)


def test_tune_store_reads_every_replicas_shards(tmp_path):
    records = traffic_records()
    store = write_traffic_store(tmp_path / "store", records)
    assert len(load_records(store)) == len(records)
    result = tune(load_store([store]), target=0.99, default=4, store=[store])
    assert result["records"] == len(records) and result["store"] == [str(store)]
    with pytest.raises(ValueError, match="no records"):
        load_store([tmp_path])


def test_a_stopping_table_adds_t2_learned_candidates_of_its_own_n_max():
    """TABLE is for N_max 2."""
    assert "t2+learned:cost=0.009,margin=0.25" in candidate_specs(2, predictions=True, stopping=TABLE)
    assert not [s for s in candidate_specs(2, predictions=False, stopping=TABLE) if s.startswith("t2+")]
    with pytest.raises(ValueError, match="stopping table is for N_max 2, the pools are of 8"):
        tune(traffic_records(requests=4), target=0.9, default=4, stopping=TABLE)
