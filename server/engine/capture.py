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

Wire format (one multipart message per captured request and pipeline stage, worker -> front
end):
    [tag (utf-8), header (json), payload (raw bytes)]
    header: {"shape": [n, d], "dtype": "float32", "first_layer": s, "total_layers": L}
Each pipeline stage sends the rows of its own layers `s .. s + n - 1` (one stage: s = 0,
n = L); one tensor-parallel rank per stage sends (after the all-reduce every rank holds the
same residual stream). The receiver assembles the `[L, d]` states in layer order.

A request that found no free slot in its step is sent with `{"dropped": true}` and an empty
payload, so its waiter falls back at once instead of timing out. A part that never comes is
found without a timer: a stage pushes its part before it hands its activations to the next
stage, so once the last stage's part is in and nothing more is waiting on the socket, a
missing earlier part is lost and the request falls back at once. Both are counted
(`CaptureReceiver.dropped`, `t2serve_capture_dropped_total`).
"""

from __future__ import annotations

import asyncio
import collections
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


def receiver_endpoint(address: str | None, folder: str) -> str:
    """The ZMQ endpoint the receiver binds: a socket file in `folder` for workers on this
    host, or `tcp://HOST:PORT` for `--capture-address HOST:PORT` (workers on other hosts,
    vLLM's Ray executor; port 0: any free port)."""
    if address is None:
        return f"ipc://{folder}/capture.sock"
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"--capture-address must be HOST:PORT, got {address!r}")
    return f"tcp://{host}:{'*' if int(port) == 0 else port}"


class _Parts:
    """The stages' parts of one request's states, until they cover every layer."""

    def __init__(self, total_layers: int) -> None:
        self.total_layers = total_layers
        self.rows: dict[int, np.ndarray] = {}  # first layer -> [n, d]

    def add(self, first_layer: int, rows: np.ndarray) -> None:
        self.rows[first_layer] = rows

    def assembled(self) -> np.ndarray | None:
        """`[L, d]` in layer order once the parts tile 0 .. L - 1, else None."""
        covered = 0
        for first in sorted(self.rows):
            if first != covered:
                return None
            covered += len(self.rows[first])
        if covered != self.total_layers:
            return None
        return np.concatenate([self.rows[first] for first in sorted(self.rows)])


class CaptureReceiver:
    """Front-end end of the capture channel: a ZMQ PULL socket whose messages resolve futures."""

    def __init__(self, address: str | None = None) -> None:
        import zmq
        import zmq.asyncio

        self._dir = tempfile.mkdtemp(prefix="t2serve-")
        self._ctx = zmq.asyncio.Context()
        self._socket = self._ctx.socket(zmq.PULL)
        self._socket.setsockopt(zmq.LINGER, 0)
        bound = receiver_endpoint(address, self._dir)
        self._socket.bind(bound)
        # What the workers connect to: the bound port, at the host they were told.
        port = self._socket.getsockopt(zmq.LAST_ENDPOINT).decode().rpartition(":")[2]
        self.endpoint = bound if address is None else f"tcp://{address.rpartition(':')[0]}:{port}"
        self._waiters: dict[str, asyncio.Future[np.ndarray]] = {}
        self._parts: dict[str, _Parts] = {}
        self._last_stage_in: set[str] = set()  # incomplete, their last stage's part received
        self.messages = 0  # capture messages received, dropped ones included
        self.dropped: collections.Counter[str] = collections.Counter()  # by reason: slots, part_missing
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._receive_loop())

    def expect(self, tag: str) -> asyncio.Future[np.ndarray]:
        """Register interest in `tag` before the tagged request is submitted (no race)."""
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._waiters[tag] = future
        return future

    def forget(self, tag: str) -> None:
        self._parts.pop(tag, None)
        self._last_stage_in.discard(tag)
        future = self._waiters.pop(tag, None)
        if future is not None and not future.done():
            future.cancel()

    async def _receive_loop(self) -> None:
        import zmq

        while True:
            self.receive(await self._socket.recv_multipart())
            # Earlier stages pushed their parts before the last stage computed its own: once
            # the socket holds nothing more, a part still missing was lost.
            if self._last_stage_in and not await self._socket.poll(timeout=0, flags=zmq.POLLIN):
                for tag in list(self._last_stage_in):
                    self._drop(tag, "part_missing")

    def receive(self, message: list[bytes]) -> None:
        """One message from a worker: a stage's part (resolves the future once every layer is
        in) or a dropped capture (cancels it)."""
        tag_bytes, header, payload = message
        self.messages += 1
        tag = tag_bytes.decode()
        future = self._waiters.get(tag)
        # A second message for a tag (re-prefill after preemption) or one for an aborted
        # request finds no waiter and is dropped.
        if future is None or future.done():
            return
        meta = json.loads(header)
        if meta.get("dropped"):  # no free capture slot in its step: fall back now, not at a timeout
            self._drop(tag, "slots")
            return
        # copy(): own, writable memory rather than a view of the ZMQ frame.
        rows = np.frombuffer(payload, dtype=meta["dtype"]).reshape(meta["shape"]).copy()
        parts = self._parts.setdefault(tag, _Parts(int(meta["total_layers"])))
        parts.add(int(meta["first_layer"]), rows)
        states = parts.assembled()
        if states is not None:
            self._waiters.pop(tag)
            self._parts.pop(tag)
            self._last_stage_in.discard(tag)
            future.set_result(states)
        elif int(meta["first_layer"]) + len(rows) == parts.total_layers:
            self._last_stage_in.add(tag)

    def _drop(self, tag: str, reason: str) -> None:
        from server import metrics  # here: the workers import this module too, and count nothing

        self.dropped[reason] += 1
        metrics.CAPTURE_DROPPED.labels(reason).inc()
        self.forget(tag)

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
            if self.endpoint.startswith("ipc://"):
                os.unlink(self.endpoint.removeprefix("ipc://"))
            os.rmdir(self._dir)
