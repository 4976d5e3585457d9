"""A scripted stand-in for `server.engine.engine.Engine`, for the orchestration loop's pure logic.

Each sample's fate is scripted by its number (launch order within a run): it finishes with a
text as soon as it is scheduled, hangs until aborted, or fails. Nothing depends on the
clock: a hanging sample ends only when the loop aborts it. The double records every engine
request, so tests can check that nothing is left running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from server.engine.capture import CAPTURE_KEY
from server.engine.engine import EngineDead


@dataclass(frozen=True)
class Finish:
    text: str
    tokens: int = 3


@dataclass(frozen=True)
class Hang:
    tokens_before_abort: int = 7


@dataclass(frozen=True)
class Fail:
    message: str = "engine failed"


Fate = Finish | Hang | Fail


@dataclass
class _Request:
    request_id: str
    params: Any
    first: int  # number of its first sample
    aborted: asyncio.Event = field(default_factory=asyncio.Event)
    ended: bool = False


class ScriptedEngine:
    def __init__(
        self, script: Callable[[int], Fate], *, states: bool = True, layers: int = 3, hidden: int = 4
    ):
        self.script = script
        self.states = states  # whether tagged requests get their states pushed
        self.settings = SimpleNamespace(capture_timeout_s=30.0, capture=True)
        self.default_sampling: dict = {}  # the model's generation_config defaults: none
        self.tokenizer = None  # the servers built on it run no output parsers
        self.requests: dict[str, _Request] = {}
        self.aborted_ids: list[str] = []
        self._captures: dict[str, asyncio.Future[np.ndarray]] = {}
        self._shape = (layers, hidden)

    # -- the Engine interface the loop uses ------------------------------------------------

    def expect_capture(self, tag: str) -> asyncio.Future[np.ndarray]:
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._captures[tag] = future
        return future

    def forget_capture(self, tag: str) -> None:
        future = self._captures.pop(tag, None)
        if future is not None and not future.done():
            future.cancel()

    async def generate(self, prompt_token_ids: list[int], params: Any, request_id: str) -> AsyncIterator[Any]:
        first = int(request_id.rsplit("-s", 1)[1])
        request = _Request(request_id, params, first)
        self.requests[request_id] = request
        tag = (params.extra_args or {}).get(CAPTURE_KEY)
        if tag is not None and self.states and tag in self._captures and not self._captures[tag].done():
            self._captures[tag].set_result(np.full(self._shape, float(len(prompt_token_ids)), np.float32))
        fates = [self.script(first + i) for i in range(params.n)]
        try:
            for fate in fates:
                if isinstance(fate, Fail):
                    raise EngineDead(fate.message)
            if any(isinstance(f, Hang) for f in fates):
                await request.aborted.wait()
            else:
                await asyncio.sleep(0)  # finishing takes one turn of the loop, like a real step
            outputs = [self._output(i, fate, request.aborted.is_set()) for i, fate in enumerate(fates)]
            yield SimpleNamespace(outputs=outputs, num_cached_tokens=len(prompt_token_ids) // 2)
        finally:
            request.ended = True

    async def abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.aborted_ids.append(request_id)
            if request_id in self.requests:
                self.requests[request_id].aborted.set()

    def generated_tokens(self, request_ids: list[str]) -> int:
        """A running request has decoded what a hanging sample has when it is aborted."""
        total = 0
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.ended:
                continue
            first, n = request.first, request.params.n
            total += sum(
                fate.tokens_before_abort
                for fate in (self.script(first + i) for i in range(n))
                if isinstance(fate, Hang)
            )
        return total

    # -- what tests read --------------------------------------------------------------------

    def running(self) -> list[str]:
        return [r.request_id for r in self.requests.values() if not r.ended]

    def sample_count(self) -> int:
        return sum(r.params.n for r in self.requests.values())

    @staticmethod
    def _output(index: int, fate: Fate, aborted: bool) -> Any:
        if isinstance(fate, Finish):
            return SimpleNamespace(
                index=index, text=fate.text, token_ids=[1] * fate.tokens, finish_reason="stop",
                cumulative_logprob=-1.0, logprobs=None,
            )  # fmt: skip
        assert isinstance(fate, Hang) and aborted
        return SimpleNamespace(
            index=index, text="partial", token_ids=[1] * fate.tokens_before_abort, finish_reason="abort",
            cumulative_logprob=None, logprobs=None,
        )  # fmt: skip
