"""What the capture must do on any engine shape, shared by test_capture.py (one rank, both
modes) and the parallel modules (test_capture_pp.py, _tp.py, _dp.py): prompts, one tagged
capture, the transformers reference, and the checks each shape runs."""

from __future__ import annotations

import asyncio
import os
import uuid

import numpy as np
import torch

PROMPTS = [
    "What is 7 times 8?",
    "Name a prime number larger than 20.",
    "If I have 3 apples and eat one, how many are left?",
    "Which is bigger, 0.5 or 0.45?",
    "Spell the word cat backwards.",
    "What is the capital of France?",
    "Add 12 and 30.",
    "How many legs does a spider have?",
    "What comes after Tuesday?",
    "Is 91 a prime number? Explain.",
    "Convert 3 hours to minutes.",
    "What is 100 divided by 4?",
    "Give me a color of the rainbow.",
    "How many sides does a hexagon have?",
    "What is 2 to the power of 10?",
    "Subtract 19 from 50.",
]
MARBLES = "Tom has 5 marbles and finds 3 more. How many marbles does he have now?"


def chat_ids(engine, text: str) -> list[int]:
    tok = engine.tokenizer
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return list(tok.encode(rendered, add_special_tokens=False))


async def capture(engine, ids: list[int], max_tokens: int = 1) -> tuple[np.ndarray, object]:
    from vllm import SamplingParams

    from server import sampling

    tag = uuid.uuid4().hex
    params = sampling.for_launch(
        SamplingParams(max_tokens=max_tokens, temperature=0.0), n=1, first=0, capture_tag=tag
    )
    future = engine.expect_capture(tag)
    final = None
    async for out in engine.generate(ids, params, f"test-{tag}"):
        final = out
    return await asyncio.wait_for(future, 10), final


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest per-layer cosine similarity of two `[L, d]` states."""
    return min(cosine(a[layer], b[layer]) for layer in range(a.shape[0]))


def reference_states(model, ids: list[int]):
    """transformers' float32 residual stream at the prompt's last token after every layer, as
    the tap reads it (the last layer's own output, before the final norm), and the full
    forward's output for other positions."""
    layers = model.model.layers
    last_layer_out = {}
    handle = layers[-1].register_forward_hook(
        lambda m, a, o: last_layer_out.setdefault("h", o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    handle.remove()
    reference = [out.hidden_states[layer + 1][0, -1].numpy() for layer in range(len(layers) - 1)]
    reference.append(last_layer_out["h"][0, -1].numpy())
    return np.stack(reference), out


async def states_match_the_reference(engine, reference_model) -> np.ndarray:
    """The engine's states of one prompt equal transformers' at every layer; returns them."""
    ids = chat_ids(engine, MARBLES)
    states, _ = await capture(engine, ids)
    assert states.shape == (engine.info.num_layers, engine.info.hidden_size) == (30, 576)
    assert states.dtype == np.float32
    reference, _ = reference_states(reference_model, ids)
    assert min_cosine(states, reference) >= 0.999
    return states


async def concurrent_prompts_get_their_own(engine) -> None:
    ids = [chat_ids(engine, p) for p in PROMPTS]
    alone = [(await capture(engine, i))[0] for i in ids]
    together = await asyncio.gather(*(capture(engine, i, max_tokens=8) for i in ids))
    for k, (states, _) in enumerate(together):
        assert min_cosine(states, alone[k]) >= 0.999, k
        # Closer to its own one-at-a-time capture than to any other prompt's.
        others = [np.linalg.norm(states - alone[j]) for j in range(len(ids)) if j != k]
        assert np.linalg.norm(states - alone[k]) < min(others) / 10


async def cached_prompt_yields_its_states(engine) -> None:
    """vLLM recomputes a cached prompt's last token, so its states come back; they are the
    same as the first (uncached) capture's."""
    ids = chat_ids(
        engine, f"A question ({uuid.uuid4().hex[:8]}) asked twice: " + "how many days are in a week? " * 6
    )
    assert len(ids) > 64
    first, out_first = await capture(engine, ids)
    again, out_again = await capture(engine, ids)
    assert not out_first.num_cached_tokens and out_again.num_cached_tokens == (len(ids) - 1) // 32 * 32
    assert min_cosine(again, first) >= 0.999


async def self_test_and_auto_pass(engine, parallelism) -> None:
    """The start-up self-test and an `auto` request, which reads sample 0's states."""
    from vllm import SamplingParams

    from server.parallel import ParallelThinker

    assert (await engine.self_test())["shape"] == [30, 576]
    thinker = ParallelThinker(engine, parallelism)
    result = await thinker.run(
        chat_ids(engine, "What is 6 + 7?"),
        SamplingParams(max_tokens=8, temperature=0.8),
        thinker.plan("auto"),
        request_id=uuid.uuid4().hex,
    )
    assert result.mode == "auto" and result.estimate.states.shape == (30, 576)
    assert result.samples == result.n_used == parallelism.default_parallelism
    assert engine.num_unfinished_requests() == 0


async def start_bound(settings, bind: str):
    """An engine whose ranks' OpenMP threads are bound as `bind` says ("0|1") and whose ranks
    each get `settings.cpu_kvcache_space_gib` of KV cache: the workers inherit both from the
    environment when they are spawned, and an engine started earlier in this process has left
    its own values there, which start-up would not override (at 4 GiB per rank, three ranks
    beside the session engines ran a 24 GiB machine out of memory)."""
    from server.engine.engine import Engine

    wanted = {
        "VLLM_CPU_OMP_THREADS_BIND": bind,
        "VLLM_CPU_KVCACHE_SPACE": str(settings.cpu_kvcache_space_gib),
    }
    saved = {name: os.environ.get(name) for name in wanted}
    os.environ.update(wanted)
    try:
        return await Engine.start(settings.model_copy(update={"cpu_threads_bind": bind, "log_stats": False}))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name)
            else:
                os.environ[name] = value
