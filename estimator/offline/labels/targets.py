"""Sample-optimal parallelism labels from a pool of sampled answers.

Definitions (used in code, docs and reports exactly as written here):

- For a question x with a pool of N_max sampled answers, A_x(N) is the expected
  majority-vote accuracy with N samples drawn without replacement from the pool.
  Samples without an answer abstain; if nobody votes the vote is wrong. **Ties count
  fractionally**: a tie between the gold answer and t other answers earns 1/(t+1). This is
  exactly the expected accuracy under the server's default tie rule ("first seen in sample
  order wins"), because sample order is random.
- Sample-optimal level N*_x = the smallest N in [1, N_max] with A_x(N) >= max_N A_x(N) - eps
  (eps = 0 by default).
- System-optimal level N_D = the smallest N maximising the dataset mean of A_x(N).
- Overscaling index M_D = mean_x(N*_x) / N_D.
- Sample types by the shape of A_x(N) (delta = 0.05; monotonicity checked exactly):
    1 "solved"       A(N) >= 1 - delta for every N (solved at N = 1 and stays solved)
    2 "unsolved"     A(N) <= delta for every N (never solved)
    3 "decreasing"   A never rises and A(N_max) < A(1): a wrong answer is the mode
    4 "increasing"   A never falls and A(N_max) > A(1): needs more samples
    5 "non-monotone" anything else (rises then falls, or falls then rises)

A_x(N) is computed exactly (`expected_accuracy`, a polynomial DP over answer classes,
O(K * N_max^2) numpy work per gold count for K distinct answers) or estimated by Monte Carlo
(`expected_accuracy_mc`, vectorised over tau random orderings; the standard error of each
A(N) is at most 0.5 / sqrt(tau), so the default tau = 10,000 keeps it <= 0.005).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Sequence
from math import comb

import numpy as np

TYPES = {1: "solved", 2: "unsolved", 3: "decreasing", 4: "increasing", 5: "non-monotone"}
SOLVED_DELTA = 0.05  # "solved" = A(N) >= 0.95 for every N; "unsolved" = A(N) <= 0.05 for every N
# A(N) is computed exactly, so monotonicity is checked exactly (up to float rounding): a
# curve that rises by any amount and then falls is non-monotone.
MONOTONE_TOL = 0.0
_TOL = 1e-9


# The correct vote key(s) of a question: its gold answer, or (labels keyed by another
# aggregator, or graded by math-verify) every distinct key judged correct.
Gold = str | Collection[str]
MC_ORDERINGS = 4_000  # A(N) by Monte Carlo when several keys are correct (no exact DP)


def gold_keys(gold: Gold) -> frozenset[str]:
    return frozenset((gold,)) if isinstance(gold, str) else frozenset(gold)


def gold_of(record: dict) -> frozenset[str]:
    """A label record's correct keys (`gold_keys`, else its gold `answer`)."""
    return gold_keys(record.get("gold_keys") or record["answer"])


def source_of(record: dict) -> str:
    """The data set a label record came from (records made before sources were recorded: the generator)."""
    return record.get("source", "builtin")


def _class_sizes(answers: Sequence[str | None], gold: str) -> tuple[int, list[int], int]:
    counts = Counter(a for a in answers if a is not None)
    n_gold = counts.pop(gold, 0)
    abstain = sum(1 for a in answers if a is None)
    return n_gold, sorted(counts.values(), reverse=True), abstain


def expected_accuracy(answers: Sequence[str | None], gold: Gold) -> np.ndarray:
    """A(N) for N = 1..len(answers) (index N-1), fractional ties: exact when at most one of
    the gold keys was sampled, else by Monte Carlo (MC_ORDERINGS, fixed seed)."""
    present = gold_keys(gold) & set(answers)
    if len(present) > 1:
        return expected_accuracy_mc(answers, present, tau=MC_ORDERINGS, seed=0)
    n_max = len(answers)
    if not present:
        return np.zeros(n_max)
    n_gold, others, abstain = _class_sizes(answers, next(iter(present)))
    result = np.zeros(n_max)
    if n_gold == 0:
        return result
    totals = np.array([comb(n_max, n) for n in range(n_max + 1)], dtype=np.float64)
    k = len(others)
    abstain_poly = np.array([comb(abstain, c) for c in range(abstain + 1)], dtype=np.float64)
    for g in range(1, n_gold + 1):
        # ways[j, t]: choose j non-gold samples with every other class taking <= g of its
        # members and exactly t of them taking exactly g (a t-way tie with the gold answer).
        ways = np.zeros((n_max + 1, k + 1))
        ways[: len(abstain_poly), 0] = abstain_poly
        for size in others:
            new = np.zeros_like(ways)
            for c in range(min(size, g) + 1):
                weight = comb(size, c)
                if c == g:
                    new[c:, 1:] += weight * ways[: n_max + 1 - c, :-1]
                else:
                    new[c:, :] += weight * ways[: n_max + 1 - c, :]
            ways = new
        tie_credit = ways @ (1.0 / np.arange(1, k + 2))  # [j] -> sum_t ways[j, t] / (t + 1)
        pick_gold = comb(n_gold, g)
        for n in range(g, n_max + 1):
            result[n - 1] += pick_gold * tie_credit[n - g] / totals[n]
    return np.clip(result, 0.0, 1.0)


def expected_accuracy_mc(
    answers: Sequence[str | None], gold: Gold, tau: int = 10_000, seed: int = 0, chunk: int = 2_000
) -> np.ndarray:
    """Monte Carlo A(N) for N = 1..len(answers): tau random orderings of the pool, every
    prefix length at once (fractional ties, as in `expected_accuracy`: a tie is worth the
    share of its keys that are correct)."""
    n_max = len(answers)
    labels = sorted({a for a in answers if a is not None})
    gold_ids = [i for i, a in enumerate(labels) if a in gold_keys(gold)]
    if not gold_ids:
        return np.zeros(n_max)
    index = {a: i for i, a in enumerate(labels)}
    classes = np.array([index[a] if a is not None else -1 for a in answers])
    onehot = np.zeros((n_max, len(labels)), dtype=np.int32)
    voting = classes >= 0
    onehot[np.nonzero(voting)[0], classes[voting]] = 1
    rng = np.random.default_rng(seed)
    total = np.zeros(n_max)
    done = 0
    while done < tau:
        m = min(chunk, tau - done)
        order = np.argsort(rng.random((m, n_max)), axis=1)
        counts = np.cumsum(onehot[order], axis=1)  # [m, N, K]: votes after the first N samples
        top = counts.max(axis=2)
        at_top = counts == top[..., None]
        gold_top = at_top[..., gold_ids].sum(axis=2) * (top > 0)
        total += (gold_top / at_top.sum(axis=2)).sum(axis=0)
        done += m
    return total / tau


def sample_optimal_n(accuracy: np.ndarray, eps: float = 0.0) -> int:
    """N*: the smallest N whose A(N) reaches max A - eps."""
    return int(np.argmax(accuracy >= accuracy.max() - eps - _TOL)) + 1


def system_optimal_n(accuracies: np.ndarray) -> int:
    """N_D: the smallest N maximising the mean of A_x(N) over questions ([questions, N_max])."""
    mean = np.asarray(accuracies).mean(axis=0)
    return int(np.argmax(mean >= mean.max() - _TOL)) + 1


def overscaling_index(n_star: Sequence[int], n_d: int) -> float:
    """M_D = mean(N*_x) / N_D."""
    return float(np.mean(n_star)) / n_d


def sample_type(accuracy: np.ndarray, delta: float = SOLVED_DELTA, tol: float = MONOTONE_TOL) -> int:
    """1 solved, 2 unsolved, 3 decreasing, 4 increasing, 5 non-monotone (see module doc)."""
    a = np.asarray(accuracy)
    if a.min() >= 1 - delta - _TOL:
        return 1
    if a.max() <= delta + _TOL:
        return 2
    steps = np.diff(a)
    if np.all(steps <= tol + _TOL) and a[-1] < a[0]:
        return 3
    if np.all(steps >= -tol - _TOL) and a[-1] > a[0]:
        return 4
    return 5
