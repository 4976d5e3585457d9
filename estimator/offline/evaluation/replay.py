"""Offline replay of sampling policies on labelled pools: every policy sees the same samples.

A labelled question has a pool of N_max sampled answers (and their generated token counts).
For each question we draw R random orderings of the pool (fixed seed); an ordering is the
order in which samples are launched and finish. Every policy is driven through its real
interface (estimator.policies) by estimator.replay.drive, the live gauge's driver too
(server/shadow.py), over every ordering, capped at N_max (the pool is finite):

    finished  = samples whose answers the vote used (a prefix of the ordering)
    launched  = samples started; launched - finished were aborted when the vote was decided
    correct   = the server's vote (server.voting.majority_vote, tie rule "first seen wins")
                over the finished answers names the gold answer (one of the correct keys,
                for labels keyed by another aggregator or graded by math-verify)
    rounds    = latency in sample durations: every sample takes one unit, a sample launched
                in reaction to a result starts when that result arrives (Fixed/T2: 1 round;
                one-at-a-time Adaptive-Consistency: one round per sample)

Costs of aborted samples (the decoding happened in parallel until the stop):
    tokens        = full tokens of finished samples + for each aborted sample
                    min(its tokens, tokens of the sample whose result stopped the vote)
                    (lock-step decoding: it ran about as long as the stopping sample)
    tokens_upper  = full tokens of every launched sample (an upper bound)
Both are reported relative to the tokens of all N_max samples.

Simplification: finishing order is taken as random and equal to launch order; in a real
engine shorter samples finish first, and any correlation of length with correctness is not
modelled. Averaging `correct` over orderings converges to the exact A_x(N) of
estimator.offline.labels.targets for Fixed(N) (tests/estimator/offline/evaluation/test_replay.py checks it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from estimator.offline.engine_runs import majority_vote
from estimator.offline.labels.targets import Gold, gold_keys
from estimator.policies import Budget, Policy
from estimator.replay import Run, drive


@dataclass
class Pool:
    """One labelled question: its sampled answers and the estimator's prediction."""

    answers: list[str | None]
    tokens: list[int]
    gold: Gold  # the correct key, or keys (estimator.offline.labels.targets.gold_of)
    prediction: float | None = None
    margin_scale: float = 1.0  # the gate's multiple of T2's margin (estimator.gate)


class PoolReplay:
    """The R orderings of one pool, with what every prefix of each ordering votes for."""

    def __init__(self, pool: Pool, orderings: np.ndarray, default: int):
        self.pool = pool
        n_max = len(pool.answers)
        self.budget = Budget(
            pool.prediction, n_max=n_max, default=default, cap=n_max, margin_scale=pool.margin_scale
        )
        self.orderings = orderings
        self.sequences = [tuple(pool.answers[j] for j in order) for order in orderings]
        self.token_rows = np.asarray(pool.tokens, dtype=np.int64)[orderings]  # [R, N_max]
        self.total_tokens = float(np.sum(pool.tokens))
        # correct[r, k]: the vote over the first k samples of ordering r names the gold answer.
        self.correct = np.zeros((len(orderings), n_max + 1))
        votes: dict[tuple, bool] = {}  # orderings share prefixes: vote each prefix once
        correct = gold_keys(pool.gold)
        for r, seq in enumerate(self.sequences):
            for k in range(1, n_max + 1):
                prefix = seq[:k]
                if prefix not in votes:
                    votes[prefix] = majority_vote(list(prefix)).answer in correct
                self.correct[r, k] = votes[prefix]

    def replay(self, policy: Policy) -> dict[str, float]:
        """Means over the orderings of one policy's outcome on this pool."""
        rows = []
        # A policy decides from the answers it has seen, so two orderings that share the
        # prefix at which one of them stopped stop there alike: drive each such prefix once.
        stops: dict[tuple, Run] = {}
        for r, seq in enumerate(self.sequences):
            if not policy.adapts:
                n = policy.first_launch(self.budget)
                run = Run(n, n, 1)
            else:
                run = next((stops[seq[:k]] for k in range(1, len(seq) + 1) if seq[:k] in stops), None)
                if run is None:
                    run = drive(policy, self.budget, seq)
                    stops[seq[: run.finished]] = run
            tokens = self.token_rows[r]
            spent = tokens[: run.finished].sum()
            aborted = tokens[run.finished : run.launched]
            trigger = tokens[run.finished - 1]
            rows.append(
                (
                    self.correct[r, run.finished],
                    run.launched,
                    run.finished,
                    run.rounds,
                    (spent + np.minimum(aborted, trigger).sum()) / self.total_tokens,
                    (spent + aborted.sum()) / self.total_tokens,
                )
            )
        mean = np.mean(np.array(rows, dtype=np.float64), axis=0)
        keys = ("accuracy", "launched", "finished", "rounds", "tokens", "tokens_upper")
        return dict(zip(keys, (float(v) for v in mean), strict=True))


def orderings_for(n_questions: int, n_max: int, count: int, seed: int) -> list[np.ndarray]:
    """`count` random permutations of range(n_max) per question, from one fixed seed."""
    rng = np.random.default_rng(seed)
    return [np.argsort(rng.random((count, n_max)), axis=1) for _ in range(n_questions)]


OUTCOMES = ("accuracy", "launched", "finished", "rounds", "tokens", "tokens_upper")


def replay_matrix(
    pools: list[Pool],
    policies: list[Policy],
    *,
    orderings: int,
    seed: int,
    default: int,
    desc: str = "replay",
) -> np.ndarray:
    """[questions, policies, OUTCOMES]: each outcome's mean over the orderings."""
    from tqdm import tqdm

    n_max = len(pools[0].answers)
    orders = orderings_for(len(pools), n_max, orderings, seed)
    out = np.zeros((len(pools), len(policies), len(OUTCOMES)))
    for q, (pool, order) in enumerate(tqdm(list(zip(pools, orders, strict=True)), desc=desc, unit="q")):
        replay = PoolReplay(pool, order, default)
        for i, policy in enumerate(policies):
            outcome = replay.replay(policy)
            out[q, i] = [outcome[k] for k in OUTCOMES]
    return out


def summarise(policies: list[Policy], matrix: np.ndarray) -> list[dict]:
    """Per policy: its registered name, its knobs and the question-mean of every outcome."""
    means = matrix.mean(axis=0)
    return [
        {"policy": p.name, "knobs": p.knobs, **dict(zip(OUTCOMES, (float(v) for v in m), strict=True))}
        for p, m in zip(policies, means, strict=True)
    ]


def oracle_frontier(accuracy: np.ndarray, lambdas: np.ndarray | None = None) -> list[dict]:
    """Best accuracy per mean samples of any per-question fixed N (knowing every A_x(N)):
    N_x(lambda) = the smallest argmax_N A_x(N) - lambda * N. lambda = 0 gives N*_x."""
    acc = np.asarray(accuracy)  # [questions, N_max]
    n = np.arange(1, acc.shape[1] + 1)
    if lambdas is None:
        lambdas = np.concatenate([[0.0], np.geomspace(1e-4, 1.0, 200)])
    points = []
    for lam in lambdas:
        # Rounded so that float noise does not break ties; argmax keeps the smaller N.
        chosen = np.argmax(np.round(acc - lam * n, 9), axis=1)
        points.append(
            {
                "lambda": float(lam),
                "accuracy": float(acc[np.arange(len(acc)), chosen].mean()),
                "launched": float((chosen + 1).mean()),
            }
        )
    return points
