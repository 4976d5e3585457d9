"""Fitting the learned stopping table (estimator.learned_stopping.StoppingTable) on the
labelled train pools: `t2serve train` runs it beside the head.

For a question whose head estimate is e = N_max * prediction, the labelled train questions
with estimates near e are the prior: replaying random orderings of their pools
(estimator.offline.evaluation.replay) gives, per vote state s = (k, v1, v2), how often the vote there
names the gold answer, C(s), and where the next sample leads, P(s' | s). Questions weigh in
by a Gaussian kernel of their estimate's distance to e (bandwidth in samples), so the table
is tabulated on a grid of e and smooth in it; the served side solves the stopping rule from
these counts by backward induction.

The predictions used for fitting must be out-of-sample (a head predicts its own train split
too well): `t2serve train` cross-fits them (estimator.offline.training.probes.cross_fitted_predictions).
"""

from __future__ import annotations

import numpy as np

from estimator.learned_stopping import State, StoppingTable
from estimator.offline.engine_runs import majority_vote
from estimator.offline.evaluation.replay import Pool, PoolReplay, orderings_for
from estimator.offline.labels.targets import gold_of
from estimator.policies import Tally


def vote_states(answers: tuple[str | None, ...]) -> list[State]:
    """The state (Tally.state) after each prefix of `answers` (finishing order)."""
    tally = Tally()
    out = []
    for answer in answers:
        tally.add(answer)
        out.append(tally.state())
    return out


def reference(record: dict) -> frozenset[str]:
    """What the table counts a vote right against: the gold keys where the record is trained on
    gold, else (gold-free targets, estimator.offline.labels.gold_free) the pool's N_max vote,
    as the live gauge and `t2serve tune` count agreement."""
    if record.get("target_rule", "gold") == "gold":
        return gold_of(record)
    vote = majority_vote(record["answers"]).answer
    return frozenset() if vote is None else frozenset((vote,))


def fit_stopping(
    records: list[dict],
    predictions: np.ndarray,
    *,
    bandwidth: float = 1.0,
    step: float = 0.25,
    orderings: int = 100,
    seed: int = 0,
    progress: bool = True,
) -> StoppingTable:
    """Fit the table on labelled questions (`answers`, `answer` or a gold-free target rule:
    `reference`) and their out-of-sample head predictions (N*/N_max)."""
    from tqdm import tqdm

    n_max = len(records[0]["answers"])
    estimates = np.asarray(predictions, dtype=np.float64) * n_max
    index: dict[State, int] = {}
    edge_index: dict[tuple[int, int], int] = {}
    per_question = []
    orders = orderings_for(len(records), n_max, orderings, seed)
    rows = tqdm(
        list(zip(records, orders, strict=True)), desc="stopping table", unit="q", disable=not progress
    )
    for record, order in rows:
        replay = PoolReplay(
            Pool(record["answers"], record["tokens"], reference(record)), order, default=n_max
        )
        visits: dict[int, int] = {}
        correct: dict[int, float] = {}
        moves: dict[int, int] = {}
        for r, sequence in enumerate(replay.sequences):
            path = [index.setdefault(s, len(index)) for s in vote_states(sequence)]
            for k, i in enumerate(path):
                visits[i] = visits.get(i, 0) + 1
                correct[i] = correct.get(i, 0.0) + replay.correct[r, k + 1]
            for i, j in zip(path, path[1:], strict=False):
                e = edge_index.setdefault((i, j), len(edge_index))
                moves[e] = moves.get(e, 0) + 1
        per_question.append((visits, correct, moves))
    counts = np.zeros((len(records), len(index)))
    hits = np.zeros_like(counts)
    steps = np.zeros((len(records), len(edge_index)))
    for q, (visits, correct, moves) in enumerate(per_question):
        counts[q, list(visits)] = list(visits.values())
        hits[q, list(correct)] = list(correct.values())
        steps[q, list(moves)] = list(moves.values())
    grid = np.arange(np.floor(estimates.min() / step) * step, estimates.max() + step, step)
    kernel = np.exp(-0.5 * ((grid[:, None] - estimates[None, :]) / bandwidth) ** 2)
    # Rows normalised: every grid point's table is a weighted mean over questions, so values
    # stay in range when stored as float32.
    kernel /= kernel.sum(axis=1, keepdims=True)
    return StoppingTable(
        n_max=n_max,
        bandwidth=bandwidth,
        grid=grid,
        states=list(index),
        visits=kernel @ counts,
        correct=kernel @ hits,
        edges=np.array(list(edge_index), dtype=np.int64).reshape(-1, 2),
        moves=kernel @ steps,
        info={"questions": str(len(records)), "orderings": str(orderings), "seed": str(seed)},
    )
