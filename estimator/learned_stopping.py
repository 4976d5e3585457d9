"""Learned stopping: is one more sample worth its cost, given the head's estimate and the
votes so far? The served side: a table shipped beside the head, read by `t2+learned`.

The state of a vote after k finished samples is s = (k, v1, v2): the leader's and the
runner-up's counts (abstentions count in k, not in the votes). The table is tabulated on a
grid of head estimates e = N_max * prediction; at each grid point it holds, per state, how
often the vote there names the gold answer, C(s), and where the next sample leads,
P(s' | s) (kernel-weighted visit and transition counts). For a cost lambda (accuracy one
sample must buy), backward induction from k = N_max gives the stopping rule

    V(s) = max( C(s),  -lambda + sum_s' P(s' | s) V(s') ),   stop where C(s) is the larger.

A request uses the grid point nearest its estimate; rules are solved once per cost and
cached. Why this beats a fixed confidence threshold: the vote alone cannot tell a question
whose answers never settle because it is hopeless (stop: more samples buy nothing) from one
that needs more samples to settle (go on). The head's estimate can, and the table learns
how much each kind of question gains from continuing, from the pools themselves.

A state the table never saw (e.g. k > N_max under a larger cap) counts as "stop".
Saved as `<head>.stopping.safetensors` (float32 tensors + metadata). Fitting it on labelled
pools is offline work (`t2serve train`): estimator.offline.training.stopping_fit. This module is
online: it imports nothing from estimator.offline or server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

State = tuple[int, int, int]  # (finished samples, leader's votes, runner-up's votes)
SUFFIX = ".stopping.safetensors"


@dataclass
class StoppingTable:
    n_max: int
    bandwidth: float  # kernel width, in samples of the head's estimate N_max * prediction
    grid: np.ndarray  # [G] estimates the table is tabulated at
    states: list[State]
    visits: np.ndarray  # [G, S] kernel-weighted visits of each state
    correct: np.ndarray  # [G, S] ... of which the vote named the gold answer
    edges: np.ndarray  # [E, 2] (state, next state) index pairs
    moves: np.ndarray  # [G, E] kernel-weighted transitions along each edge
    info: dict[str, str] = field(default_factory=dict)
    _index: dict[State, int] = field(init=False, repr=False)
    _rules: dict[float, np.ndarray] = field(init=False, repr=False)
    _backward: list[tuple[int, list[int]]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._index = {s: i for i, s in enumerate(self.states)}
        self._rules = {}
        # Each state's outgoing edges, later states first: backward induction solves a state
        # after all its successors.
        by_source: dict[int, list[int]] = {}
        for e, (source, _) in enumerate(self.edges):
            by_source.setdefault(int(source), []).append(e)
        self._backward = sorted(by_source.items(), key=lambda item: -self.states[item[0]][0])

    def rule(self, cost: float) -> np.ndarray:
        """[G, S] bool: stop in that state at that estimate, for this cost per sample."""
        if cost not in self._rules:
            if len(self._rules) >= 64:  # costs come from requests: keep the cache bounded
                self._rules.clear()
            self._rules[cost] = self._solve(cost)
        return self._rules[cost]

    def _solve(self, cost: float) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = np.where(self.visits > 0, self.correct / self.visits, 0.0)
        value = accuracy.copy()
        stop = np.ones_like(self.visits, dtype=bool)
        for i, out in self._backward:
            weight = self.moves[:, out]  # [G, out]
            total = weight.sum(axis=1)
            with np.errstate(invalid="ignore", divide="ignore"):
                go_on = (weight * value[:, self.edges[out, 1]]).sum(axis=1) / total - cost
            go = (total > 0) & (self.visits[:, i] > 0) & (go_on > accuracy[:, i])
            value[:, i] = np.where(go, go_on, accuracy[:, i])
            stop[:, i] = ~go
        return stop

    def should_stop(self, estimate: float, state: State, cost: float) -> bool:
        """Stop a vote in `state` whose head estimate (N_max * prediction) is `estimate`?"""
        i = self._index.get(state)
        if i is None:
            return True
        g = int(np.argmin(np.abs(self.grid - estimate)))
        return bool(self.rule(cost)[g, i])

    def save(self, head_path: str | Path) -> None:
        from safetensors.numpy import save_file

        tensors = {
            "grid": self.grid.astype(np.float32),
            "states": np.asarray(self.states, dtype=np.int32),
            "visits": self.visits.astype(np.float32),
            "correct": self.correct.astype(np.float32),
            "edges": self.edges.astype(np.int32),
            "moves": self.moves.astype(np.float32),
        }
        meta = {**self.info, "n_max": str(self.n_max), "bandwidth": repr(self.bandwidth)}
        save_file(tensors, str(table_path(head_path)), metadata=meta)

    @classmethod
    def load(cls, head_path: str | Path) -> StoppingTable | None:
        """The table beside a head, or None when the head has none."""
        from safetensors import safe_open

        path = table_path(head_path)
        if not path.is_file():
            return None
        with safe_open(str(path), framework="numpy") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
            meta = dict(f.metadata() or {})
        n_max, bandwidth = int(meta.pop("n_max")), float(meta.pop("bandwidth"))
        return cls(
            n_max=n_max,
            bandwidth=bandwidth,
            grid=t["grid"].astype(np.float64),
            states=[(int(k), int(a), int(b)) for k, a, b in t["states"]],
            visits=t["visits"].astype(np.float64),
            correct=t["correct"].astype(np.float64),
            edges=t["edges"].astype(np.int64),
            moves=t["moves"].astype(np.float64),
            info=meta,
        )


def table_path(head_path: str | Path) -> Path:
    path = Path(head_path)
    path = path.with_suffix("") if path.suffix in {".json", ".safetensors"} else path
    return path.with_name(path.name + SUFFIX)
