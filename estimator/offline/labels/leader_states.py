"""How likely a pool's leader is right, read from the pool and from the question's states:
the part of the answer posterior (answer_posterior.py) that looks past the pool's shape.

From the pool alone a split vote with a right leader and one with a wrong leader look alike,
and that is where a gold N* gets its value (gold_free.py). The captured states tell them
apart better: on built-in generator labels, calibrated on 80 gold pools of another draw,
p(leader right) ranked right leaders above wrong ones with AUC 0.81 and 0.88 on two folders,
the pool features alone 0.75 and 0.83 (benchmarks/gold_free_heads.py, docs/estimator.md
"Train from traffic").

But states are specific to their source: that is why a head trained on one source sits on
the fixed-N curve on another (issue 29's measurements). So the states part is fitted only
on gold pools of the traffic's own source (a `t2serve label --server` sample of it), its
layer chosen by cross-validated log loss, and kept only where it beats the pool features
alone there by more than two standard errors.

    p(leader right) = sigmoid(w . z + b),  z = standardised [leader's pool features,
                                                             PCA_k((state[layer] - mu) / sd)]
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

COMPONENTS = 8  # principal components of the states: a few hundred gold pools fit ~14 weights
FOLDS = 5
L2 = 0.1  # ridge on the standardised weights


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def fit_logistic(x: np.ndarray, y: np.ndarray, *, l2: float, iterations: int = 50) -> np.ndarray:
    """Ridge logistic regression by Newton's method on standardised features x [M, F]:
    weights then bias [F + 1] (the bias is not shrunk)."""
    z = np.hstack([x, np.ones((len(x), 1))])
    theta = np.zeros(z.shape[1])
    ridge = l2 * np.eye(z.shape[1])
    ridge[-1, -1] = 0.0
    for _ in range(iterations):
        p = sigmoid(z @ theta)
        gradient = z.T @ (p - y) / len(y) + ridge @ theta
        hessian = (z * (p * (1 - p))[:, None]).T @ z / len(y) + ridge
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    return theta


def pool_losses(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    p = np.clip(p, 1e-9, 1 - 1e-9)
    return -(y * np.log(p) + (1 - y) * np.log(1 - p))


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    return float(pool_losses(p, y).mean())


def auc(p: np.ndarray, y: np.ndarray) -> float:
    """The probability a right leader is ranked above a wrong one (ties half)."""
    pos, neg = p[y == 1], p[y == 0]
    if not len(pos) or not len(neg):
        return float("nan")
    return float((pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean())


@dataclass
class LeaderStates:
    """The fitted states part: one layer, its standardisation and principal directions, and the
    logistic weights over the standardised [pool features, components]."""

    layer: int
    num_layers: int
    hidden_size: int
    state_mean: list[float]
    state_scale: list[float]
    components: list[list[float]]  # [hidden, COMPONENTS]
    mean: list[float]
    scale: list[float]
    weights: list[float]
    bias: float

    def probability(self, pool_features: np.ndarray, state: np.ndarray) -> float:
        """p(leader right) from the leader's pool features [F] and the question's states [layers, hidden]."""
        if state.shape != (self.num_layers, self.hidden_size):
            raise ValueError(
                f"the calibration reads states of {self.num_layers} layers x {self.hidden_size}, "
                f"these are {state.shape[0]} x {state.shape[1]}"
            )
        row = _rows(pool_features[None], state[None, self.layer], self.projection)
        z = (row - np.array(self.mean)) / np.array(self.scale)
        return float(sigmoid(z @ np.array(self.weights) + self.bias)[0])

    @functools.cached_property
    def projection(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The standardisation and principal directions as arrays, converted once (a target
        computation asks for one probability per pool)."""
        return np.array(self.state_mean), np.array(self.state_scale), np.array(self.components)


def _projection(states: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Standardisation and the first COMPONENTS principal directions of one layer's states [M, hidden]."""
    mean, scale = states.mean(0), np.maximum(states.std(0), 1e-6)
    _, _, vt = np.linalg.svd((states - mean) / scale, full_matrices=False)
    return mean, scale, vt[:COMPONENTS].T


def _rows(features: np.ndarray, states: np.ndarray | None, projection: tuple | None) -> np.ndarray:
    """[pool features, components] (pool features alone without states)."""
    if projection is None or states is None:
        return features
    mean, scale, components = projection
    return np.hstack([features, ((states - mean) / scale) @ components])


def _fit_on(features: np.ndarray, states: np.ndarray | None, y: np.ndarray) -> tuple:
    projection = _projection(states) if states is not None else None
    x = _rows(features, states, projection)
    mean, scale = x.mean(0), np.maximum(x.std(0), 1e-6)
    return projection, mean, scale, fit_logistic((x - mean) / scale, y, l2=L2)


def _predict(fitted: tuple, features: np.ndarray, states: np.ndarray | None) -> np.ndarray:
    projection, mean, scale, theta = fitted
    x = (_rows(features, states, projection) - mean) / scale
    return sigmoid(x @ theta[:-1] + theta[-1])


def cross_validated(
    features: np.ndarray, states: np.ndarray | None, y: np.ndarray, seed: int = 0
) -> np.ndarray:
    """Out-of-fold p(leader right) for every pool (states None: pool features alone)."""
    folds = np.array_split(np.random.default_rng(seed).permutation(len(y)), FOLDS)
    out = np.zeros(len(y))
    for held in folds:
        rest = np.setdiff1d(np.arange(len(y)), held)
        fitted = _fit_on(features[rest], None if states is None else states[rest], y[rest])
        out[held] = _predict(fitted, features[held], None if states is None else states[held])
    return out


def fit_leader_states(
    features: np.ndarray, states: np.ndarray, y: np.ndarray, layers: Sequence[int] | None = None
) -> tuple[LeaderStates | None, dict]:
    """The states part fitted on gold pools: leaders' pool features [M, F], the questions'
    states [M, layers, hidden] and whether each leader is right [M]. The layer with the lowest
    cross-validated log loss; None where no layer beats the pool features alone, or where there
    are too few right or wrong leaders to cross-validate. Returns the part and the report."""
    if y.sum() < FOLDS or len(y) - y.sum() < FOLDS:
        why = f"too few gold pools: {int(y.sum())} right and {int(len(y) - y.sum())} wrong leaders, {FOLDS} of each needed"
        return None, {"pools": len(y), "kept": False, "reason": why}
    base = cross_validated(features, None, y)
    report: dict = {
        "pools": len(y),
        "pool_only": {"log_loss": log_loss(base, y), "auc": auc(base, y)},
        "layers": {},
    }
    for layer in range(states.shape[1]) if layers is None else layers:
        p = cross_validated(features, states[:, layer], y)
        report["layers"][layer] = {"log_loss": log_loss(p, y), "auc": auc(p, y)}
    best = min(report["layers"], key=lambda k: report["layers"][k]["log_loss"])
    report["layer"] = best
    report["with_states"] = report["layers"][best]
    # Kept only where its gain is clear of noise: the best of 30 layers beats the pool features
    # by chance on a few hundred pools, so the paired per-pool gain must exceed two standard errors.
    gain = pool_losses(base, y) - pool_losses(cross_validated(features, states[:, best], y), y)
    report["gain"] = {"log_loss": float(gain.mean()), "standard_error": float(gain.std() / np.sqrt(len(y)))}
    report["kept"] = bool(gain.mean() > 2 * report["gain"]["standard_error"])
    if not report["kept"]:
        return None, report
    (mean_s, scale_s, components), mean, scale, theta = _fit_on(features, states[:, best], y)
    part = LeaderStates(
        layer=int(best),
        num_layers=int(states.shape[1]),
        hidden_size=int(states.shape[2]),
        state_mean=[float(v) for v in mean_s],
        state_scale=[float(v) for v in scale_s],
        components=[[float(v) for v in row] for row in components],
        mean=[float(v) for v in mean],
        scale=[float(v) for v in scale],
        weights=[float(v) for v in theta[:-1]],
        bias=float(theta[-1]),
    )
    return part, report
