"""Is a sampled answer the gold one? Equivalence for labels, where string keys fall short.

The server votes on normalised keys (server.voting.normalize_answer): "0.5", "1/2" and
"\\frac{1}{2}" are already one key, but "\\frac{\\pi}{2}" and "\\pi/2", or "5\\sqrt{2}" and
"\\sqrt{50}", are not. Labels grade each distinct key against the gold answer with
`math-verify` (symbolic equivalence via sympy) and count every equivalent key as correct
(estimator.offline.labels.labeling.correct_keys; they stay separate keys, as in the server's vote).
math-verify bounds its own parsing with SIGALRM, which works only in a process's main
thread, and sympy can still hang on hostile input: the checks run in one worker process,
each bounded by `timeout` seconds; a check that runs over counts as "not equivalent" and the
worker is replaced.
"""

from __future__ import annotations

import multiprocessing

TIMEOUT_S = 10.0


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _verify(gold: str, answer: str) -> bool:
    from math_verify import parse, verify

    # Wrapped in $...$ so that LaTeX answers parse as LaTeX and plain ones as expressions.
    return bool(verify(parse(f"${gold}$"), parse(f"${answer}$")))


class Grader:
    """Grades sampled keys against gold keys; cached per (gold, key) pair."""

    def __init__(self, timeout: float = TIMEOUT_S):
        self.timeout = timeout
        self._pool: multiprocessing.pool.Pool | None = None
        self._cache: dict[tuple[str, str], bool] = {}
        self.timeouts = 0

    def equivalent(self, answer: str | None, gold: str) -> bool:
        if answer is None:
            return False
        if answer == gold:
            return True
        if _is_number(answer) and _is_number(gold):
            return False  # both normalised numbers (server.voting): equal keys or different values
        pair = (gold, answer)
        if pair not in self._cache:
            self._cache[pair] = self._check(gold, answer)
        return self._cache[pair]

    def _check(self, gold: str, answer: str) -> bool:
        if self._pool is None:
            self._pool = multiprocessing.get_context("spawn").Pool(1)
        try:
            return self._pool.apply_async(_verify, (gold, answer)).get(self.timeout)
        except multiprocessing.TimeoutError:
            self.timeouts += 1
            self.close()  # the worker may be stuck in sympy: replace it
            return False

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
