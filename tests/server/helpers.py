"""What several server test modules share (not a test module): the chat question and tool
they send, another real server on the session's engine with its own settings, checks of
OpenAI errors and Prometheus metrics, an engine whose first sample finishes at once, and the
scripted loop's prompt, params and thinker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
from openai import AsyncOpenAI

from server.config import ParallelismSettings
from server.parallel import ParallelThinker
from tests.conftest import free_port, wait_until

QUESTION = [{"role": "user", "content": "What is 2 + 3? Reply with just the number."}]
LONG = {"max_tokens": 1500, "ignore_eos": True}  # minutes of decoding: only ever cancelled
ADD_TOOL = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOL_QUESTION = [{"role": "user", "content": "What is 2 + 3? Use the add tool."}]


# -- the real server and engine ---------------------------------------------------------


@contextlib.asynccontextmanager
async def serve(engine, settings) -> AsyncIterator[tuple[str, object]]:
    """Another real uvicorn server with its own settings, on the session's engine."""
    import uvicorn

    from server.app import create_app

    app = create_app(settings, engine=engine)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.ensure_future(server.serve())
    assert await wait_until(lambda: server.started or task.done()) and server.started
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)


def settings_with(server_settings, **limits):
    from server.config import LimitSettings

    api_keys = limits.pop("api_keys", [])
    metrics_auth = limits.pop("metrics_auth", False)
    parallelism = limits.pop("parallelism", server_settings.parallelism)
    return server_settings.model_copy(
        update={
            "limits": LimitSettings(**limits),
            "api_keys": api_keys,
            "metrics_auth": metrics_auth,
            "parallelism": parallelism,
        }
    )


def client_for(url: str) -> AsyncOpenAI:
    """The official OpenAI SDK, pointed at `url`."""
    return AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)


class FirstSampleQuick:
    """The real engine, with the request that carries sample 0 cut to one token: sample 0
    finishes at once, the others (1500 tokens, past end-of-sequence) cannot before the
    test ends the deadline."""

    def __init__(self, engine):
        self.engine = engine

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, prompt_token_ids, params, request_id):
        if request_id.endswith("-s0"):
            params = params.clone()
            params.max_tokens = 1
        return self.engine.generate(prompt_token_ids, params, request_id)


# -- checks -----------------------------------------------------------------------------


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def metric(name: str, **labels: str) -> float:
    """A t2serve metric's value in this process (the servers under test live here)."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0


async def scrape(server_url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{server_url}/metrics")).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


# -- the scripted engine's loop (tests/server/engine_double.py) -------------------------

PROMPT = list(range(10))


def params(**fields):
    from vllm import SamplingParams

    return SamplingParams(**{"max_tokens": 16, "temperature": 1.0, **fields})


def thinker_for(engine, **settings) -> ParallelThinker:
    return ParallelThinker(
        engine, ParallelismSettings(**{"default_parallelism": 4, "max_parallelism": 16, **settings})
    )
