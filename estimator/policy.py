"""Turning an estimator's prediction into a number of samples."""

from __future__ import annotations

import math


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


# Load below this share of the samples limit leaves the cap alone (see load_scaled_cap).
LOAD_KNEE = 0.5


def load_scaled_cap(cap: int, samples_in_flight: int, limit: int, *, choices: int = 1) -> int:
    """The per-choice cap on N once the server's load is taken into account.

    `samples_in_flight` are the samples other requests have in the engine, `limit` the
    server's --max-samples-in-flight, `choices` the samples per N (n choices x prompts).
    With load u = samples_in_flight / limit the cap is scaled by

        1                          for u <= 0.5
        (1 - u) / (1 - 0.5)        for 0.5 < u < 1   (a linear ramp down to 0)
        0                          for u >= 1

    and bounded by the room left, (limit - samples_in_flight) // choices, so a request does
    not push the total past the limit; the result is never below 1 (every request gets a
    sample). Any policy that picks N (the T2 head, early stopping) applies the same curve.
    """
    if cap < 1 or limit < 1 or choices < 1:
        raise ValueError("cap, limit and choices must be >= 1")
    load = max(samples_in_flight, 0) / limit
    factor = 1.0 if load <= LOAD_KNEE else max(0.0, (1.0 - load) / (1.0 - LOAD_KNEE))
    room = (limit - samples_in_flight) // choices
    return max(1, min(math.floor(cap * factor), room))
