"""Admission control (server/admission.py): its queueing rules and the load curve (pure
asyncio logic), then on the real server: 429 when the queue is full, 503 after a long wait,
and 200 requests from 32 clients."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest
from prometheus_client import REGISTRY

from server.admission import Admission, load_scaled_cap
from server.config import LimitSettings
from server.errors import APIError
from tests.conftest import MODEL_NAME, wait_until
from tests.server.helpers import LONG, QUESTION, assert_openai_error, metric, scrape, serve, settings_with


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


# -- on the real server -----------------------------------------------------------------


async def test_full_queue_is_429_and_a_leaver_frees_its_place(engine, server_settings):
    # The queue never times out here: who is queued changes only by the test's own events.
    settings = settings_with(server_settings, max_concurrent_requests=1, max_queue=2, queue_timeout_s=3600)
    running = {"model": MODEL_NAME, "messages": QUESTION, "parallelism": 2, **LONG}
    quick = {"model": MODEL_NAME, "messages": QUESTION, "parallelism": 1, "max_tokens": 2}
    chat = "/v1/chat/completions"
    async with serve(engine, settings) as (url, app), httpx.AsyncClient(timeout=None) as http:
        admission = app.state.admission
        holder = asyncio.ensure_future(http.post(f"{url}{chat}", json=running))
        assert await wait_until(lambda: admission.active == 1)
        waiting = [asyncio.ensure_future(http.post(f"{url}{chat}", json=quick)) for _ in range(2)]
        assert await wait_until(lambda: admission.queued == 2)
        overflow = await asyncio.gather(*(http.post(f"{url}{chat}", json=quick) for _ in range(3)))
        for response in overflow:
            assert_openai_error(response, 429, "queue_full")
            assert int(response.headers["retry-after"]) >= 1
        # A client that leaves while queued gives its place back: a newcomer gets it.
        waiting[0].cancel()
        assert await wait_until(lambda: admission.queued == 1)
        newcomer = asyncio.ensure_future(http.post(f"{url}{chat}", json=quick))
        assert await wait_until(lambda: admission.queued == 2)
        assert not newcomer.done()  # queued, not refused
        holder.cancel()  # the holder leaves: the queue drains in order
        for response in await asyncio.gather(waiting[1], newcomer):
            assert response.status_code == 200, response.text
        assert await wait_until(lambda: admission.active == 0 and engine.num_unfinished_requests() == 0)
    assert admission.reserved == 0 and admission.queued == 0


async def test_a_long_wait_in_the_queue_is_503(engine, server_settings):
    # The holder decodes 1500 tokens and is only ever cancelled: the waiter's 0.2 s in the
    # queue runs out first on any machine.
    settings = settings_with(server_settings, max_concurrent_requests=1, max_queue=2, queue_timeout_s=0.2)
    running = {"model": MODEL_NAME, "messages": QUESTION, "parallelism": 2, **LONG}
    quick = {"model": MODEL_NAME, "messages": QUESTION, "parallelism": 1, "max_tokens": 2}
    before = metric("t2serve_requests_rejected_total", reason="queue_timeout")
    async with serve(engine, settings) as (url, app), httpx.AsyncClient(timeout=None) as http:
        admission = app.state.admission
        holder = asyncio.ensure_future(http.post(f"{url}/v1/chat/completions", json=running))
        assert await wait_until(lambda: admission.active == 1)
        response = await http.post(f"{url}/v1/chat/completions", json=quick)
        assert_openai_error(response, 503, "queue_timeout")
        assert int(response.headers["retry-after"]) >= 1
        assert admission.queued == 0
        holder.cancel()
        assert await wait_until(lambda: admission.active == 0 and engine.num_unfinished_requests() == 0)
    assert metric("t2serve_requests_rejected_total", reason="queue_timeout") == before + 1


@pytest.mark.slow
async def test_load_200_requests_at_concurrency_32(engine, server_settings):
    """Every request answered (200, or a documented 429/503), none lost, the engine idle
    afterwards; `auto` lowers N when the samples in flight approach the limit."""
    limit = 16
    settings = settings_with(
        server_settings,
        max_concurrent_requests=8,
        max_samples_in_flight=limit,
        max_queue=32,
        queue_timeout_s=3600,  # the queue holds all 32 clients and never times out: none is refused
    )
    reduced_before = metric("t2serve_load_reduced_requests_total")
    statuses: Counter[int] = Counter()
    t2s: list[dict] = []
    peak = 0
    async with serve(engine, settings) as (url, app), httpx.AsyncClient(timeout=None) as http:
        thinker = app.state.serving.thinker
        jobs: asyncio.Queue[int] = asyncio.Queue()
        for i in range(200):
            jobs.put_nowait(i)

        async def client() -> None:
            while not jobs.empty():
                i = jobs.get_nowait()
                body = {
                    "model": MODEL_NAME,
                    "messages": [{"role": "user", "content": f"What is {i} + {i % 7}?"}],
                    "max_tokens": 4,
                    "temperature": 0.8,
                    "parallelism": "auto" if i % 3 else 2,
                }
                response = await http.post(f"{url}/v1/chat/completions", json=body)
                statuses[response.status_code] += 1
                if response.status_code == 200:
                    t2s.append(response.json()["t2"])
                else:
                    assert_openai_error(response, response.status_code)
                    assert "retry-after" in response.headers

        async def watch_peak() -> None:
            nonlocal peak
            while True:
                peak = max(peak, thinker.samples_in_flight)
                await asyncio.sleep(0.01)

        watcher = asyncio.ensure_future(watch_peak())
        await asyncio.gather(*(client() for _ in range(32)))
        watcher.cancel()
        assert await wait_until(lambda: engine.num_unfinished_requests() == 0)
        assert thinker.samples_in_flight == 0 and app.state.admission.active == 0
        after = await scrape(url)
    assert statuses == {200: 200}, statuses
    auto = [t for t in t2s if t["mode"] == "auto"]
    assert all(1 <= t["n_used"] <= t["load_cap"] for t in auto)
    # 8 auto requests at N=4 would want 32 > 16 samples: the load curve must have cut some.
    assert min(t["n_used"] for t in auto) < server_settings.parallelism.default_parallelism
    assert after["t2serve_load_reduced_requests_total{}"] > reduced_before
    assert after["t2serve_samples_in_flight{}"] == 0 and after["t2serve_queue_depth{}"] == 0
    # Admission bounds reserved samples; the load curve keeps `auto` within the room left.
    assert peak <= limit + settings.limits.max_concurrent_requests, peak
    reduced = sum(t["n_used"] < server_settings.parallelism.default_parallelism for t in auto)
    print(
        f"\nload: {dict(statuses)}; auto requests {len(auto)}, with N lowered by load "
        f"{reduced}; peak samples in flight {peak} (limit {limit})"
    )
