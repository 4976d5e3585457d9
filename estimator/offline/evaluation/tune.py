"""`t2serve tune`: the operating point from explored traffic, without gold or with it.

An explored pool (a traffic record, server/recording.py, or a `t2serve label` question) holds
N_max vote keys in the order its samples finished. Candidate policies, named by their spec
strings (estimator.policy_spec), are replayed on each pool as the live gauge replays them
(server/shadow.py; a test checks the numbers are equal): estimator.replay.drive over the
keys in that order, with the budget the pool's prediction and margin multiple give, cap
N_max:

    agreement   share of pools on which the policy's vote names the pool's N_max vote
    samples     mean samples the policy launched (aborted ones are paid for too)

The pools are split, seeded and by request (a request's choices stay on one side), into a
tuning part and a held-out part. On the tuning part the candidate with the fewest mean
samples whose agreement is at least the target is chosen (ties: the earlier candidate,
fixed N first); its held-out numbers are reported beside the cheapest fixed N that reaches
the target on the held-out part, and the chosen point is above the fixed-N curve when the
cheapest fixed N agreeing on held-out at least as often as it does launches more samples
(the gauge's "samples saved"). Fixed N_max agrees on every pool by definition, so a target
nothing cheaper reaches falls back to it.

Objective `accuracy` (--objective accuracy): where more samples lose accuracy (the model's
wrong answers agree with each other more than its right ones), agreement with the N_max vote
is the wrong target. Pools with gold (`t2serve label` records, or traffic records whose
request has a gold-*.jsonl line: estimator.offline.labels.traffic.join_gold) are replayed
the same way, on the same split (pools without gold are left out and counted), and scored

    accuracy    share of pools on which the policy's vote names a gold key (the vote and
                its tie rule are estimator.offline.evaluation.replay.PoolReplay's, on the
                recorded order)

and the cheapest candidate whose tuning accuracy is within the tolerance of the best
candidate's is chosen. Held out, the chosen point is above the fixed-N curve when it is more
accurate than the best fixed N launching at most as many samples.

Candidates: fixed N = 1..N_max; `t2` over MARGINS where pools carry the head's prediction;
`esc` over WINDOWS and `ac-beta` over CONFIDENCES, each with a budget in MAX_SAMPLES written
into the spec (N_max too: the tuned spec says what it may spend, whatever the served N_max);
`t2+learned` over COSTS x LEARNED_MARGINS given a head with a stopping table.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from estimator.label_store import load_records
from estimator.offline.engine_runs import majority_vote
from estimator.offline.evaluation.comparison import CONFIDENCES, COSTS, LEARNED_MARGINS, MARGINS, WINDOWS
from estimator.offline.evaluation.replay import Pool, PoolReplay
from estimator.offline.labels.targets import gold_of
from estimator.offline.labels.traffic import is_traffic, join_gold, load_gold
from estimator.policies import Budget, Fixed, Policy
from estimator.policy_spec import describe, parse_policy
from estimator.replay import drive

if TYPE_CHECKING:
    from estimator.learned_stopping import StoppingTable

HELD_OUT = 0.3  # share of the requests held out from the choice
MAX_SAMPLES = (4, 8, None)  # esc and ac-beta budgets; None: N_max
OUTPUT_NAME = "tuned.json"  # written into the (first) store folder unless --out says otherwise
OBJECTIVES = ("agreement", "accuracy")
TOLERANCE = 0.005  # the accuracy objective's allowance below the best candidate's tuning accuracy


@dataclass(frozen=True)
class TrafficPool:
    """One explored pool as the gauge replays it."""

    answers: list[str | None]  # N_max vote keys in finishing order
    prediction: float | None  # the head's N*/N_max for the prompt (None: no head)
    margin_scale: float  # the gate's multiple of T2's margin
    group: str  # the request it came from: a request's pools are split together
    gold: frozenset[str] | None = None  # the correct keys (None: no gold for this pool)


def traffic_pools(records: Sequence[dict]) -> list[TrafficPool]:
    """Pools of traffic records or `t2serve label` records (which carry no prediction and
    no n_max: their pool is their answers, in sampling order); all of one N_max."""
    sizes = sorted({r.get("n_max", len(r["answers"])) for r in records})
    if len(sizes) != 1:
        raise ValueError(f"records of several N_max ({sizes}): tune the stores of one N_max apart")
    pools = []
    for r in records:
        if len(r["answers"]) != sizes[0]:
            raise ValueError(f"record {r['id']}: {len(r['answers'])} answers, not N_max = {sizes[0]}")
        pools.append(
            TrafficPool(
                r["answers"],
                r.get("prediction"),
                r.get("margin_scale") or 1.0,
                r.get("request_id") or r["id"],
                gold_of(r) if "answer" in r else None,
            )
        )
    return pools


def split_pools(
    pools: Sequence[TrafficPool], held_out: float, seed: int
) -> tuple[list[TrafficPool], list[TrafficPool]]:
    """(tuning, held out): a seeded shuffle of the requests, `held_out` of them (rounded,
    at least one when the share is positive) held out; the tuning part is never empty."""
    if not 0 <= held_out < 1:
        raise ValueError(f"held-out share {held_out}: it must be in [0, 1)")
    groups = list(dict.fromkeys(p.group for p in pools))
    if len(groups) < (2 if held_out else 1):
        raise ValueError(f"{len(groups)} request(s) in the store: too few to tune and hold out from")
    random.Random(seed).shuffle(groups)
    count = min(len(groups) - 1, max(1, round(held_out * len(groups)))) if held_out else 0
    held = set(groups[:count])
    return [p for p in pools if p.group not in held], [p for p in pools if p.group in held]


def candidate_specs(n_max: int, *, predictions: bool, stopping: StoppingTable | None = None) -> list[str]:
    """The candidates' spec strings, fixed N first (a tie goes to the simpler policy)."""

    def budgets(least: int) -> list[int]:
        return list(
            dict.fromkeys(n_max if m is None else m for m in MAX_SAMPLES if m is None or least <= m < n_max)
        )

    specs = [f"fixed:n={n}" for n in range(1, n_max + 1)]
    if predictions:
        specs += [f"t2:margin={m:g}" for m in MARGINS]
    specs += [f"esc:window={w},max={m}" for w in WINDOWS if w < n_max for m in budgets(w)]
    specs += [f"ac-beta:c={c:g},max={m}" for c in CONFIDENCES for m in budgets(1)]
    if stopping is not None and predictions:
        specs += [f"t2+learned:cost={c:g},margin={m:g}" for c in COSTS for m in LEARNED_MARGINS]
    return specs


def replay_candidates(
    policies: dict[str, Policy], pools: Sequence[TrafficPool], *, default: int, desc: str
) -> dict[str, dict]:
    """Every candidate on every pool, as the gauge replays them; per spec: pools, agreement
    (share whose vote is the N_max vote) and samples (mean launched), and when every pool
    has gold, accuracy (share whose vote names a gold key)."""
    from tqdm import tqdm

    scored = bool(pools) and all(p.gold is not None for p in pools)
    agreed, launched, correct = np.zeros(len(policies)), np.zeros(len(policies)), np.zeros(len(policies))
    for pool in tqdm(pools, desc=desc, unit="pool"):
        n_max = len(pool.answers)
        budget = Budget(
            pool.prediction, n_max=n_max, default=default, cap=n_max, margin_scale=pool.margin_scale
        )
        reference = majority_vote(pool.answers).answer  # the N_max vote, in finishing order
        right = gold_by_prefix(pool, default) if scored else None
        for i, policy in enumerate(policies.values()):
            run = drive(policy, budget, pool.answers)
            agreed[i] += majority_vote(pool.answers[: run.finished]).answer == reference
            launched[i] += run.launched
            if right is not None:
                correct[i] += right[run.finished]
    count = len(pools)
    return {
        spec: {
            "pools": count,
            "agreement": float(a / count),
            "samples": float(n / count),
            **({"accuracy": float(c / count)} if scored else {}),
        }
        for spec, a, n, c in zip(policies, agreed, launched, correct, strict=True)
    }


def gold_by_prefix(pool: TrafficPool, default: int) -> np.ndarray:
    """[N_max + 1]: whether the vote over the first k keys in finishing order names a gold key,
    as evaluate's replay scores it (PoolReplay, with the recorded order as its one ordering;
    tokens are not scored here)."""
    assert pool.gold is not None
    n_max = len(pool.answers)
    labelled = Pool(pool.answers, [0] * n_max, pool.gold, pool.prediction, pool.margin_scale)
    return PoolReplay(labelled, np.arange(n_max)[None, :], default).correct[0]


def cheapest_meeting(
    rows: dict[str, dict], target: float, specs: Sequence[str], metric: str = "agreement"
) -> str | None:
    """Among `specs` (in order), the one with the fewest mean samples whose `metric` is at
    least `target`; the earlier one on a tie."""
    meeting = [s for s in specs if rows[s][metric] >= target - 1e-12]
    return min(meeting, key=lambda s: rows[s]["samples"]) if meeting else None


def best_fixed_within(rows: dict[str, dict], samples: float, fixed: Sequence[str]) -> str:
    """The fixed-N curve at `samples`: the most accurate fixed N launching at most that many
    (the smaller N on a tie)."""
    within = [s for s in fixed if rows[s]["samples"] <= samples + 1e-12]
    assert within  # every policy launches at least one sample, as fixed N = 1 does
    return max(within, key=lambda s: rows[s]["accuracy"])


def load_store(folders: Sequence[Path]) -> list[dict]:
    """Every record of one or more store folders (traffic or `t2serve label`); traffic
    records get their request's gold where the folder's gold-*.jsonl has it (join_gold)."""
    records = []
    for folder in map(Path, folders):
        gold = load_gold(folder)
        records += [join_gold([r], gold)[0] if is_traffic(r) else r for r in load_records(folder)]
    if not records:
        raise ValueError(f"no records in {', '.join(map(str, folders))}")
    return records


def tune(
    records: Sequence[dict],
    *,
    target: float,
    objective: str = "agreement",
    tolerance: float = TOLERANCE,
    held_out: float = HELD_OUT,
    seed: int = 0,
    default: int,
    stopping: StoppingTable | None = None,
    store: Sequence[Path] = (),
) -> dict:
    """Choose the operating point on the tuning part, by `objective` (agreement with the N_max
    vote at least `target`, or accuracy against gold within `tolerance` of the best); report
    it on the held-out part (`store`: the folders the records came from, as the result names
    them)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: one of {', '.join(OBJECTIVES)}")
    if not 0 < target <= 1:
        raise ValueError(f"agreement target {target}: it must be in (0, 1]")
    if not 0 <= tolerance < 1:
        raise ValueError(f"accuracy tolerance {tolerance}: it must be in [0, 1)")
    pools = traffic_pools(records)
    n_max = len(pools[0].answers)
    if stopping is not None and stopping.n_max != n_max:
        raise ValueError(f"the stopping table is for N_max {stopping.n_max}, the pools are of {n_max}")
    predicted = sum(p.prediction is not None for p in pools)
    specs = candidate_specs(n_max, predictions=predicted > 0, stopping=stopping)
    policies = {
        describe(p): p for p in (parse_policy(s, fixed_n=n_max, margin=1.0, stopping=stopping) for s in specs)
    }
    specs = list(policies)
    fixed = [s for s in specs if isinstance(policies[s], Fixed)]
    tuning, held = split_pools(pools, held_out, seed)
    without_gold = sum(p.gold is None for p in pools)
    if objective == "accuracy":
        tuning, held = with_gold(tuning, held, held_out=held_out, without_gold=without_gold)
    on_tuning = replay_candidates(policies, tuning, default=default, desc="replay tuning")
    on_held = replay_candidates(policies, held, default=default, desc="replay held-out") if held else None
    fixed_n_max = describe(Fixed(n_max))
    if objective == "accuracy":
        best = max(specs, key=lambda s: on_tuning[s]["accuracy"])
        chosen = cheapest_meeting(on_tuning, on_tuning[best]["accuracy"] - tolerance, specs, "accuracy")
        assert chosen is not None  # the best candidate meets its own accuracy
    else:
        best = None
        chosen = cheapest_meeting(on_tuning, target, specs) or fixed_n_max
    fallback = objective == "agreement" and chosen == fixed_n_max
    result: dict = {
        "policy": chosen,
        "objective": objective,
        "target": target if objective == "agreement" else None,
        "tolerance": tolerance if objective == "accuracy" else None,
        "best_on_tuning": best,
        "pools_without_gold": without_gold,
        "records": len(records),
        "store": [str(f) for f in store],
        "records_with_prediction": predicted,
        "n_max": n_max,
        "held_out_share": held_out,
        "seed": seed,
        "default_parallelism": default,
        "fallback": fallback,
        "tuning": on_tuning[chosen],
        "held_out": None,
        "candidates": [
            {
                "policy": s,
                "tuning": on_tuning[s],
                "held_out": on_held[s] if on_held else None,
            }
            for s in specs
        ],
    }
    if on_held and objective == "accuracy":
        result["held_out"] = held_out_by_accuracy(on_held, chosen, fixed)
    elif on_held:
        result["held_out"] = held_out_by_agreement(on_held, chosen, fixed, target)
    result["message"] = message(result)
    return result


def with_gold(
    tuning: list[TrafficPool], held: list[TrafficPool], *, held_out: float, without_gold: int
) -> tuple[list[TrafficPool], list[TrafficPool]]:
    """The pools with gold of each side of the split; ValueError saying how to get gold when a
    side that should have pools has none."""
    gold_pools = len(tuning) + len(held) - without_gold
    tuning, held = [p for p in tuning if p.gold is not None], [p for p in held if p.gold is not None]
    if not gold_pools:
        raise ValueError(
            f"objective accuracy: none of the {without_gold} pools has gold (a `t2serve label` record, or a "
            "traffic record whose request has a line in the store's gold-*.jsonl); get gold by labelling a data "
            "set through the servers (`t2serve label --server URL --data SOURCE --out STORE`), or tune with "
            "--objective agreement"
        )
    if not tuning or (held_out and not held):
        side = "tuning" if not tuning else "held-out"
        raise ValueError(
            f"objective accuracy: the {gold_pools} pools with gold all fell outside the {side} part: label more "
            "of the store with gold (`t2serve label --server`), or change --held-out / --seed"
        )
    return tuning, held


def held_out_by_accuracy(rows: dict[str, dict], chosen: str, fixed: Sequence[str]) -> dict:
    """The choice's held-out numbers beside the fixed-N curve at its samples and fixed N_max
    (`fixed`: fixed N = 1..N_max in order)."""
    mine = rows[chosen]
    curve = best_fixed_within(rows, mine["samples"], fixed)
    gain = mine["accuracy"] - rows[curve]["accuracy"]
    return {
        **mine,
        "best_fixed_within_samples": {"policy": curve, **rows[curve]},
        "fixed_n_max": {"policy": fixed[-1], **rows[fixed[-1]]},
        "accuracy_over_fixed_curve": gain,
        "above_fixed_curve": gain > 1e-12,
    }


def held_out_by_agreement(rows: dict[str, dict], chosen: str, fixed: Sequence[str], target: float) -> dict:
    """The choice's held-out numbers beside the cheapest fixed N agreeing as often and at the target."""
    mine = rows[chosen]
    as_often = cheapest_meeting(rows, mine["agreement"], fixed)
    assert as_often is not None  # fixed N_max agrees on every pool
    at_target = cheapest_meeting(rows, target, fixed)
    return {
        **mine,
        "meets_target": mine["agreement"] >= target - 1e-12,
        "cheapest_fixed_at_target": at_target and {"policy": at_target, **rows[at_target]},
        "cheapest_fixed_as_often": {"policy": as_often, **rows[as_often]},
        "samples_saved": rows[as_often]["samples"] - mine["samples"],
        "above_fixed_curve": rows[as_often]["samples"] > mine["samples"],
    }


def message(result: dict) -> str:
    """What the choice means, in one paragraph."""
    if result["objective"] == "accuracy":
        return accuracy_message(result)
    target, chosen = result["target"], result["policy"]
    if result["fallback"]:
        text = (
            f"no policy cheaper than fixed N_max keeps agreement >= {target:g} with the N_max vote on the "
            f"{result['tuning']['pools']} tuning pools: falling back to {chosen} (no samples saved)."
        )
    else:
        tun = result["tuning"]
        text = (
            f"chosen {chosen}: agreement {tun['agreement']:.4f} at {tun['samples']:.2f} mean samples on "
            f"{tun['pools']} tuning pools (target {target:g}, N_max {result['n_max']})."
        )
    held = result["held_out"]
    if held is None:
        return text + " No pools held out: nothing checks the choice."
    text += (
        f" Held out ({held['pools']} pools): agreement {held['agreement']:.4f} at {held['samples']:.2f} samples"
        f"{'' if held['meets_target'] else ', BELOW the target'}."
    )
    at_target = held["cheapest_fixed_at_target"]
    if at_target is not None:
        text += f" Cheapest fixed N reaching the target there: {at_target['policy']} ({at_target['samples']:.2f})."
    as_often = held["cheapest_fixed_as_often"]
    where = "above" if held["above_fixed_curve"] else "not above"
    return text + (
        f" The chosen point is {where} the fixed-N curve: {as_often['policy']} agrees as often with "
        f"{as_often['samples']:.2f} samples ({held['samples_saved']:+.2f} saved)."
    )


def accuracy_message(result: dict) -> str:
    """What a choice by accuracy against gold means, in one paragraph."""
    tun, best = result["tuning"], result["best_on_tuning"]
    text = (
        f"chosen {result['policy']}: accuracy {tun['accuracy']:.4f} against gold at {tun['samples']:.2f} mean "
        f"samples on {tun['pools']} tuning pools with gold, the fewest samples within {result['tolerance']:g} of "
        f"the best candidate ({best}: {accuracy_of(result, best):.4f}; N_max {result['n_max']})."
    )
    if result["pools_without_gold"]:
        text += f" {result['pools_without_gold']} pools without gold were left out."
    held = result["held_out"]
    if held is None:
        return text + " No pools held out: nothing checks the choice."
    curve, top = held["best_fixed_within_samples"], held["fixed_n_max"]
    where = "above" if held["above_fixed_curve"] else "not above"
    return text + (
        f" Held out ({held['pools']} pools with gold): accuracy {held['accuracy']:.4f} at {held['samples']:.2f} "
        f"samples; the chosen point is {where} the fixed-N curve: the best fixed N of at most as many samples, "
        f"{curve['policy']}, gives {curve['accuracy']:.4f} ({held['accuracy_over_fixed_curve']:+.4f}); "
        f"{top['policy']} gives {top['accuracy']:.4f}."
    )


def accuracy_of(result: dict, spec: str) -> float:
    return next(r["tuning"]["accuracy"] for r in result["candidates"] if r["policy"] == spec)


def report_table(result: dict) -> str:
    """Every candidate's agreement (or accuracy) and samples, tuning and held out, cheapest first."""
    metric, short = ("accuracy", "acc") if result["objective"] == "accuracy" else ("agreement", "agree")
    lines = [
        f"{'policy':<34} {'tune ' + short:>10} {'samples':>8} {'held ' + short:>10} {'samples':>8}",
    ]
    for row in sorted(result["candidates"], key=lambda r: r["tuning"]["samples"]):
        tun, held = row["tuning"], row["held_out"]
        mark = "*" if row["policy"] == result["policy"] else " "
        held_text = f"{held[metric]:>10.4f} {held['samples']:>8.2f}" if held else f"{'-':>10} {'-':>8}"
        lines.append(f"{mark}{row['policy']:<33} {tun[metric]:>10.4f} {tun['samples']:>8.2f} {held_text}")
    return "\n".join([*lines, "", result["message"]])


def write_result(result: dict, path: Path) -> None:
    """The tuned operating point; `t2serve serve --policy @PATH` serves its "policy"."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
