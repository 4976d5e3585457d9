"""Hidden-state capture with vLLM's tensor parallelism: the embedded model sharded over three
ranks (its 9 attention heads do not divide by 2, so TP = 2 is refused by vLLM; three ranks
share the two cores: VLLM_CPU_OMP_THREADS_BIND=0|1|0). Only the first rank sends; the states
equal the unsharded model's. One eager engine for the module."""

from __future__ import annotations

import pytest
import pytest_asyncio

from tests.conftest import SUITE_COST
from tests.server.engine import capture_checks

pytestmark = [pytest.mark.slow, pytest.mark.engine]


@pytest_asyncio.fixture(scope="module")
async def tp_engine(server_settings):
    SUITE_COST["in-process engine starts"] += 1
    settings = server_settings.engine.model_copy(
        update={"tensor_parallel_size": 3, "enforce_eager": True, "cpu_kvcache_space_gib": 1}
    )
    live = await capture_checks.start_bound(settings, "0|1|0")
    yield live
    await live.shutdown()


async def test_three_ranks_capture_the_unsharded_states(tp_engine, reference_model):
    """One message per capture (the first rank's), equal to transformers' float32 residual
    stream at every layer, as the one-rank capture is (test_capture.py)."""
    before = tp_engine.capture_messages
    await capture_checks.states_match_the_reference(tp_engine, reference_model)
    assert tp_engine.capture_messages - before == 1  # one rank sends


async def test_concurrent_requests_get_their_own_states_across_ranks(tp_engine):
    await capture_checks.concurrent_prompts_get_their_own(tp_engine)


async def test_a_fully_cached_prompt_still_yields_its_states_across_ranks(tp_engine):
    await capture_checks.cached_prompt_yields_its_states(tp_engine)


async def test_self_test_and_auto_run_on_three_ranks(tp_engine, server_settings):
    await capture_checks.self_test_and_auto_pass(tp_engine, server_settings.parallelism)
