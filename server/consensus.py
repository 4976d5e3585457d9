"""Free-text consensus: samples grouped by similarity as they finish; the largest group wins
and its medoid (the member most similar to the rest) is returned. When no group wins (the
largest has one member, or ties with another) the vote falls back to minimum Bayes risk:
every voter is pooled under one MBR key and the medoid of them all is returned, not
whichever singleton the vote's tie rule would name (open-ended prompts at N = 8 rarely
form a group at THRESHOLD; benchmarks/consensus_quality.py --open-ended measures the pick).

Similarity is chrF (character n-gram F-score, n = 1..4, recall weighted by beta = 2, spaces
ignored; over distinct n-grams, so the set operations run in C), chosen over word-level ROUGE-L by benchmarks/consensus_quality.py (README, "Free
text"). Texts are compared on their first MAX_CHARS characters, so one comparison is O(MAX_CHARS)
and a vote of N samples costs at most N² / 2 comparisons.

Keys are assigned incrementally: a finished sample joins the first group whose first member
it resembles (similarity >= threshold), else it starts a group. A group's key names it by its
first member ("#2: <its first words>"), so the stopping policies' tallies, ESC and the learned
stop run on free text unchanged.
"""

from __future__ import annotations

import re
from collections import Counter
from functools import lru_cache

MAX_CHARS = 1000
NGRAM = 4
BETA = 2.0
THRESHOLD = 0.7  # chosen on validation questions by benchmarks/consensus_quality.py
KEY_CHARS = 40
MBR_PREFIX = "mbr: "
MBR_MIN_VOTERS = 3  # of two texts neither is closer to the rest: the vote's own rule picks


@lru_cache(maxsize=4096)
def _ngrams(text: str) -> tuple[frozenset[str], ...]:
    compact = "".join(text[:MAX_CHARS].split())
    return tuple(
        frozenset(compact[i : i + n] for i in range(len(compact) - n + 1)) for n in range(1, NGRAM + 1)
    )


def chrf(a: str, b: str) -> float:
    """chrF of `a` against `b` (symmetric up to beta): 0 (nothing shared) .. 1 (same text)."""
    if a == b:
        return 1.0
    scores = []
    for ga, gb in zip(_ngrams(a), _ngrams(b), strict=True):
        if not ga or not gb:
            continue
        common = len(ga & gb)
        precision, recall = common / len(ga), common / len(gb)
        if precision + recall == 0:
            scores.append(0.0)
            continue
        scores.append((1 + BETA**2) * precision * recall / (BETA**2 * precision + recall))
    return sum(scores) / len(scores) if scores else 0.0


def similarity(a: str, b: str) -> float:
    """Symmetric: the mean of chrF both ways."""
    return (chrf(a, b) + chrf(b, a)) / 2


class ConsensusKeys:
    """One vote's groups, keyed as samples finish (one instance per vote)."""

    def __init__(self, threshold: float = THRESHOLD):
        self.threshold = threshold
        self.firsts: list[tuple[str, str]] = []  # (key, first member's text) per group

    def key(self, text: str) -> str | None:
        text = text.strip()
        if not text:
            return None
        for key, first in self.firsts:
            if similarity(text, first) >= self.threshold:
                return key
        key = f"#{len(self.firsts) + 1}: {' '.join(text.split())[:KEY_CHARS]}"
        self.firsts.append((key, text))
        return key


def is_group_key(key: str) -> bool:
    """Whether a vote key names a similarity group (ConsensusKeys) rather than an answer."""
    return re.match(r"#\d+: ", key) is not None


def medoid(texts: list[str]) -> int:
    """Index of the text with the highest total similarity to the others (first on ties)."""
    if len(texts) <= 2:
        return 0
    totals = [0.0] * len(texts)
    for i in range(len(texts)):
        for j in range(i + 1, len(texts)):
            s = similarity(texts[i], texts[j])
            totals[i] += s
            totals[j] += s
    return max(range(len(texts)), key=lambda i: (totals[i], -i))


def mbr_keys(keys: list[str | None], groups: list[str | None] | None = None) -> list[str | None] | None:
    """`keys` with every voter (non-None key) pooled under one MBR key, when at least
    MBR_MIN_VOTERS voted and no group of `groups` (default: `keys`) won: its largest has one
    member or ties with another. None when a group won (or too few voted): the vote stands.
    The key says what the pick is the medoid of and how large the largest group was."""
    voters = sum(k is not None for k in keys)
    sizes = Counter(k for k in (keys if groups is None else groups) if k is not None).most_common(2)
    won = bool(sizes) and sizes[0][1] > 1 and (len(sizes) == 1 or sizes[1][1] < sizes[0][1])
    if voters < MBR_MIN_VOTERS or won:
        return None
    largest = sizes[0][1] if sizes else 0
    key = f"{MBR_PREFIX}medoid of {voters} (largest group {largest})"
    return [None if k is None else key for k in keys]


def is_mbr_key(key: str | None) -> bool:
    """Whether a vote key is mbr_keys' pooled key."""
    return key is not None and key.startswith(MBR_PREFIX)
