"""Admission control: how many requests (and samples) run at once, and who waits.

A request is admitted when fewer than `max_concurrent_requests` run and its minimum sample
count (server.parallel.Plan.minimum_samples) fits under `max_samples_in_flight` (a request that could never fit runs alone).
Otherwise it waits, first come first served, in a queue of at most `max_queue` requests:
a full queue answers 429 at once, a wait longer than `queue_timeout_s` answers 503; both
carry `Retry-After`. Once the engine is dead every waiting and new request gets 503.

Admission counts a request's minimum samples; `load_scaled_cap` is how `auto` (any policy
that picks N) takes the rest of the load into account as it grows N (server.parallel).
"""

from __future__ import annotations

import asyncio
import collections
import math

from server import metrics
from server.config import LimitSettings
from server.errors import APIError


class Ticket:
    """One admitted request's hold on the limits; `release()` is idempotent."""

    def __init__(self, admission: Admission, samples: int):
        self._admission, self.samples, self._held = admission, samples, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._admission._release(self.samples)


class Admission:
    def __init__(self, limits: LimitSettings):
        self.limits = limits
        self.active = 0  # admitted requests
        self.reserved = 0  # their minimum samples
        self._queue: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._closed: APIError | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def _fits(self, samples: int) -> bool:
        if self.active == 0:
            return True
        return (
            self.active < self.limits.max_concurrent_requests
            and self.reserved + samples <= self.limits.max_samples_in_flight
        )

    def _hold(self, samples: int) -> None:
        self.active += 1
        self.reserved += samples

    async def acquire(self, samples: int) -> Ticket:
        if self._closed is not None:
            metrics.REJECTED.labels("engine_dead").inc()
            raise self._closed
        if not self._queue and self._fits(samples):
            self._hold(samples)
            return Ticket(self, samples)
        retry_after = {"Retry-After": str(max(1, math.ceil(self.limits.queue_timeout_s / 4)))}
        if len(self._queue) >= self.limits.max_queue:
            metrics.REJECTED.labels("queue_full").inc()
            raise APIError(
                429,
                f"the server is at capacity ({self.active} requests running, {len(self._queue)} queued); "
                "retry later",
                code="queue_full",
                headers=retry_after,
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (samples, waiter)
        self._queue.append(entry)
        metrics.QUEUE_DEPTH.set(len(self._queue))
        try:
            async with asyncio.timeout(self.limits.queue_timeout_s):
                await waiter
        except TimeoutError:
            if not waiter.done() or waiter.cancelled():
                self._leave(entry)
                metrics.REJECTED.labels("queue_timeout").inc()
                raise APIError(
                    503,
                    f"waited {self.limits.queue_timeout_s:g} s for capacity; retry later",
                    code="queue_timeout",
                    headers=retry_after,
                ) from None
        except asyncio.CancelledError:  # the client left while waiting
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(samples)  # admitted in the same instant: give it back
            self._leave(entry)
            raise
        if waiter.exception() is not None:
            raise waiter.exception()  # type: ignore[misc]
        return Ticket(self, samples)

    def _leave(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        if entry in self._queue:
            self._queue.remove(entry)
        metrics.QUEUE_DEPTH.set(len(self._queue))
        self._grant()  # a head that left may unblock the next

    def _release(self, samples: int) -> None:
        self.active -= 1
        self.reserved -= samples
        self._grant()

    def _grant(self) -> None:
        # First come, first served: only the head of the queue may enter.
        while self._queue and self._fits(self._queue[0][0]):
            samples, waiter = self._queue.popleft()
            if waiter.done():
                continue
            self._hold(samples)
            waiter.set_result(None)
        metrics.QUEUE_DEPTH.set(len(self._queue))

    def close(self, error: APIError) -> None:
        """Fail every waiting and future request with `error` (the engine is gone). Each one
        counts in `t2serve_requests_rejected_total{reason="engine_dead"}`, as do the new
        requests that server.app's `get_serving` turns away before they get here."""
        self._closed = error
        while self._queue:
            _, waiter = self._queue.popleft()
            if not waiter.done():
                waiter.set_exception(error)
                metrics.REJECTED.labels("engine_dead").inc()
        metrics.QUEUE_DEPTH.set(0)


# Load below this share of the samples limit leaves the cap alone (see load_scaled_cap).
LOAD_KNEE = 0.5


def load_scaled_cap(cap: int, samples_in_flight: int, limit: int, *, choices: int = 1) -> int:
    """The per-choice cap on N once the server's load is taken into account.

    `samples_in_flight` are the samples other requests have in the engine, `limit` the
    server's --max-samples-in-flight, `choices` the samples per N (n choices x prompts).
    With load u = samples_in_flight / limit the cap is scaled by

        1                          for u <= 0.5
        (1 - u) / (1 - 0.5)        for 0.5 < u < 1   (a linear ramp down to 0)
        0                          for u >= 1

    and bounded by the room left, (limit - samples_in_flight) // choices, so a request does
    not push the total past the limit; the result is never below 1 (every request gets a
    sample). Any policy that picks N (the T2 head, early stopping) applies the same curve.
    """
    if cap < 1 or limit < 1 or choices < 1:
        raise ValueError("cap, limit and choices must be >= 1")
    load = max(samples_in_flight, 0) / limit
    factor = 1.0 if load <= LOAD_KNEE else max(0.0, (1.0 - load) / (1.0 - LOAD_KNEE))
    room = (limit - samples_in_flight) // choices
    return max(1, min(math.floor(cap * factor), room))
