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

Fitted with the gold pools' states, it may carry a states part (leader_states.py): then the
leader's p comes from its pool features and the question's states, and the other answers'
p are scaled to share what is left, 1 - p(leader), no more than they had.

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

from estimator.offline.labels.leader_states import LeaderStates, fit_leader_states, fit_logistic, sigmoid
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


def leader_index(x: np.ndarray) -> int:
    """The pool's leader among answer_features rows: most votes, first seen on ties."""
    return int(np.argmax(x[:, FEATURES.index("share")]))


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
    leader_states: LeaderStates | None = None

    def probabilities(
        self, answers: Sequence[str | None], state: np.ndarray | None = None
    ) -> dict[str, float]:
        """p(a) for each distinct answer of the pool (summing to at most 1); `state`, the
        question's states [layers, hidden], is needed by a posterior with a states part."""
        if len(answers) != self.n_max:
            raise ValueError(f"the calibration is for pools of {self.n_max}, this one has {len(answers)}")
        if self.leader_states is not None and state is None:
            raise ValueError("this calibration reads the questions' states: pass them")
        keys, x = answer_features(answers)
        if not keys:
            return {}
        z = (x - np.array(self.mean)) / np.array(self.scale)
        p = sigmoid(z @ np.array(self.weights) + self.bias)
        p = p / max(1.0, float(p.sum()))
        if self.leader_states is not None and state is not None:
            lead = leader_index(x)
            p_lead = self.leader_states.probability(x[lead], np.asarray(state, dtype=np.float64))
            others = float(p.sum() - p[lead])
            p = p * (min(1.0, (1.0 - p_lead) / others) if others > 0 else 0.0)
            p[lead] = p_lead
        return dict(zip(keys, (float(v) for v in p), strict=True))

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"kind": KIND, **asdict(self)}, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> AnswerPosterior:
        body = json.loads(Path(path).read_text())
        if body.pop("kind", None) != KIND or body.get("features") != list(FEATURES):
            raise ValueError(f"{path} is not an answer calibration of these features ({', '.join(FEATURES)})")
        part = body.pop("leader_states", None)
        return cls(**body, leader_states=LeaderStates(**part) if part is not None else None)


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


def fit_posterior(
    records: Sequence[dict], *, states: np.ndarray | None = None, l2: float = L2
) -> AnswerPosterior:
    """Fit the logistic regression by Newton's method on the gold-labelled `records` (pools
    of one N_max); given their `states` [records, layers, hidden], also the states part where
    it beats the pool features alone (leader_states.fit_leader_states). `fitted` reports what
    it saw and how well it fits there."""
    sizes = {len(r["answers"]) for r in records}
    if len(sizes) != 1:
        raise ValueError(f"calibration pools of several N_max ({sorted(sizes)})")
    x, y, pools = calibration_rows(records)
    if not 0 < y.sum() < len(y):
        raise ValueError("the calibration needs pools with right and with wrong answers")
    mean, scale = x.mean(0), np.maximum(x.std(0), 1e-6)
    theta = fit_logistic((x - mean) / scale, y, l2=l2)
    posterior = AnswerPosterior(
        weights=[float(w) for w in theta[:-1]],
        bias=float(theta[-1]),
        mean=[float(m) for m in mean],
        scale=[float(s) for s in scale],
        n_max=sizes.pop(),
    )
    states_report = None
    if states is not None:
        features, right, kept = leader_rows(records)
        posterior.leader_states, states_report = fit_leader_states(features, states[kept], right)
    posterior.fitted = calibration_report(posterior, records, states)
    if states_report is not None:
        posterior.fitted["states"] = states_report
    return posterior


def leader_rows(records: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each gold pool's leader: its features [M, F], whether it is right [M] (0/1), and the
    index of its record [M] (pools where every sample abstained have none)."""
    features, right, kept = [], [], []
    for i, record in enumerate(records):
        keys, x = answer_features(record["answers"])
        if keys:
            lead = leader_index(x)
            features.append(x[lead])
            right.append(float(keys[lead] in gold_of(record)))
            kept.append(i)
    return np.array(features).reshape(-1, len(FEATURES)), np.array(right), np.array(kept, dtype=np.int64)


def calibration_report(
    posterior: AnswerPosterior, records: Sequence[dict], states: np.ndarray | None = None
) -> dict:
    """How the calibration does on `records` (gold-labelled; `states` for a posterior with a
    states part): per answer log loss and Brier score, and per pool the majority's predicted
    vs actual rate of being right."""
    p, y, majority_p, majority_y = [], [], [], []
    for i, record in enumerate(records):
        probabilities = posterior.probabilities(record["answers"], None if states is None else states[i])
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
