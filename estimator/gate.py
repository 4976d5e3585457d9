"""The answerable / open-ended gate, stored with a head as `<head>.gate.json`.

One layer of the captured states decides, before any sample is drawn:
  open_ended   a logistic probe (fitted by `t2serve train --open-ended`) on the z-scored
               state says the prompt is unlike any answerable question: no votable answer,
               so N should not be spent (the server samples --open-ended-parallelism)
  unfamiliar   not open-ended, but the state lies farther from the head's training
               questions than `radius` (per-dimension z-distance, the 99th percentile of
               the training questions' own): the head's guess is not trusted, the server
               uses its safe default N
  answerable   otherwise: the head's N, its margin raised by `margin_scale` as the state
               nears the radius: from `far_from` x radius (x1) to the radius (x `far_scale`);
               a head's guesses are worse for questions less like its training ones, and
               familiar questions keep the margin chosen for them (README, leave-one-out)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np

Route = Literal["answerable", "open_ended", "unfamiliar"]


@dataclass
class Gate:
    layer: int
    mean: list[float]  # the head's training questions' state at `layer`, per dimension
    std: list[float]
    weights: list[float]  # logistic probe on (x - mean) / std: P(open-ended)
    bias: float
    radius: float  # z-distance beyond which a question is unfamiliar
    threshold: float = 0.5
    far_from: float = 1.0  # fraction of `radius` where the margin starts to rise (1: never)
    far_scale: float = 1.0  # the margin's multiple at the radius
    fitted: dict | None = None  # what it was fitted on, and its held-out scores

    def __post_init__(self) -> None:
        self._mean = np.asarray(self.mean, dtype=np.float32)
        self._std = np.asarray(self.std, dtype=np.float32)
        self._weights = np.asarray(self.weights, dtype=np.float32)

    def z(self, states: np.ndarray) -> np.ndarray:
        """[B, d] z-scores of states [B, L, d] (or one request's [L, d])."""
        x = np.asarray(states, dtype=np.float32)
        x = x[None] if x.ndim == 2 else x
        return (x[:, self.layer] - self._mean) / self._std

    def open_ended_probability(self, states: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-(self.z(states) @ self._weights + self.bias)))

    def distance(self, states: np.ndarray) -> np.ndarray:
        z = self.z(states)
        return np.sqrt((z**2).mean(axis=1))

    def margin_scale(self, states: np.ndarray) -> np.ndarray:
        """[B] multiples of the T2 margin for states [B, L, d] (or one request's [L, d])."""
        if self.far_from >= 1 or self.far_scale == 1:
            return np.ones(len(self.z(states)), dtype=np.float32)
        rise = np.clip((self.distance(states) / self.radius - self.far_from) / (1 - self.far_from), 0, 1)
        return 1 + (self.far_scale - 1) * rise

    def route(self, states: np.ndarray) -> Route:
        """Where one request's [L, d] states send it."""
        if float(self.open_ended_probability(states)[0]) >= self.threshold:
            return "open_ended"
        return "unfamiliar" if float(self.distance(states)[0]) > self.radius else "answerable"

    def save(self, head_path: str | Path) -> None:
        gate_path(head_path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, head_path: str | Path) -> Gate | None:
        path = gate_path(head_path)
        return cls(**json.loads(path.read_text())) if path.is_file() else None


def route_shares(routes: list[Route]) -> dict[str, float]:
    """How often each route was taken, over a set of questions."""
    return {route: routes.count(route) / len(routes) for route in sorted(set(routes))}


def gate_path(head_path: str | Path) -> Path:
    path = Path(head_path)
    path = path.with_suffix("") if path.suffix in {".json", ".safetensors"} else path
    return path.with_name(path.name + ".gate.json")
