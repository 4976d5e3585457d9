"""The one module of the offline pipeline that reaches into the server (server/).

Labels must see what the server will see: prompts rendered by the server's chat template,
states captured by the server's tap, samples drawn by the server's own loop, and answers
read the way the server votes. So the offline side runs the server's code, here and only
here (tests/estimator/test_boundary.py checks it):

  started_engine   an engine as `t2serve serve` starts it
  EngineRuns       per prompt: its last-token states and N samples
  extract_answer, normalize_answer, majority_vote, consensus
                   the vote's answer reading (server.voting, server.consensus)
  model_identity   what labels record of the model (as the server's traffic records do)

Everything else in estimator/offline is data work on what these return.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from server import consensus
from server.recording import model_identity
from server.voting import extract_answer, majority_vote, normalize_answer

__all__ = [
    "EngineRuns",
    "PromptRun",
    "consensus",
    "extract_answer",
    "majority_vote",
    "model_identity",
    "normalize_answer",
    "started_engine",
]

# Prompts whose prefill may share one engine step: below the engine's capture slots
# (--capture-slots, 64), so every probe gets its states.
CONCURRENT_PROBES = 32


@asynccontextmanager
async def started_engine(settings: Any) -> AsyncIterator[Any]:
    """A started server.engine.engine.Engine (settings: server.config.EngineSettings), shut down on exit."""
    from server.engine.engine import Engine

    engine = await Engine.start(settings)
    try:
        yield engine
    finally:
        await engine.shutdown()


@dataclass
class PromptRun:
    samples: list[Any]  # server.samples.Sample, in launch order (sample i has seed + i)
    states: np.ndarray  # [L, d] float32: the prompt's last-token states


class EngineRuns:
    """Questions through a started engine, as user turns of the server's chat template."""

    def __init__(self, engine: Any, n: int = 1, aggregate: str = "answer"):
        from server.config import ParallelismSettings
        from server.parallel import ParallelThinker

        self.engine = engine
        self.thinker = ParallelThinker(
            engine, ParallelismSettings(default_parallelism=n, max_parallelism=n, aggregate=aggregate)
        )
        self.plan = self.thinker.plan(n, max_parallelism=n)  # fixed N: every sample, no stopping
        self._probes = asyncio.Semaphore(CONCURRENT_PROBES)

    def prompt(self, question: str) -> list[int]:
        from server.prompts import render_chat

        return render_chat(self.engine.tokenizer, [{"role": "user", "content": question}])

    async def states(self, question: str) -> np.ndarray:
        """The question's last-token states `[L, d]` (RuntimeError if none arrive)."""
        return await self._states(self.prompt(question), question)

    async def sample(self, question: str, *, temperature: float, max_tokens: int, seed: int) -> PromptRun:
        """The question's states, then its N samples (read from the prefix cache the probe
        filled); sample i runs with seed + i."""
        from server import sampling

        ids = self.prompt(question)
        states = await self._states(ids, question)
        params = sampling.offline(temperature=temperature, max_tokens=max_tokens, seed=seed)
        result = await self.thinker.run(ids, params, self.plan, request_id=f"offline-{uuid.uuid4().hex}")
        return PromptRun(result.choices[0].samples, states)

    async def _states(self, ids: list[int], question: str) -> np.ndarray:
        async with self._probes:
            states = await self.engine.prompt_states(ids)
        if states is None:
            raise RuntimeError(f"no hidden states captured for {question!r}")
        return states
