"""Stopping criteria: how sure a vote is that its current leader stays the majority.

Stopping criteria, over the answer counts of the finished samples (abstentions do not vote,
and a vote nobody has cast is never decided):
- "beta": the two leading counts v1 >= v2; p1 = the leader's share of the two, with the
  uniform prior p1 ~ Beta(v1 + 1, v2 + 1). Confidence = P(p1 > 1/2), in closed form for
  integer parameters: P(Binomial(v1 + v2 + 1, 1/2) <= v1).
- "dirichlet": every observed answer plus one pseudo-class for "an answer not seen yet"
  (count 0), shares p ~ Dirichlet(counts + 1). Confidence = P(the leader's share is the
  largest), estimated by Monte Carlo with DIRICHLET_DRAWS draws from a fixed seed
  (deterministic, standard error <= 0.008 at DIRICHLET_DRAWS = 4096) and cached per count
  vector. The unseen pseudo-class keeps a unanimous tally from counting as certain after
  one sample; with one observed answer it equals the beta criterion.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from estimator.policies import Tally

Criterion = Literal["beta", "dirichlet"]
CRITERIA = ("beta", "dirichlet")
DIRICHLET_DRAWS = 4096
DIRICHLET_SEED = 0


def criterion(value: str) -> str:
    if value not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}")
    return value


def beta_confidence(v1: int, v2: int) -> float:
    """P(p1 > 1/2) for p1 ~ Beta(v1 + 1, v2 + 1)."""
    return _beta_confidence(int(v1), int(v2))


@lru_cache(maxsize=4096)
def _beta_confidence(v1: int, v2: int) -> float:
    # I_{1/2}(a, b) = P(Binomial(a + b - 1, 1/2) >= a), so P(p1 > 1/2) = P(Bin(n, 1/2) <= v1).
    n = v1 + v2 + 1
    return sum(math.comb(n, j) for j in range(v1 + 1)) / 2**n


@lru_cache(maxsize=8192)
def dirichlet_confidence(counts: tuple[int, ...]) -> float:
    """P(the leader's share is the largest) under Dirichlet(counts + 1, 1) (the last class
    stands for answers not seen yet); `counts` sorted, leader first."""
    if not counts or counts[0] == 0:
        return 0.0
    alpha = np.array([*counts, 0], dtype=np.float64) + 1.0
    rng = np.random.default_rng(DIRICHLET_SEED)
    # Gamma draws normalised are Dirichlet draws; the argmax does not need the normalising.
    draws = rng.gamma(alpha, size=(DIRICHLET_DRAWS, len(alpha)))
    return float(np.mean(np.argmax(draws, axis=1) == 0))


def confidence(criterion: Criterion, tally: Tally) -> float:
    """How sure the criterion is that the current leader stays the majority."""
    counts = tally.sorted_counts()
    if not counts:
        return 0.0
    if criterion == "beta":
        return beta_confidence(counts[0], counts[1] if len(counts) > 1 else 0)
    if criterion == "dirichlet":
        return dirichlet_confidence(counts)
    raise ValueError(f"unknown criterion {criterion!r}")
