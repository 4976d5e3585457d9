"""Built-in open-ended prompts (no answer to vote on) for the answerable/open-ended gate.

Deterministic: templates x subjects of five kinds (prose, lists, translation, code,
dialogue), split train/validation/test by the same stable hash as the math problems
(estimator.offline.inputs.problems.split_of), so the gate is fitted on one part and tested on
another. `capture_states` reads their last-token states from the served model the way the
labels' states were read (the server's chat rendering, one greedy token).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import random
from dataclasses import asdict, dataclass

import numpy as np

from estimator.offline.inputs.problems import split_of

SUBJECTS = (
    "autumn leaves", "the ocean at night", "a busy train station", "learning to ride a bike",
    "a rainy Monday", "an old lighthouse", "coffee", "city lights", "a mountain hike", "friendship",
    "the first snow", "a lost umbrella", "a quiet library", "summer markets", "a small garden",
    "moving to a new town", "the moon", "a thunderstorm", "a street musician", "an empty beach",
)  # fmt: skip
TEMPLATES = {
    "prose": (
        "Write a haiku about {s}.",
        "Write a short poem about {s}.",
        "Describe {s} in a few vivid sentences.",
        "Write the opening paragraph of a story about {s}.",
    ),
    "list": (
        "Give me three tips for enjoying {s}.",
        "List some ideas for a weekend themed around {s}.",
        "What are a few reasons people love {s}?",
        "Suggest five names for a cafe inspired by {s}.",
    ),
    "translation": (
        "Translate into French: 'I will never forget {s}.'",
        "Translate into Spanish: 'We talked about {s} all evening.'",
        "How do you say '{s}' in German?",
        "Translate into Italian: 'My sister wrote a song about {s}.'",
    ),
    "code": (
        "Write a Python function that reverses a string. Name it after {s}.",
        "Write a Python class that stores notes about {s}.",
        "Write a JavaScript function that counts the words in a sentence about {s}.",
        "Write a SQL query that lists all rows of a table named after {s}.",
    ),
    "dialogue": (
        "Write a short dialogue between two friends about {s}.",
        "Role-play a tour guide welcoming visitors to {s}.",
        "Write a conversation between a child and a grandparent about {s}.",
        "Write an interview question and answer about {s}.",
    ),
}
KINDS = tuple(TEMPLATES)


@dataclass(frozen=True)
class OpenEndedPrompt:
    id: str
    question: str
    kind: str
    split: str

    def to_json(self) -> dict:
        return asdict(self)


def open_ended_prompts(count: int | None = None, seed: int = 0) -> list[OpenEndedPrompt]:
    """`count` prompts (default: all 400), kinds interleaved, in a seeded order."""
    rng = random.Random(seed)
    by_kind = []
    for kind, templates in TEMPLATES.items():
        prompts = [t.format(s=s) for t, s in itertools.product(templates, SUBJECTS)]
        rng.shuffle(prompts)
        by_kind.append([(kind, p) for p in prompts])
    interleaved = [item for group in zip(*by_kind, strict=True) for item in group]
    return [
        OpenEndedPrompt(f"{kind}-{hashlib.sha256(q.encode()).hexdigest()[:12]}", q, kind, split_of(q))
        for kind, q in interleaved[:count]
    ]


async def capture_states(engine, questions: list[str]) -> np.ndarray:
    """Last-token states [Q, L, d] of each question's prompt, as the server renders it."""
    from estimator.offline.engine_runs import EngineRuns

    runs = EngineRuns(engine)
    return np.stack(await asyncio.gather(*(runs.states(q) for q in questions)))


STATES_FILE = "open_ended.npz"
PROMPTS_FILE = "open_ended.json"


def save_states(out, prompts: list[OpenEndedPrompt], states: np.ndarray, model: dict) -> None:
    import json
    from pathlib import Path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / STATES_FILE, states=states.astype(np.float16), ids=np.array([p.id for p in prompts]))
    (out / PROMPTS_FILE).write_text(json.dumps({"model": model, "prompts": [p.to_json() for p in prompts]}))


def load_states(out) -> tuple[list[dict], np.ndarray, dict]:
    """(prompts, states [P, L, d] float32, model) written by save_states."""
    import json
    from pathlib import Path

    out = Path(out)
    header = json.loads((out / PROMPTS_FILE).read_text())
    with np.load(out / STATES_FILE) as data:
        states = data["states"].astype(np.float32)
        if list(data["ids"]) != [p["id"] for p in header["prompts"]]:
            raise ValueError(f"{out}: states and prompts do not match")
    return header["prompts"], states, header["model"]
