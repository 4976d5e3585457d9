"""A request's samples in the engine: `SampleGroup` launches, collects, aborts and drains
them, and is the only code that moves the server's samples-in-flight count.

Why one owner: the load curve (server.admission.load_scaled_cap) reads the count on every
decision, so a sample counted in and never out would lower N for every later request. The
group counts each engine request in when it is sent and out when its task ends, however it
ends; leaving the `async with` block aborts in the engine whatever is still running and
settles the count, on success, error or cancellation alike.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server import metrics, sampling
from server.engine.engine import Engine
from server.voting import extract_answer

# After an abort the engine hands back each sample's final output at once; don't wait longer.
ABORT_GRACE_S = 5.0


@dataclass
class Sample:
    number: int  # launch order within the request (sample i runs with seed + i)
    choice: int  # the vote it belongs to
    text: str
    num_tokens: int
    finish_reason: str | None
    mean_logprob: float | None
    answer: str | None
    token_ids: tuple[int, ...] = ()
    logprobs: Any = None  # vLLM's per-token log-probs, when the request asked for them

    @property
    def finished(self) -> bool:
        """Whether it ran to its end (stop, length), rather than being aborted."""
        return self.finish_reason not in (None, "abort")


class InFlight:
    """The server's samples in the engine (all requests), mirrored in a gauge."""

    def __init__(self) -> None:
        self.value = 0

    def add(self, delta: int) -> None:
        self.value += delta
        metrics.SAMPLES_IN_FLIGHT.inc(delta)


@dataclass(frozen=True)
class _Launch:
    engine_id: str
    choice: int
    first: int  # number of its first sample
    n: int


async def _final_output(stream: Any) -> Any:
    final = None
    async for output in stream:
        final = output
    return final


class SampleGroup:
    """The samples of one prompt of one request. Use as `async with SampleGroup(...) as group`."""

    def __init__(
        self,
        engine: Engine,
        prompt_token_ids: list[int],
        base: Any,
        request_id: str,
        in_flight: InFlight,
        vote_key: Callable[[str], str | None] = extract_answer,
    ):
        self.engine = engine
        self.prompt_token_ids = prompt_token_ids
        self.base = base  # sampling.for_voting params
        self.request_id = request_id
        self.in_flight = in_flight
        self.vote_key = vote_key  # a sample's text -> what it votes with (server.aggregation)
        self.launched = 0
        self.launched_per_choice: dict[int, int] = {}
        self.cached_tokens = 0  # most prompt tokens an engine request read from the prefix cache
        self.collected_tokens = 0  # tokens of the samples collected so far (voted or not)
        self._running: dict[asyncio.Future[Any], _Launch] = {}
        self._aborted: set[str] = set()  # engine ids already aborted (each is aborted once)

    async def __aenter__(self) -> SampleGroup:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if not self._running:
            return
        ids = [launch.engine_id for launch in self._running.values() if launch.engine_id not in self._aborted]
        for task in list(self._running):
            task.cancel()
            self._settle(task)
        # Shielded: a cancelled request must still reach the engine's abort.
        if ids:
            await asyncio.shield(self.engine.abort(ids))

    # -- launching ------------------------------------------------------------------------

    def launch(
        self, choice: int, k: int, *, separately: bool = False, capture_tag: str | None = None
    ) -> None:
        """Start k more samples for `choice`: one n=k engine request, or (`separately`) k
        requests of one sample each, so each finishes on its own (adaptive policies)."""
        sizes = [1] * k if separately else [k] if k > 0 else []
        for n in sizes:
            first = self.launched
            params = sampling.for_launch(self.base, n=n, first=first, capture_tag=capture_tag)
            engine_id = f"{self.request_id}-s{first}"
            task = asyncio.ensure_future(
                _final_output(self.engine.generate(self.prompt_token_ids, params, engine_id))
            )
            self._running[task] = _Launch(engine_id, choice, first, n)
            self.launched += n
            self.launched_per_choice[choice] = self.launched_per_choice.get(choice, 0) + n
            self.in_flight.add(n)

    def launched_for(self, choice: int) -> int:
        return self.launched_per_choice.get(choice, 0)

    def tokens_generated(self) -> int:
        """Tokens generated so far: the collected samples' and the running ones' (read from
        the engine, server.budget)."""
        running = [launch.engine_id for launch in self._running.values()]
        return self.collected_tokens + (self.engine.generated_tokens(running) if running else 0)

    def running(self, choice: int | None = None) -> int:
        """Samples still in the engine (of one choice, or all)."""
        return sum(launch.n for launch in self._running.values() if choice in (None, launch.choice))

    # -- collecting ------------------------------------------------------------------------

    async def wait(self, *also: asyncio.Future[Any], timeout: float | None = None) -> bool:
        """Wait until an engine request ends, one of `also` is done, or `timeout` passes;
        whether an engine request has ended (its samples wait for `next_finished`)."""
        if self._running or also:
            await asyncio.wait([*self._running, *also], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        return any(task.done() for task in self._running)

    async def next_finished(self, *also: asyncio.Future[Any]) -> list[Sample]:
        """Wait until an engine request ends (or one of `also` is done); the samples of the
        requests that ended, in launch order. An engine error is raised here."""
        if not self._running:
            return []
        await self.wait(*also)
        return self._collect([task for task in self._running if task.done()])

    async def abort(self, choice: int | None = None) -> None:
        """Abort the running samples (of one choice, or all); their partial outputs come back
        through `next_finished` or `drain` with finish_reason "abort"."""
        ids = [
            launch.engine_id
            for launch in self._running.values()
            if choice in (None, launch.choice) and launch.engine_id not in self._aborted
        ]
        self._aborted.update(ids)
        if ids:
            await asyncio.shield(self.engine.abort(ids))

    async def drain(self) -> list[Sample]:
        """Abort everything still running and return its final outputs (the engine hands them
        back at once; a request that does not within ABORT_GRACE_S is given up)."""
        if not self._running:
            return []
        await self.abort()
        done, pending = await asyncio.wait(list(self._running), timeout=ABORT_GRACE_S)
        samples = self._collect([task for task in self._running if task in done])
        for task in pending:
            task.cancel()
            self._settle(task)
        return samples

    def _collect(self, ended: list[asyncio.Future[Any]]) -> list[Sample]:
        samples = []
        for task in ended:
            launch = self._settle(task)
            if task.cancelled():
                continue
            output = task.result()  # raises the engine's error, e.g. a dead engine
            if output is None:
                continue
            self.cached_tokens = max(self.cached_tokens, int(output.num_cached_tokens or 0))
            for o in sorted(output.outputs, key=lambda o: o.index):
                samples.append(_to_sample(o, launch.first + o.index, launch.choice, self.vote_key))
                self.collected_tokens += samples[-1].num_tokens
        return sorted(samples, key=lambda s: s.number)

    def _settle(self, task: asyncio.Future[Any]) -> _Launch:
        launch = self._running.pop(task)
        self.in_flight.add(-launch.n)
        return launch


def _to_sample(output: Any, number: int, choice: int, vote_key: Callable[[str], str | None]) -> Sample:
    n = len(output.token_ids)
    cumulative = getattr(output, "cumulative_logprob", None)
    mean = cumulative / n if cumulative is not None and n > 0 and math.isfinite(cumulative) else None
    return Sample(
        number,
        choice,
        output.text,
        n,
        output.finish_reason,
        mean,
        vote_key(output.text),
        tuple(output.token_ids),
        output.logprobs,
    )
