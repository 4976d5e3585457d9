"""`t2serve train`: the head's own T2 margin, chosen on its validation split.

The server's `auto` gives a question N = clamp(round(N_max * prediction * margin * scale), 1,
N_max) (estimator.policies.choose_parallelism; `scale` is the gate's multiple, 1 near the
training questions). A global margin suits one head and not the next: a head that predicts
N* well needs less of it. So each head carries the smallest margin on a grid whose exact
validation accuracy (mean A_x(N_x), no sampling noise) is within `tolerance` of fixed
N_max's on the same questions; where none is, the largest margin of the grid (the closest
to fixed N_max). `--estimator-margin` overrides it; a head without one gets 1.5. On a
validation split of fewer than head_fit.MARGIN_QUESTIONS questions `train` passes the train
questions' cross-fitted predictions too.
"""

from __future__ import annotations

import numpy as np

from estimator.policies import choose_parallelism

MARGIN_GRID = tuple(float(m) for m in np.arange(1.0, 3.0001, 0.125))
TOLERANCE = 0.005  # half a point: the built-in test split's no-regression line


def t2_parallelism(
    predictions: np.ndarray, n_max: int, margin: float, scales: np.ndarray | None = None
) -> np.ndarray:
    """N per question as the server's T2 gives it at this margin (times each question's gate
    multiple in `scales`), capped at N_max as the labels' pools are."""
    scales = np.ones(len(predictions)) if scales is None else scales
    return np.array(
        [
            choose_parallelism(float(p), n_max=n_max, default=n_max, cap=n_max, margin=margin * float(k))
            for p, k in zip(predictions, scales, strict=True)
        ]
    )


def fit_margin(
    accuracy: np.ndarray,
    predictions: np.ndarray,
    *,
    scales: np.ndarray | None = None,
    tolerance: float = TOLERANCE,
    grid: tuple[float, ...] = MARGIN_GRID,
) -> dict:
    """The margin for a head, from its validation questions' accuracy curves A_x(1..N_max)
    [B, N_max] and its predictions [B] (N*/N_max). Returns the margin and what it was chosen on."""
    accuracy = np.asarray(accuracy, dtype=np.float64)
    n_questions, n_max = accuracy.shape
    rows = np.arange(n_questions)
    fixed = float(accuracy[:, -1].mean())
    curve = []
    for margin in grid:
        n = t2_parallelism(predictions, n_max, margin, scales)
        curve.append(
            {"margin": margin, "accuracy": float(accuracy[rows, n - 1].mean()), "samples": float(n.mean())}
        )
    within = [point for point in curve if point["accuracy"] >= fixed - tolerance]
    chosen = within[0] if within else curve[-1]
    return {
        "margin": chosen["margin"],
        "tolerance": tolerance,
        "questions": n_questions,
        "fixed_accuracy": fixed,
        "accuracy": chosen["accuracy"],
        "samples": chosen["samples"],
        "met": bool(within),
        "curve": curve,
    }


MULTIPLES = (1.0, 1.5, 2.0)  # how `t2serve evaluate` reports a head against the fixed-N curve


def at_margin_multiples(
    accuracy: np.ndarray, predictions: np.ndarray, margin: float, multiples: tuple[float, ...] = MULTIPLES
) -> list[dict]:
    """T2 at `margin` times each multiple on questions' curves A_x(1..N_max) [B, N_max]: exact
    accuracy and mean samples, and the accuracy above the fixed-N curve at the same mean
    samples: the best fixed N of at most that many (the running maximum of mean A(N) over the
    questions, linearly interpolated), so a curve that falls past its peak is not beaten for free."""
    accuracy = np.asarray(accuracy, dtype=np.float64)
    n_questions, n_max = accuracy.shape
    fixed = np.maximum.accumulate(accuracy.mean(axis=0))
    rows = []
    for multiple in multiples:
        n = t2_parallelism(predictions, n_max, margin * multiple)
        value = float(accuracy[np.arange(n_questions), n - 1].mean())
        samples = float(n.mean())
        curve = float(np.interp(samples, np.arange(1, n_max + 1), fixed))
        rows.append(
            {
                "multiple": multiple,
                "margin": margin * multiple,
                "accuracy": value,
                "samples": samples,
                "above_fixed_curve": value - curve,
            }
        )
    return rows
