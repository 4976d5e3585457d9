"""The answerable / open-ended gate (estimator/gate.py, estimator/offline/training/gate_fit.py)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest

from estimator.gate import Gate, gate_path
from estimator.offline.inputs.open_ended import KINDS, open_ended_prompts
from estimator.offline.training.gate_fit import FAR_FROM, FAR_SCALE, fit_gate


def states(rng, count: int, shift: float, layers: int = 3, d: int = 8) -> np.ndarray:
    x = rng.normal(size=(count, layers, d)).astype(np.float32)
    x[:, 1, :2] += shift  # only layer 1 tells the two apart
    return x


def fitted_gate(rng) -> Gate:
    """A gate on toy states: questions at shift 0, open-ended prompts at shift 4."""
    return fit_gate(
        states(rng, 200, 0.0),
        states(rng, 200, 4.0),
        states(rng, 50, 0.0),
        states(rng, 50, 4.0),
        layers=[0, 1, 2],
    )


def test_the_gate_learns_which_prompts_are_open_ended_and_flags_unfamiliar_ones(tmp_path):
    rng = np.random.default_rng(0)
    gate = fitted_gate(rng)
    assert gate.layer == 1 and gate.fitted["validation"]["accuracy"] > 0.9
    assert gate.route(states(rng, 1, 4.0)[0]) == "open_ended"
    assert gate.route(states(rng, 1, 0.0)[0]) == "answerable"
    far = states(rng, 1, 0.0)[0]
    far[1, 2:] += 25.0  # far from every training question, in directions the probe ignores
    assert gate.route(far) == "unfamiliar"
    gate.save(tmp_path / "head")
    assert gate_path(tmp_path / "head.json") == tmp_path / "head.gate.json"
    loaded = Gate.load(tmp_path / "head")
    assert loaded.route(states(rng, 1, 4.0)[0]) == "open_ended" and loaded.layer == 1
    assert Gate.load(tmp_path / "other") is None


def test_the_open_ended_prompts_are_deterministic_split_and_of_every_kind():
    prompts = open_ended_prompts()
    assert prompts == open_ended_prompts() and len({p.id for p in prompts}) == len(prompts) == 400
    assert {p.kind for p in prompts} == set(KINDS)
    splits = {s: [p for p in prompts if p.split == s] for s in ("train", "validation", "test")}
    assert all(len(v) > 20 for v in splits.values())
    assert not {p.question for p in splits["train"]} & {p.question for p in splits["test"]}
    assert [p.kind for p in open_ended_prompts(5)] == list(KINDS)  # interleaved


def test_the_margin_rises_only_for_questions_far_from_the_training_ones():
    rng = np.random.default_rng(1)
    gate = fitted_gate(rng)
    assert (gate.far_from, gate.far_scale) == (FAR_FROM, FAR_SCALE) and FAR_SCALE > 1

    def at(fraction: float) -> np.ndarray:
        """A state whose z-distance is `fraction` of the radius."""
        x = np.array(gate.mean, dtype=np.float32) + fraction * gate.radius * np.array(
            gate.std, dtype=np.float32
        )
        out = np.zeros((3, len(x)), dtype=np.float32)
        out[1] = x
        return out

    scales = [float(gate.margin_scale(at(f))[0]) for f in (0.0, FAR_FROM, (FAR_FROM + 1) / 2, 1.0, 3.0)]
    assert scales[:2] == pytest.approx([1.0, 1.0])
    assert scales[2] == pytest.approx((1 + FAR_SCALE) / 2, rel=1e-4)
    assert scales[3:] == pytest.approx([FAR_SCALE, FAR_SCALE], rel=1e-4)
    batch = gate.margin_scale(np.stack([at(0.0), at(1.0)]))
    assert batch.shape == (2,) and batch[1] > batch[0]
    # A gate saved before the ramp existed loads without it.
    old = Gate(**{k: v for k, v in asdict(gate).items() if k not in ("far_from", "far_scale")})
    assert float(old.margin_scale(at(1.0))[0]) == 1.0
