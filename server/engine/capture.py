"""What the front end and the engine's workers agree on for hidden-state capture.

This module is the front end's half: the opt-in keys, the engine config, the wire format and
`CaptureReceiver`, which resolves each tagged request's future when its states arrive. The
worker side (the tap compiled into the model, the step planner, the sender) lives in
`server.engine.capture_worker`, which vLLM imports only inside its worker processes:
importing it patches vLLM's model runner, which the front end must not do.

A request opts in through `SamplingParams.extra_args[CAPTURE_KEY]` (its tag); the engine is
started with `capture_config(slots)` in vLLM's `additional_config`, which turns the tap on and
is part of vLLM's compile-cache hash, so a graph compiled without the tap is never replayed
with capture on, or the other way round.

Wire format (one multipart message per captured request, worker -> front end):
    [tag (utf-8), header (json: {"shape": [L, d], "dtype": "float32"}), payload (raw bytes)]
A request that found no free slot in its step is sent with `{"dropped": true}` and an empty
payload, so its waiter falls back at once instead of timing out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from typing import Any

import numpy as np

WORKER_EXTENSION = "server.engine.capture_worker.HiddenStateCapture"

CAPTURE_KEY = "t2_capture"  # SamplingParams.extra_args key: the request's capture tag
CONFIG_KEY = "t2_capture"  # vLLM additional_config key: turns the tap on, keys the compile cache
TAP_VERSION = 1  # bump when the traced tap changes, so cached graphs are not replayed


def capture_config(slots: int) -> dict[str, Any]:
    """The `additional_config` entry that turns the tap on (and is part of the compile hash)."""
    return {CONFIG_KEY: {"version": TAP_VERSION, "slots": int(slots)}}


class CaptureReceiver:
    """Front-end end of the capture channel: a ZMQ PULL socket whose messages resolve futures."""

    def __init__(self) -> None:
        import zmq
        import zmq.asyncio

        self._dir = tempfile.mkdtemp(prefix="t2serve-")
        self.endpoint = f"ipc://{self._dir}/capture.sock"
        self._ctx = zmq.asyncio.Context()
        self._socket = self._ctx.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(self.endpoint)
        self._waiters: dict[str, asyncio.Future[np.ndarray]] = {}
        self.messages = 0  # capture messages received, dropped ones included
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._receive_loop())

    def expect(self, tag: str) -> asyncio.Future[np.ndarray]:
        """Register interest in `tag` before the tagged request is submitted (no race)."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._waiters[tag] = future
        return future

    def forget(self, tag: str) -> None:
        future = self._waiters.pop(tag, None)
        if future is not None and not future.done():
            future.cancel()

    async def _receive_loop(self) -> None:
        while True:
            tag_bytes, header, payload = await self._socket.recv_multipart()
            self.messages += 1
            future = self._waiters.pop(tag_bytes.decode(), None)
            # A second message for a tag (re-prefill after preemption) or one for an
            # aborted request finds no waiter and is dropped.
            if future is None or future.done():
                continue
            meta = json.loads(header)
            if meta.get("dropped"):  # no free capture slot in its step: fall back now, not at a timeout
                future.cancel()
                continue
            # copy(): own, writable memory rather than a view of the ZMQ frame.
            future.set_result(np.frombuffer(payload, dtype=meta["dtype"]).reshape(meta["shape"]).copy())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for tag in list(self._waiters):
            self.forget(tag)
        self._socket.close()
        self._ctx.term()
        with contextlib.suppress(OSError):
            os.unlink(self.endpoint.removeprefix("ipc://"))
            os.rmdir(self._dir)
