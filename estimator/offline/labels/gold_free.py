"""What `t2serve train` fits the head to: N* of a target curve, per pool, by one of RULES.

    gold       the labelled A_x(N) against the gold answer (estimator.offline.labels.targets):
               needs gold (label folders, or traffic joined to gold: labels/traffic.py)
    majority   A(N) against the pool's own N_max vote, as if it were right
    share      E[A(N)] with each answer as likely right as its vote share
    posterior  E[A(N)] with each answer as likely right as the calibrated answer posterior
               says (estimator.offline.labels.answer_posterior)

A rule gives each answer a the probability p(a) of being the gold one; the mass left over is
"no answer of the pool is right". The target is the gold N* expected under p:

    N* = sum_a p(a) * N*(A(N | gold = a)) + (1 - sum_a p(a)) * 1

(N*(A) the smallest N whose A(N) reaches max - eps; with no answer right every N is as good,
N* = 1), and the target curve, which the head's margin is fitted on, is
E[A(N)] = sum_a p(a) * A(N | gold = a), with A from `expected_accuracy`.

Why the expected N*, not the N* of the expected curve: the head is fitted by squared error,
so it learns the mean of its targets given the states. With a calibrated p that mean is the
mean gold N*, what a gold head learns. The N* of a mixed curve is another thing: a pool whose
leader is right with p = 0.5 mixes a rising and a falling curve into one that still peaks
late, so every split vote was labelled high. Measured on built-in generator labels
(docs/estimator.md, "Train from traffic"), the calibrated posterior's heads went from 0.4
points below the fixed-N curve to on it, and with the states-reading posterior above it.

Why the posterior: against its own majority every pool reaches agreement 1 only at N_max, so
the majority rule labels a split vote high, though split votes are often questions the model
gets wrong whatever N (gold N* = 1). Where the posterior says the majority is unlikely right,
the curve is flat (a rising majority term weighted little, falling minority terms) and N* small.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from estimator.offline.engine_runs import majority_vote
from estimator.offline.labels.answer_posterior import AnswerPosterior
from estimator.offline.labels.targets import expected_accuracy, sample_optimal_n

RULES = ("gold", "majority", "share", "posterior")


def has_gold(record: dict) -> bool:
    """A label record, or a traffic record joined to its gold answer."""
    return "answer" in record and "accuracy" in record


def answer_probabilities(
    answers: Sequence[str | None],
    rule: str,
    posterior: AnswerPosterior | None = None,
    state: np.ndarray | None = None,
) -> dict[str, float]:
    """p(a) per distinct answer of the pool under a gold-free `rule` (`state`: the question's
    captured states [layers, hidden], read by a posterior fitted with states)."""
    if rule == "majority":
        vote = majority_vote(list(answers)).answer
        return {} if vote is None else {vote: 1.0}
    if rule == "share":
        return {a: c / len(answers) for a, c in Counter(a for a in answers if a is not None).items()}
    if rule == "posterior":
        if posterior is None:
            raise ValueError("posterior targets need a calibration (--calibration FILE)")
        return posterior.probabilities(answers, state)
    raise ValueError(f"no gold-free target rule {rule!r} (one of {', '.join(RULES[1:])})")


def expected_curve(answers: Sequence[str | None], probabilities: dict[str, float]) -> np.ndarray:
    """E[A(N)] = sum_a p(a) * A(N | gold = a), N = 1..len(answers)."""
    curve = np.zeros(len(answers))
    for answer, p in probabilities.items():
        if p > 0:
            curve += p * expected_accuracy(answers, answer)
    return curve


def expected_n_star(
    answers: Sequence[str | None], probabilities: dict[str, float], eps: float = 0.0
) -> float:
    """sum_a p(a) * N*(A(N | gold = a)) + (1 - sum_a p(a)) * 1: the gold N* expected under p."""
    n_star = max(0.0, 1.0 - sum(probabilities.values()))
    for answer, p in probabilities.items():
        if p > 0:
            n_star += p * sample_optimal_n(expected_accuracy(answers, answer), eps)
    return n_star


@dataclass(frozen=True)
class Target:
    curve: np.ndarray  # the target A(N), N = 1..N_max
    n_star: float  # an integer for gold and majority, an expectation for share and posterior


def pool_target(
    record: dict,
    rule: str,
    *,
    posterior: AnswerPosterior | None = None,
    eps: float = 0.0,
    state: np.ndarray | None = None,
) -> Target:
    """The target of one record under `rule`; `gold` keeps the label's own curve and N*."""
    if rule == "gold":
        if not has_gold(record):
            raise ValueError(
                f"record {record['id']} has no gold answer: gold targets need label folders or traffic "
                "joined to gold (gold-*.jsonl); use --targets majority, share or posterior"
            )
        return Target(np.asarray(record["accuracy"], dtype=np.float64), int(record["n_star"]))
    probabilities = answer_probabilities(record["answers"], rule, posterior, state)
    return Target(
        expected_curve(record["answers"], probabilities),
        expected_n_star(record["answers"], probabilities, eps),
    )


def with_targets(
    records: Sequence[dict],
    rule: str | None,
    *,
    posterior: AnswerPosterior | None = None,
    eps: float = 0.0,
    fallback: str = "majority",
    states: np.ndarray | None = None,
) -> list[dict]:
    """Copies of `records` with `target_accuracy` and `target_n_star`. `rule` None: gold where a
    record has gold, `fallback` (a gold-free rule) where not. `states` [records, layers,
    hidden]: the records' captured states, for a posterior fitted with states."""
    out = []
    for i, record in enumerate(records):
        chosen = rule or ("gold" if has_gold(record) else fallback)
        state = None if states is None else states[i]
        target = pool_target(record, chosen, posterior=posterior, eps=eps, state=state)
        out.append(
            {
                **record,
                "target_rule": chosen,
                "target_accuracy": [float(a) for a in target.curve],
                "target_n_star": target.n_star,
            }
        )
    return out
