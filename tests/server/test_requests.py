"""One request's life (server/requests.py): its work is cancelled when the client leaves
(pure asyncio), and on the real engine a client leaving, before or during the stream, aborts
its samples; a streamed vote sends keep-alive comments while it runs."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from server.requests import ClientDisconnected, run_until_disconnect
from tests.conftest import MODEL_NAME, wait_until
from tests.server.helpers import LONG, QUESTION, scrape, serve, settings_with


class FakeRequest:
    """An ASGI request whose next message is the disconnect, once the test says so."""

    def __init__(self) -> None:
        self.leave = asyncio.Event()

    async def receive(self) -> dict:
        await self.leave.wait()
        return {"type": "http.disconnect"}


async def test_work_finishing_first_returns_its_result():
    request = FakeRequest()
    assert await run_until_disconnect(request, asyncio.sleep(0, result="answer")) == "answer"


async def test_a_disconnect_cancels_the_work():
    request, started, cancelled = FakeRequest(), asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # runs until cancelled
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.ensure_future(run_until_disconnect(request, work()))
    assert await wait_until(started.is_set)
    request.leave.set()
    with pytest.raises(ClientDisconnected):
        await task
    assert cancelled.is_set()


async def test_cancelling_the_handler_cancels_the_work():
    request, started, cancelled = FakeRequest(), asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    task = asyncio.ensure_future(run_until_disconnect(request, work()))
    assert await wait_until(started.is_set)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_until(cancelled.is_set)


# -- on the real engine: a client leaving aborts its samples ----------------------------


async def test_client_disconnect_aborts_samples(server_url, engine):
    body = {
        "model": MODEL_NAME,
        "messages": QUESTION,
        "max_tokens": 1500,
        "ignore_eos": True,
        "parallelism": 4,
        "temperature": 1.0,
    }
    async with httpx.AsyncClient(timeout=None) as http:
        request = asyncio.ensure_future(http.post(f"{server_url}/v1/chat/completions", json=body))
        await wait_until(lambda: engine.num_unfinished_requests() >= 4)
        assert engine.num_unfinished_requests() >= 4  # all four samples are running
        request.cancel()  # the client goes away mid-request
        with pytest.raises(asyncio.CancelledError):
            await request
    # 4 x 1500 tokens would take minutes here; the abort takes well under a few seconds.
    await wait_until(lambda: engine.num_unfinished_requests() == 0)
    assert engine.num_unfinished_requests() == 0


async def test_client_disconnect_mid_stream_aborts_samples(server_url, engine):
    body = {
        "model": MODEL_NAME,
        "messages": QUESTION,
        "max_tokens": 1500,
        "ignore_eos": True,
        "parallelism": 3,
        "stream": True,
    }
    async with (
        httpx.AsyncClient(timeout=None) as http,
        http.stream("POST", f"{server_url}/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.aiter_lines()  # keep the iterator: dropping it closes the stream
        assert (await lines.__anext__()).startswith("data:")  # the role chunk: samples are running
        await wait_until(lambda: engine.num_unfinished_requests() >= 3)
        assert engine.num_unfinished_requests() >= 3
    await wait_until(lambda: engine.num_unfinished_requests() == 0)
    assert engine.num_unfinished_requests() == 0


async def test_many_clients_leaving_leave_nothing_running(server_url, engine):
    body = {"model": MODEL_NAME, "messages": QUESTION, "parallelism": 3, **LONG}
    async with httpx.AsyncClient(timeout=None) as http:
        requests = [
            asyncio.ensure_future(http.post(f"{server_url}/v1/chat/completions", json=body)) for _ in range(6)
        ]
        assert await wait_until(lambda: engine.num_unfinished_requests() >= 18)
        for request in requests:
            request.cancel()
        await asyncio.gather(*requests, return_exceptions=True)
    assert await wait_until(lambda: engine.num_unfinished_requests() == 0)
    assert (await scrape(server_url))["t2serve_samples_in_flight{}"] == 0


async def test_a_streamed_vote_sends_keepalive_comments_until_it_ends(engine, server_settings):
    """While the samples run, the stream carries SSE comments (sse-starlette's pings), so an
    idle-timeout proxy keeps the connection. The vote here cannot end before the first
    keep-alive on any hardware: ~1800 forced decode steps against a 50 ms interval."""
    async with serve(engine, settings_with(server_settings, sse_keepalive_s=0.05)) as (url, _):
        body = {
            "model": MODEL_NAME,
            "messages": QUESTION,
            "max_tokens": 1800,
            "ignore_eos": True,
            "parallelism": 2,
            "stream": True,
        }
        lines: list[str] = []
        async with (
            httpx.AsyncClient(timeout=None) as http,
            http.stream("POST", f"{url}/v1/chat/completions", json=body) as response,
        ):
            assert response.status_code == 200
            async for line in response.aiter_lines():
                lines.append(line)
                if line.startswith(":"):
                    break  # leave: the server must abort the samples
    first = json.loads(lines[0].removeprefix("data: "))
    assert first["choices"][0]["delta"]["role"] == "assistant"
    assert lines[-1].startswith(": ping")
    assert await wait_until(lambda: engine.num_unfinished_requests() == 0)
