"""What `auto` knows before it chooses N: sample 0's hidden states, read by the T2 head and
its gate.

Sample 0 goes out alone, tagged for capture (server.sampling.for_launch); its prefill fills
the prefix cache and the worker pushes the last prompt token's `[L, d]` residual stream,
which arrives here while sample 0 keeps decoding. The head turns the states into a
prediction (N*/N_max); the gate (estimator.gate) routes the request: answerable (the
margin's multiple), open-ended (N capped at --open-ended-parallelism) or unfamiliar (the
default N). Nothing here ever fails a request: missing states, a failing head or a sampling
setup unlike the head's labels all fall back to the default N, counted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from server import metrics
from server.samples import SampleGroup

logger = logging.getLogger(__name__)


@dataclass
class Estimate:
    """What the head and its gate made of one prompt's states (the `t2` extension's
    estimator fields, server.result)."""

    prediction: float | None = None  # the head's N*/N_max; None: the default N
    capture_ms: float | None = None  # from sample 0's launch to its states' arrival
    estimator_ms: float | None = None  # the head's own latency
    gate: str | None = None  # answerable / open_ended / unfamiliar, when a gate ran
    margin_scale: float | None = None  # answerable: the gate's multiple of T2's margin
    # why the head's prediction is not used ("temperature"), when the head ran
    estimator_fallback: str | None = None
    states: Any = field(default=None, repr=False)  # [L, d] float32, when they arrived in time


class Estimator:
    """Reads one prompt's states with the loaded head (estimator.head.T2Head) or none."""

    def __init__(self, engine: Any, head: Any, open_ended_parallelism: int):
        self.engine = engine
        self.head = head
        self.open_ended_parallelism = open_ended_parallelism

    async def estimate(
        self, group: SampleGroup, tag: str, fallback: str | None, expired: asyncio.Future[None]
    ) -> Estimate:
        """Launch sample 0 of choice 0 tagged `tag`, wait for its states (sample 0's end, the
        deadline or --capture-timeout ends the wait) and read them. `fallback` is the plan's
        reason not to use the prediction (server.parallel.Plan.estimator_fallback)."""
        future = self.engine.expect_capture(tag)
        started = time.monotonic()
        try:
            group.launch(0, 1, capture_tag=tag)
            states = await self._wait_states(future, group, expired)
        finally:
            self.engine.forget_capture(tag)
        estimate = Estimate(states=states, estimator_fallback=fallback)
        if states is None:
            return estimate
        estimate.capture_ms = (time.monotonic() - started) * 1000
        if self.head is not None:
            estimate.prediction, estimate.estimator_ms = await self._timed_predict(states)
        if fallback is not None:  # another sampling setup: the default N
            estimate.prediction = None
        estimate.gate = self._route(states)
        if estimate.gate == "unfamiliar":  # the head's guess is not trusted: the safe default N
            estimate.prediction = None
        elif estimate.gate == "answerable" and estimate.prediction is not None:
            estimate.margin_scale = float(self.head.gate.margin_scale(states)[0])
        return estimate

    def gate_cap(self, estimate: Estimate, cap: int) -> int:
        """The per-choice cap after the gate: open-ended prompts have nothing to vote on."""
        return min(cap, self.open_ended_parallelism) if estimate.gate == "open_ended" else cap

    def _route(self, states: Any) -> str | None:
        gate = getattr(self.head, "gate", None)
        if gate is None:
            return None
        route = gate.route(states)
        metrics.GATE_ROUTES.labels(route).inc()
        return route

    async def _timed_predict(self, states: Any) -> tuple[float | None, float | None]:
        """(prediction, head latency in ms); the prediction is None (the default N) if the
        head fails on these states."""
        started = time.monotonic()
        try:
            prediction = float(await asyncio.to_thread(self.head.predict, states))
        except Exception:
            logger.warning("estimator head failed; using the default N", exc_info=True)
            metrics.ESTIMATOR_FALLBACKS.labels("predict").inc()
            return None, None
        return prediction, (time.monotonic() - started) * 1000

    async def _wait_states(
        self, future: asyncio.Future[Any], group: SampleGroup, expired: asyncio.Future[None]
    ) -> Any:
        """The captured states, or None if sample 0 ended without them, the deadline passed
        or the wait timed out. Sample 0's outcome (or its error) stays in the group."""
        ended = await group.wait(future, expired, timeout=self.engine.settings.capture_timeout_s)
        if ended and not future.done():
            # The states are pushed before the step's tokens are sampled, so they are all
            # but certain to be here already; allow a moment for the socket.
            await asyncio.wait({future, expired}, timeout=0.2, return_when=asyncio.FIRST_COMPLETED)
        if future.done() and not future.cancelled():
            return future.result()
        if not expired.done():
            logger.warning("hidden states for a request did not arrive; using the default N")
        return None
