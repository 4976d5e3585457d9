"""Hidden-state capture with vLLM's data parallelism: two engine cores (each a full copy of
the embedded model, its worker bound to its own core: VLLM_CPU_OMP_THREADS_BIND=0|1) behind
vLLM's load balancer. Every core's worker pushes to the one receiver, which matches captures
by tag whichever core ran the request. One eager engine for the module."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
import pytest_asyncio

from tests.conftest import SUITE_COST
from tests.server.engine import capture_checks

pytestmark = [pytest.mark.slow, pytest.mark.engine]


@pytest_asyncio.fixture(scope="module")
async def dp_engine(server_settings):
    SUITE_COST["in-process engine starts"] += 1
    settings = server_settings.engine.model_copy(
        update={"data_parallel_size": 2, "enforce_eager": True, "cpu_kvcache_space_gib": 1}
    )
    live = await capture_checks.start_bound(settings, "0|1")
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
    ids = capture_checks.chat_ids(dp_engine, capture_checks.MARBLES)
    first, second = [await capture_on_core(dp_engine, ids, core) for core in (0, 1)]
    assert first.shape == second.shape == (30, 576)
    # Two copies of one model: the same prompt gives the same states on either core.
    assert capture_checks.min_cosine(first, second) >= 0.999
    assert (await dp_engine.self_test())["shape"] == [30, 576]


async def test_concurrent_requests_get_their_own_states_over_two_cores(dp_engine):
    await capture_checks.concurrent_prompts_get_their_own(dp_engine)
