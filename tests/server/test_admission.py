"""Admission control's queueing rules (pure asyncio logic, no engine)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from server.admission import Admission, minimum_samples
from server.config import LimitSettings
from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest


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
    await asyncio.sleep(0.01)
    assert admission.queued == 2 and order == []
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
    await asyncio.sleep(0.01)
    assert not queued.done()
    big.release()
    (await queued).release()


async def test_full_queue_is_429_and_a_long_wait_503():
    admission = Admission(limits(max_concurrent_requests=1, max_queue=1, queue_timeout_s=0.2))
    held = await admission.acquire(1)
    waiting = asyncio.ensure_future(admission.acquire(1))
    await asyncio.sleep(0.01)
    with pytest.raises(APIError) as full:
        await admission.acquire(1)
    assert full.value.status == 429 and full.value.headers["Retry-After"] == "1"
    with pytest.raises(APIError) as slow:
        await waiting
    assert slow.value.status == 503 and slow.value.code == "queue_timeout"
    assert admission.queued == 0
    held.release()


async def test_a_cancelled_waiter_leaves_the_queue_and_close_fails_the_rest():
    admission = Admission(limits(max_concurrent_requests=1))
    held = await admission.acquire(1)
    leaver = asyncio.ensure_future(admission.acquire(1))
    stayer = asyncio.ensure_future(admission.acquire(1))
    await asyncio.sleep(0.01)
    leaver.cancel()
    await asyncio.sleep(0.01)
    assert admission.queued == 1
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


def test_minimum_samples():
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], n=3)
    assert minimum_samples(chat) == 3
    assert minimum_samples(chat.model_copy(update={"parallelism": 4})) == 12
    assert minimum_samples(CompletionRequest(model="m", prompt=["a", "b"], parallelism=2)) == 4
    assert minimum_samples(CompletionRequest(model="m", prompt=[1, 2, 3])) == 1
