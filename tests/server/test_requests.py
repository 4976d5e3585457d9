"""The request plumbing in server.app that is pure asyncio logic: cancelling the work when
the client disconnects (the real-engine side is in test_api: disconnects abort samples)."""

from __future__ import annotations

import asyncio

import pytest

from server.requests import ClientDisconnected, run_until_disconnect
from tests.conftest import wait_until


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
