"""vLLM's output parsers on the real engine: --reasoning-parser (votes read each sample's
final content only) and --tool-call-parser (tool_choice auto; samples vote on the calls).

The embedded model neither thinks in tags nor calls tools on its own, so structured-outputs
regexes make it: e.g. every sample reasons "Answer: 9" inside <think>…</think>, then answers
one digit 0-4."""

from __future__ import annotations

import pytest
from openai import AsyncOpenAI

from tests.conftest import MODEL_NAME
from tests.server.test_api import ADD, QUESTION, TOOL_QUESTION
from tests.server.test_hardening import serve

THINK_THEN_ANSWER = r"<think>Answer: 9</think>[0-4]"


def with_parsers(server_settings, **parsers):
    parallelism = server_settings.parallelism.model_copy(update=parsers)
    return server_settings.model_copy(update={"parallelism": parallelism})


@pytest.fixture
def reasoning_settings(server_settings):
    return with_parsers(server_settings, reasoning_parser="qwen3")


async def ask(url: str, regex: str, max_tokens: int, **fields):
    async with AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600) as client:
        return await client.chat.completions.create(
            model=MODEL_NAME,
            messages=fields.pop("messages", QUESTION),
            max_tokens=max_tokens,
            temperature=1.0,
            extra_body={"parallelism": 4, "structured_outputs": {"regex": regex}, **fields},
        )


async def test_votes_read_the_final_content_and_the_reasoning_comes_back(
    engine, reasoning_settings, server_url
):
    async with serve(engine, reasoning_settings) as (url, _):
        response = await ask(url, THINK_THEN_ANSWER, 30)
        hidden = await ask(url, THINK_THEN_ANSWER, 30, include_reasoning=False)  # vLLM's field
    t2 = response.model_extra["t2"]
    assert sum(t2["votes"].values()) == 4 and set(t2["votes"]) <= set("01234")  # never the reasoning's 9
    message = response.choices[0].message
    assert message.content in set("01234") and message.content == t2["answer"]
    assert message.model_extra["reasoning"] == message.model_extra["reasoning_content"] == "Answer: 9"
    assert 0 < response.usage.completion_tokens_details.reasoning_tokens < response.usage.completion_tokens
    assert hidden.choices[0].message.content in set("01234")
    assert not hidden.choices[0].message.model_extra.get("reasoning")
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


# A hermes tool call, written with the keys in either order: both are the same call.
CALL = (
    r'<tool_call>\{("name": "add", "arguments": \{"a": 2, "b": 3\}'
    r'|"arguments": \{"b": 3, "a": 2\}, "name": "add")\}</tool_call>'
)


async def test_auto_tool_choice_finds_calls_with_the_tool_call_parser_and_votes_on_them(
    engine, server_settings
):
    import json

    settings = with_parsers(server_settings, reasoning_parser="qwen3", tool_call_parser="hermes")
    async with serve(engine, settings) as (url, _):
        # Reasoning, then a call: the call is found in the final content only.
        response = await ask(url, f"<think>Answer: 9</think>{CALL}", 300, messages=TOOL_QUESTION, tools=[ADD])
        # A sample may answer in text instead: it votes with its answer.
        text = await ask(url, "<think>add</think>Answer: 5", 100, messages=TOOL_QUESTION, tools=[ADD])
    t2 = response.model_extra["t2"]
    (key,) = t2["votes"]  # four samples, two spellings, one call
    assert t2["votes"][key] == 4 and key.startswith("calls:")
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 2, "b": 3}
    assert call.id and call.type == "function"
    assert choice.message.model_extra["reasoning_content"] == "Answer: 9" and not choice.message.content
    assert text.model_extra["t2"]["votes"] == {"5": 4} and text.choices[0].message.tool_calls is None
    assert text.choices[0].finish_reason == "stop"
