"""Hidden-state capture with vLLM's data parallelism: two engine cores (each a full copy of
the embedded model, its worker bound to its own core: VLLM_CPU_OMP_THREADS_BIND=0|1) behind
vLLM's load balancer. Every core's worker pushes to the one receiver, which matches captures
by tag whichever core ran the request. One eager engine for the module."""

from __future__ import annotations

import asyncio
import os
import uuid

import numpy as np
import pytest
import pytest_asyncio

from tests.conftest import SUITE_COST
from tests.server.engine.test_capture import PROMPTS, capture, chat_ids, cosine

pytestmark = [pytest.mark.slow, pytest.mark.engine]


@pytest_asyncio.fixture(scope="module")
async def dp_engine(server_settings):
    from server.engine.engine import Engine

    SUITE_COST["in-process engine starts"] += 1
    settings = server_settings.engine.model_copy(
        update={"data_parallel_size": 2, "enforce_eager": True, "log_stats": False, "cpu_threads_bind": "0|1"}
    )
    # As in test_capture_pp.py: the workers inherit the binding when they are spawned.
    saved = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    try:
        live = await Engine.start(settings)
    finally:
        if saved is None:
            os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")
        else:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = saved
    yield live
    await live.shutdown()


async def capture_on_core(engine, ids: list[int], core: int) -> np.ndarray:
    """A capture request pinned to one engine core (vLLM's `data_parallel_rank`)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from server import sampling

    tag = uuid.uuid4().hex
    params = sampling.for_launch(SamplingParams(max_tokens=1, temperature=0.0), n=1, first=0, capture_tag=tag)
    future = engine.expect_capture(tag)
    async for _ in engine._llm.generate(
        TokensPrompt(prompt_token_ids=ids), params, f"dp-{tag}", data_parallel_rank=core
    ):
        pass
    return await asyncio.wait_for(future, 10)


async def test_each_engine_core_s_captures_reach_the_front_end(dp_engine):
    engine = dp_engine
    ids = chat_ids(engine, "Tom has 5 marbles and finds 3 more. How many marbles does he have now?")
    first, second = [await capture_on_core(engine, ids, core) for core in (0, 1)]
    assert first.shape == second.shape == (30, 576)
    # Two copies of one model: the same prompt gives the same states on either core.
    assert min(cosine(first[layer], second[layer]) for layer in range(30)) >= 0.999
    assert (await engine.self_test())["shape"] == [30, 576]


async def test_concurrent_requests_get_their_own_states_over_two_cores(dp_engine):
    engine = dp_engine
    ids = [chat_ids(engine, p) for p in PROMPTS]
    alone = [(await capture(engine, i))[0] for i in ids]
    together = await asyncio.gather(*(capture(engine, i, max_tokens=8) for i in ids))
    for k, (states, _) in enumerate(together):
        own = min(cosine(states[layer], alone[k][layer]) for layer in range(states.shape[0]))
        assert own >= 0.999, (k, own)
        others = [np.linalg.norm(states - alone[j]) for j in range(len(ids)) if j != k]
        assert np.linalg.norm(states - alone[k]) < min(others) / 10
