"""One vote replayed: a sampling policy driven over answers that finish in a given order,
through the same two calls the server's loop makes (estimator.policies). The offline
replay (estimator/offline/evaluation/replay.py) drives it over random orderings of labelled
pools; the live gauge (server/shadow.py) over each explored pool in the order its samples
finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from estimator.policies import Budget, Policy, Tally


@dataclass(frozen=True)
class Run:
    finished: int  # samples whose answers the vote used (a prefix of the order)
    launched: int  # samples started; launched - finished were aborted when the vote stopped
    rounds: int  # latency in sample durations (a sample launched on a result starts then)


def drive(policy: Policy, budget: Budget, answers: Sequence[str | None]) -> Run:
    """Run one vote: the samples finish in the order of `answers` (launch order)."""
    tally = Tally()
    launched = policy.first_launch(budget)
    if not 1 <= launched <= budget.cap:
        raise ValueError(f"{policy} launched {launched} with cap {budget.cap}")
    finish_round = [1] * launched  # unit-duration samples: round in which each one finishes
    while True:
        i = tally.finished
        if i >= launched:
            raise RuntimeError(f"{policy} waits with nothing in flight")
        tally.add(answers[i])
        decision = policy.on_result(tally, launched, budget)
        if decision.stop:
            return Run(tally.finished, launched, finish_round[i])
        if decision.launch:
            if launched + decision.launch > budget.cap:
                raise RuntimeError(f"{policy} launched past the cap {budget.cap}")
            finish_round += [finish_round[i] + 1] * decision.launch
            launched += decision.launch
