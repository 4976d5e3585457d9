"""How likely each distinct answer of a pool is right, from the pool alone: a small logistic
regression on pool-only features, calibrated on gold-labelled pools and applied to traffic,
which has no gold (estimator.offline.labels.gold_free's "posterior" targets).

For a distinct answer a of a pool of N_max vote keys (c_a samples name it; abstentions
name none), the features are

    share      c_a / N_max
    log_share  log(c_a / N_max)
    leader     1 when no other answer has more votes
    lead       (c_a - the largest other count) / N_max  (negative below the leader)
    distinct   distinct answers / N_max
    abstain    abstentions / N_max

standardised by the fit's means and scales. p(a) = sigmoid(w . z + b), fitted per answer on
whether a is one of the pool's correct keys (estimator.offline.labels.targets.gold_of).
Where a pool's p(a) sum above 1 they are scaled to sum to 1 (an answer is right or another
is); the mass left over is "no answer of the pool is right".

Saved as a small JSON file (`t2serve train --fit-calibration FILE`), read by
`t2serve train --targets posterior --calibration FILE`.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from estimator.offline.labels.targets import gold_of

FEATURES = ("share", "log_share", "leader", "lead", "distinct", "abstain")
L2 = 1e-2  # ridge on the standardised weights: a few hundred pools fit six weights stably
KIND = "t2serve-answer-posterior"


def answer_features(answers: Sequence[str | None]) -> tuple[list[str], np.ndarray]:
    """The pool's distinct answers (first seen first) and their features [K, len(FEATURES)]."""
    n_max = len(answers)
    counts = Counter(a for a in answers if a is not None)
    keys = list(counts)
    abstain = sum(a is None for a in answers) / n_max
    rows = []
    for key in keys:
        others = max((c for k, c in counts.items() if k != key), default=0)
        share = counts[key] / n_max
        lead = (counts[key] - others) / n_max
        rows.append([share, np.log(share), float(counts[key] >= others), lead, len(keys) / n_max, abstain])
    return keys, np.array(rows, dtype=np.float64).reshape(len(keys), len(FEATURES))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


@dataclass
class AnswerPosterior:
    """The fitted calibration: weights over the standardised FEATURES, and what it was fitted on."""

    weights: list[float]
    bias: float
    mean: list[float]
    scale: list[float]
    n_max: int
    features: list[str] = field(default_factory=lambda: list(FEATURES))
    fitted: dict = field(default_factory=dict)

    def probabilities(self, answers: Sequence[str | None]) -> dict[str, float]:
        """p(a) for each distinct answer of the pool (summing to at most 1)."""
        if len(answers) != self.n_max:
            raise ValueError(f"the calibration is for pools of {self.n_max}, this one has {len(answers)}")
        keys, x = answer_features(answers)
        if not keys:
            return {}
        z = (x - np.array(self.mean)) / np.array(self.scale)
        p = _sigmoid(z @ np.array(self.weights) + self.bias)
        p = p / max(1.0, float(p.sum()))
        return dict(zip(keys, (float(v) for v in p), strict=True))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kind": KIND, **asdict(self)}, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> AnswerPosterior:
        body = json.loads(Path(path).read_text())
        if body.pop("kind", None) != KIND or body.get("features") != list(FEATURES):
            raise ValueError(f"{path} is not an answer calibration of these features ({', '.join(FEATURES)})")
        return cls(**body)


def calibration_rows(records: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Features [M, F], right [M] (0/1) and pool index [M] of every distinct answer of the
    gold-labelled `records`."""
    xs, ys, pools = [], [], []
    for i, record in enumerate(records):
        keys, x = answer_features(record["answers"])
        right = gold_of(record)
        xs.append(x)
        ys += [float(k in right) for k in keys]
        pools += [i] * len(keys)
    return np.concatenate(xs), np.array(ys), np.array(pools, dtype=np.int64)


def fit_posterior(records: Sequence[dict], *, l2: float = L2, iterations: int = 50) -> AnswerPosterior:
    """Fit the logistic regression by Newton's method on the gold-labelled `records` (pools
    of one N_max); `fitted` reports what it saw and how well it fits there."""
    sizes = {len(r["answers"]) for r in records}
    if len(sizes) != 1:
        raise ValueError(f"calibration pools of several N_max ({sorted(sizes)})")
    x, y, pools = calibration_rows(records)
    if not 0 < y.sum() < len(y):
        raise ValueError("the calibration needs pools with right and with wrong answers")
    mean, scale = x.mean(0), np.maximum(x.std(0), 1e-6)
    z = np.hstack([(x - mean) / scale, np.ones((len(x), 1))])
    theta = np.zeros(z.shape[1])
    ridge = l2 * np.diag([1.0] * len(FEATURES) + [0.0])  # the bias is not shrunk
    for _ in range(iterations):
        p = _sigmoid(z @ theta)
        gradient = z.T @ (p - y) / len(y) + ridge @ theta
        hessian = (z * (p * (1 - p))[:, None]).T @ z / len(y) + ridge
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-10:
            break
    posterior = AnswerPosterior(
        weights=[float(w) for w in theta[:-1]],
        bias=float(theta[-1]),
        mean=[float(m) for m in mean],
        scale=[float(s) for s in scale],
        n_max=sizes.pop(),
    )
    posterior.fitted = calibration_report(posterior, records)
    return posterior


def calibration_report(posterior: AnswerPosterior, records: Sequence[dict]) -> dict:
    """How the calibration does on `records` (gold-labelled): per answer log loss and Brier
    score, and per pool the majority's predicted vs actual rate of being right."""
    p, y, majority_p, majority_y = [], [], [], []
    for record in records:
        probabilities = posterior.probabilities(record["answers"])
        right = gold_of(record)
        p += list(probabilities.values())
        y += [float(k in right) for k in probabilities]
        if probabilities:
            top = max(probabilities, key=probabilities.__getitem__)
            majority_p.append(probabilities[top])
            majority_y.append(float(top in right))
    pa, ya = np.clip(np.array(p), 1e-9, 1 - 1e-9), np.array(y)
    return {
        "pools": len(records),
        "answers": len(y),
        "right_share": float(ya.mean()),
        "log_loss": float(-(ya * np.log(pa) + (1 - ya) * np.log(1 - pa)).mean()),
        "brier": float(((pa - ya) ** 2).mean()),
        "top_answer_predicted": float(np.mean(majority_p)),
        "top_answer_right": float(np.mean(majority_y)),
    }
