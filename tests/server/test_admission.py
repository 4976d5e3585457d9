"""Admission control's queueing rules (pure asyncio logic, no engine)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from server.admission import Admission, load_scaled_cap
from server.config import LimitSettings
from server.errors import APIError
from tests.conftest import wait_until


def limits(**kw) -> LimitSettings:
    return LimitSettings(**{"max_concurrent_requests": 2, "max_samples_in_flight": 8, "max_queue": 2, **kw})


async def test_first_come_first_served_within_both_limits():
    admission = Admission(limits())
    a, b = await admission.acquire(4), await admission.acquire(4)  # 2 requests, 8 samples: full
    order: list[str] = []

    async def wait(name: str, samples: int) -> None:
        ticket = await admission.acquire(samples)
        order.append(name)
        ticket.release()

    waiters = [asyncio.ensure_future(wait("c", 1)), asyncio.ensure_future(wait("d", 1))]
    assert await wait_until(lambda: admission.queued == 2)
    assert order == []
    a.release()
    a.release()  # idempotent
    await asyncio.gather(*waiters)
    assert order == ["c", "d"]
    b.release()
    assert admission.active == 0 and admission.reserved == 0


async def test_sample_limit_blocks_but_a_lone_request_always_runs():
    admission = Admission(limits())
    big = await admission.acquire(100)  # alone: admitted although it exceeds the limit
    queued = asyncio.ensure_future(admission.acquire(1))
    assert await wait_until(lambda: admission.queued == 1)
    assert not queued.done()
    big.release()
    (await queued).release()


async def test_full_queue_is_429():
    admission = Admission(limits(max_concurrent_requests=1, max_queue=1, queue_timeout_s=3600))
    held = await admission.acquire(1)
    waiting = asyncio.ensure_future(admission.acquire(1))
    assert await wait_until(lambda: admission.queued == 1)
    with pytest.raises(APIError) as full:
        await admission.acquire(1)
    assert full.value.status == 429 and full.value.headers["Retry-After"] == "900"  # a quarter of the timeout
    held.release()
    (await waiting).release()
    assert admission.active == 0 and admission.queued == 0


async def test_a_long_wait_is_503():
    # Nothing releases the holder: the waiter's only way out is its queue timeout.
    admission = Admission(limits(max_concurrent_requests=1, max_queue=1, queue_timeout_s=0.05))
    held = await admission.acquire(1)
    with pytest.raises(APIError) as slow:
        await admission.acquire(1)
    assert slow.value.status == 503 and slow.value.code == "queue_timeout"
    assert slow.value.headers["Retry-After"] == "1"
    assert admission.queued == 0
    held.release()


async def test_a_cancelled_waiter_leaves_the_queue_and_close_fails_the_rest():
    admission = Admission(limits(max_concurrent_requests=1))
    held = await admission.acquire(1)
    leaver = asyncio.ensure_future(admission.acquire(1))
    stayer = asyncio.ensure_future(admission.acquire(1))
    assert await wait_until(lambda: admission.queued == 2)
    leaver.cancel()
    assert await wait_until(lambda: admission.queued == 1)
    rejected_before = engine_dead_rejections()
    admission.close(APIError(503, "engine died", code="engine_dead"))
    with pytest.raises(APIError, match="engine died"):
        await stayer
    with pytest.raises(APIError, match="engine died"):
        await admission.acquire(1)
    assert engine_dead_rejections() - rejected_before == 2  # the queued one and the late one
    held.release()
    assert admission.active == 0 and admission.reserved == 0


def engine_dead_rejections() -> float:
    return REGISTRY.get_sample_value("t2serve_requests_rejected_total", {"reason": "engine_dead"}) or 0.0


# -- the load curve ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("in_flight", "expected"),
    [(0, 16), (50, 16), (60, 12), (75, 8), (90, 3), (99, 1), (100, 1), (500, 1)],
)
def test_load_scaled_cap_curve(in_flight, expected):
    # limit 100: full cap up to half load, then a linear ramp to 1 at the limit.
    assert load_scaled_cap(16, in_flight, 100) == expected


def test_load_scaled_cap_keeps_the_total_under_the_limit():
    # 8 choices at 40/100 in flight: the curve allows 16, the room only (100 - 40) // 8 = 7.
    assert load_scaled_cap(16, 40, 100, choices=8) == 7
    for in_flight in range(0, 100):
        for choices in (1, 3, 8):
            n = load_scaled_cap(64, in_flight, 100, choices=choices)
            assert n >= 1 and (n == 1 or in_flight + n * choices <= 100)


def test_load_scaled_cap_never_raises_the_cap():
    assert all(load_scaled_cap(5, k, 1000) <= 5 for k in range(0, 1200, 7))
    with pytest.raises(ValueError):
        load_scaled_cap(4, 0, 0)
