"""What the front end and the engine's workers agree on for hidden-state capture.

The worker side (the tap compiled into the model, the step planner, the sender) lives in
`server.capture_worker`, which vLLM imports only inside its worker processes: importing it
patches vLLM's model runner, which the front end must not do.

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

from typing import Any

WORKER_EXTENSION = "server.capture_worker.HiddenStateCapture"

CAPTURE_KEY = "t2_capture"  # SamplingParams.extra_args key: the request's capture tag
CONFIG_KEY = "t2_capture"  # vLLM additional_config key: turns the tap on, keys the compile cache
TAP_VERSION = 1  # bump when the traced tap changes, so cached graphs are not replayed


def capture_config(slots: int) -> dict[str, Any]:
    """The `additional_config` entry that turns the tap on (and is part of the compile hash)."""
    return {CONFIG_KEY: {"version": TAP_VERSION, "slots": int(slots)}}
