"""The SamplingParams every sample runs with (server/sampling.py), end to end: vLLM's
sampling extras in a request reach the engine."""

from __future__ import annotations

from tests.conftest import MODEL_NAME
from tests.server.helpers import QUESTION


async def test_vllm_sampling_extras_change_the_output(client):
    """vLLM's extras go through vLLM's own request model: `min_tokens` = `max_tokens` forces
    every sample to its full length; `stop_token_ids` / `repetition_penalty` are accepted."""
    response = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=QUESTION,
        max_tokens=12,
        extra_body={"min_tokens": 12, "parallelism": 3, "repetition_penalty": 1.2, "stop_token_ids": [0]},
    )
    assert response.usage.completion_tokens == 3 * 12
    assert response.choices[0].finish_reason == "length"
