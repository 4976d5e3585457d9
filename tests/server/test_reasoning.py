"""Reasoning models (--reasoning-parser): votes read each sample's final content only.

The embedded model does not think in tags, so a structured-outputs regex makes it: every
sample reasons "Answer: 9" inside <think>…</think>, then answers one digit 0-4."""

from __future__ import annotations

import pytest
from openai import AsyncOpenAI

from tests.conftest import MODEL_NAME
from tests.server.test_api import QUESTION
from tests.server.test_hardening import serve

THINK_THEN_ANSWER = r"<think>Answer: 9</think>[0-4]"


@pytest.fixture
def reasoning_settings(server_settings):
    parallelism = server_settings.parallelism.model_copy(update={"reasoning_parser": "qwen3"})
    return server_settings.model_copy(update={"parallelism": parallelism})


async def ask(url: str, regex: str, max_tokens: int):
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600) as client:
        return await client.chat.completions.create(
            model=MODEL_NAME,
            messages=QUESTION,
            max_tokens=max_tokens,
            temperature=1.0,
            extra_body={"parallelism": 4, "structured_outputs": {"regex": regex}},
        )


async def test_votes_read_the_final_content_and_the_reasoning_comes_back(
    engine, reasoning_settings, server_url
):
    async with serve(engine, reasoning_settings) as (url, _):
        response = await ask(url, THINK_THEN_ANSWER, 30)
    t2 = response.model_extra["t2"]
    assert sum(t2["votes"].values()) == 4 and set(t2["votes"]) <= set("01234")  # never the reasoning's 9
    message = response.choices[0].message
    assert message.content in set("01234") and message.content == t2["answer"]
    assert message.model_extra["reasoning"] == message.model_extra["reasoning_content"] == "Answer: 9"
    assert 0 < response.usage.completion_tokens_details.reasoning_tokens < response.usage.completion_tokens
    # Without the parser the same samples vote with the reasoning's answer phrase.
    plain = await ask(server_url, THINK_THEN_ANSWER, 30)
    assert plain.model_extra["t2"]["votes"] == {"9": 4}


async def test_a_sample_cut_off_while_reasoning_abstains(engine, reasoning_settings):
    async with serve(engine, reasoning_settings) as (url, _):
        response = await ask(url, r"<think>[a-z]{30,40}</think>Answer: [0-9]", 6)
    t2 = response.model_extra["t2"]
    assert t2["votes"] == {} and t2["answer"] is None
    assert response.choices[0].finish_reason == "length" and not response.choices[0].message.content


async def test_streaming_sends_the_reasoning_then_the_content(engine, reasoning_settings):
    async with (
        serve(engine, reasoning_settings) as (url, _),
        AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600) as client,
    ):
        stream = await client.chat.completions.create(
            model=MODEL_NAME,
            messages=QUESTION,
            max_tokens=30,
            temperature=1.0,
            stream=True,
            extra_body={"parallelism": 4, "structured_outputs": {"regex": THINK_THEN_ANSWER}},
        )
        deltas = [choice.delta for chunk in [c async for c in stream] for choice in chunk.choices]
    reasoning = [d.model_extra.get("reasoning") for d in deltas if d.model_extra.get("reasoning")]
    content = "".join(d.content or "" for d in deltas)
    assert reasoning == ["Answer: 9"] and content in set("01234")


def test_an_unknown_reasoning_parser_is_refused_with_vllms_names():
    from server.vllm_api import Reasoning

    with pytest.raises(ValueError, match="qwen3"):
        Reasoning("no-such-parser", tokenizer=None)
