"""Turning an estimator's prediction into a number of samples."""

from __future__ import annotations


def choose_parallelism(
    prediction: float | None,
    *,
    n_max: int,
    default: int,
    cap: int,
    margin: float = 1.0,
) -> int:
    """Samples per choice for one request.

    `prediction` is the estimator's N*/N_max in [0, 1] (None when no estimator ran); the
    result is clamp(round(N_max * prediction * margin), 1, cap), or the configured default
    when there is no prediction.
    """
    if cap < 1:
        raise ValueError("cap must be >= 1")
    if prediction is None:
        return max(1, min(default, cap))
    return max(1, min(round(n_max * prediction * margin), cap))
