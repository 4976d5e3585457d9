"""`t2serve tune --objective accuracy` (estimator/offline/evaluation/tune.py): the operating
point by accuracy against gold, on made-up pools where more samples hurt (pure data, no engine)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from estimator.offline.evaluation.replay import Pool, PoolReplay
from estimator.offline.evaluation.tune import load_store, split_pools, traffic_pools, tune, write_result
from estimator.policy_spec import parse_policy, spec_from_flag
from server.voting import majority_vote
from tests.estimator.offline.evaluation.traffic import (
    LATE,
    N_MAX,
    UNANIMOUS,
    traffic_records,
    write_traffic_store,
)

# The first sample is right ("a"), the N_max vote wrong ("b" 5 of 8): fixed N = 1, 2 and 4 (a
# tie goes to the answer seen first) are right, fixed N = 3 and >= 5 wrong, and agree with
# the N_max vote from N = 5 on (and at 3).
HURT = ["a", "b", "b", "a", "b", "b", "c", "b"]


def gold_records(requests: int = 100, hurt_share: float = 0.3, hurt: list[str | None] = HURT) -> list[dict]:
    """traffic_records' requests, the split ones of `hurt`, all with gold "a" joined on."""
    records = traffic_records(requests, split_share=hurt_share, split=hurt)
    return [{**r, "answer": "a", "gold_keys": ["a"] if "a" in r["answers"] else []} for r in records]


def unanimous_shares(records: list[dict]) -> tuple[float, float]:
    """(tuning, held out): the share of unanimous pools on each side of tune's split (seed 0)."""
    return tuple(
        float(np.mean([p.answers == UNANIMOUS for p in part]))
        for part in split_pools(traffic_pools(records), 0.3, 0)
    )


def row(result: dict, spec: str) -> dict:
    return next(r for r in result["candidates"] if r["policy"] == spec)


def test_where_more_samples_hurt_accuracy_picks_one_sample_and_agreement_an_expensive_policy():
    records = gold_records()
    by_accuracy = tune(records, target=0.99, objective="accuracy", held_out=0.3, seed=0, default=4)
    by_agreement = tune(records, target=0.99, held_out=0.3, seed=0, default=4)
    unanimous, held_unanimous = unanimous_shares(records)

    assert by_accuracy["policy"] == "fixed:n=1" and by_accuracy["objective"] == "accuracy"
    assert by_accuracy["tuning"] == {
        "pools": 140,
        "agreement": pytest.approx(unanimous),
        "samples": 1.0,
        "accuracy": 1.0,
    }
    assert by_accuracy["tolerance"] == 0.005 and by_accuracy["target"] is None
    assert by_accuracy["pools_without_gold"] == 0

    assert by_agreement["objective"] == "agreement" and by_agreement["tolerance"] is None
    chosen = by_agreement["tuning"]
    # The head tells split pools from unanimous ones: t2 spends on the split ones, and loses them.
    assert chosen["agreement"] >= 0.99 and chosen["samples"] > 1.5 * by_accuracy["tuning"]["samples"]
    assert chosen["accuracy"] == pytest.approx(unanimous)  # it follows the N_max vote onto the wrong answer

    held = by_accuracy["held_out"]
    assert held["accuracy"] == 1.0 and held["best_fixed_within_samples"]["policy"] == "fixed:n=1"
    assert not held["above_fixed_curve"] and held["accuracy_over_fixed_curve"] == 0.0  # it is the curve
    assert held["fixed_n_max"] == {
        "policy": f"fixed:n={N_MAX}",
        **row(by_accuracy, f"fixed:n={N_MAX}")["held_out"],
    }
    assert held["fixed_n_max"]["accuracy"] == pytest.approx(held_unanimous)
    assert "not above the fixed-N curve" in by_accuracy["message"]


def test_the_accuracy_is_evaluates_replay_on_the_recorded_order():
    records = gold_records(hurt=LATE)
    result = tune(records, target=0.99, objective="accuracy", held_out=0.3, seed=0, default=4)
    tuning = split_pools(traffic_pools(records), 0.3, 0)[0]
    specs = ["fixed:n=1", "fixed:n=5", "t2:margin=1.5", "esc:window=4,max=8", "ac-beta:c=0.9,max=8"]
    for spec in specs:
        policy = parse_policy(spec, fixed_n=N_MAX, margin=1.0)
        outcomes = [
            PoolReplay(
                Pool(p.answers, [1] * N_MAX, "a", p.prediction, p.margin_scale), np.arange(N_MAX)[None, :], 4
            ).replay(policy)
            for p in tuning
        ]
        assert row(result, spec)["tuning"]["accuracy"] == pytest.approx(
            np.mean([o["accuracy"] for o in outcomes])
        )
        assert row(result, spec)["tuning"]["samples"] == pytest.approx(
            np.mean([o["launched"] for o in outcomes])
        )
    for n in (1, 4, 5):
        right = [majority_vote(p.answers[:n]).answer == "a" for p in tuning]
        assert row(result, f"fixed:n={n}")["tuning"]["accuracy"] == pytest.approx(np.mean(right))


def test_the_tolerance_trades_accuracy_for_samples():
    """On LATE pools more samples help: fixed N = 1 is right on the unanimous pools only."""
    records = gold_records(hurt=LATE)
    exact = tune(records, target=0.99, objective="accuracy", tolerance=0.0, held_out=0.3, seed=0, default=4)
    assert exact["tuning"]["accuracy"] == 1.0 and exact["tuning"]["samples"] > 1
    cheaper = [r for r in exact["candidates"] if r["tuning"]["samples"] < exact["tuning"]["samples"]]
    assert cheaper and all(r["tuning"]["accuracy"] < 1.0 for r in cheaper)
    assert row(exact, exact["best_on_tuning"])["tuning"]["accuracy"] == 1.0

    loose = tune(records, target=0.99, objective="accuracy", tolerance=0.35, held_out=0.3, seed=0, default=4)
    assert loose["policy"] == "fixed:n=1"
    assert loose["tuning"]["accuracy"] == pytest.approx(unanimous_shares(records)[0])
    with pytest.raises(ValueError, match=r"accuracy tolerance -0.1: it must be in \[0, 1\)"):
        tune(records, target=0.99, objective="accuracy", tolerance=-0.1, default=4)
    with pytest.raises(ValueError, match="objective 'gold': one of agreement, accuracy"):
        tune(records, target=0.99, objective="gold", default=4)


def write_gold(store: Path, records: list[dict], share: float) -> None:
    """gold-test.jsonl as `t2serve label --server` writes it, for the first `share` of the requests."""
    requests = list(dict.fromkeys(r["request_id"] for r in records))
    lines = [
        {"request_id": q, "answer": "a", "source": "test", "problem_id": f"p{i}"}
        for i, q in enumerate(requests[: round(share * len(requests))])
    ]
    (store / "gold-test.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_a_store_with_gold_for_some_requests_scores_those_and_counts_the_rest(tmp_path):
    records = traffic_records(split=HURT)  # requests 0..29 HURT, the rest unanimous "a"
    store = write_traffic_store(tmp_path / "store", records)
    write_gold(store, records, share=0.5)
    loaded = load_store([store])
    assert sum("answer" in r for r in loaded) == 100 and sum("answer" not in r for r in loaded) == 100
    result = tune(loaded, target=0.99, objective="accuracy", held_out=0.3, seed=0, default=4)
    assert result["pools_without_gold"] == 100 and result["policy"] == "fixed:n=1"
    assert result["tuning"]["pools"] + result["held_out"]["pools"] == 100
    assert "100 pools without gold were left out" in result["message"]
    # The same split as the agreement objective's: the gold pools of each side.
    tuning = split_pools(traffic_pools(loaded), 0.3, 0)[0]
    assert result["tuning"]["pools"] == sum(p.gold is not None for p in tuning)

    path = tmp_path / "tuned.json"
    write_result(result, path)
    assert json.loads(path.read_text())["objective"] == "accuracy"
    assert spec_from_flag(f"@{path}") == "fixed:n=1"  # what serve --policy and /admin/policy read


def test_accuracy_without_gold_says_how_to_get_it(tmp_path):
    store = write_traffic_store(tmp_path / "store", traffic_records())
    with pytest.raises(ValueError, match=r"objective accuracy: .*t2serve label --server"):
        tune(load_store([store]), target=0.99, objective="accuracy", default=4)
    assert tune(load_store([store]), target=0.99, default=4)["pools_without_gold"] == 200
    write_gold(store, traffic_records(), share=0.01)  # one request: one side of the split has no gold
    with pytest.raises(ValueError, match="the 2 pools with gold all fell outside the (tuning|held-out) part"):
        tune(load_store([store]), target=0.99, objective="accuracy", default=4)
    one_side = tune(load_store([store]), target=0.99, objective="accuracy", held_out=0.0, default=4)
    assert one_side["tuning"]["pools"] == 2 and one_side["held_out"] is None
    assert "198 pools without gold were left out. No pools held out" in one_side["message"]


def test_label_records_carry_their_gold():
    records = [
        {"id": f"q{i}", "answers": UNANIMOUS if i % 3 else HURT, "answer": "a", "gold_keys": ["a"]}
        for i in range(30)
    ]
    result = tune(records, target=0.9, objective="accuracy", held_out=0.3, default=4)
    assert result["pools_without_gold"] == 0 and result["policy"] == "fixed:n=1"
