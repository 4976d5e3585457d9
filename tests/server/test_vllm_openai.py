"""What t2serve takes from vLLM's OpenAI layer (server/vllm_openai.py), pinned: the field names
it relies on, and SamplingParams built the way `vllm serve` builds them. Then on the real
engine: tool_choice modes, and vLLM's output parsers (--reasoning-parser: votes read each
sample's final content only; --tool-call-parser: tool_choice auto, samples vote on the calls).

The embedded model neither thinks in tags nor calls tools on its own, so structured-outputs
regexes make it: e.g. every sample reasons "Answer: 9" inside <think>…</think>, then answers
one digit 0-4."""

from __future__ import annotations

import json
import logging

import openai
import pytest
from openai import AsyncOpenAI

from server import aggregation, vllm_openai
from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest
from tests.conftest import MODEL_NAME
from tests.server.helpers import ADD_TOOL, QUESTION, TOOL_QUESTION, serve


def params(body: dict, *, prompt_len: int = 10, context: int = 100, defaults=None, default_max_tokens=None):
    return vllm_openai.to_sampling_params(
        body,
        chat=True,
        prompt_len=prompt_len,
        context=context,
        defaults=defaults or {},
        default_max_tokens=default_max_tokens,
    )[0]


def test_the_vllm_fields_t2serve_relies_on_exist():
    chat, completion = vllm_openai.vllm_request_models()
    assert set(chat.model_fields) >= vllm_openai.SAMPLING_FIELDS
    chat_only = {
        "max_completion_tokens",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "include_reasoning",
    }
    assert vllm_openai.SAMPLING_FIELDS - chat_only <= set(completion.model_fields)
    assert set(chat.model_fields) >= vllm_openai.INERT_FIELDS
    # t2serve's own chat template fields mean what vLLM's do.
    for name in ("add_generation_prompt", "continue_final_message", "chat_template_kwargs"):
        assert name in chat.model_fields and name in ChatCompletionRequest.model_fields
    assert not vllm_openai.LEGACY_OPENAI_FIELDS & set(chat.model_fields)


def test_vllm_sampling_extras_reach_the_sampling_params():
    p = params(
        {
            "temperature": 0.7,
            "repetition_penalty": 1.3,
            "min_tokens": 3,
            "max_tokens": 20,
            "stop_token_ids": [5, 6],
            "include_stop_str_in_output": True,
            "logit_bias": {"7": -100},
            "allowed_token_ids": [1, 2, 3, 7],
            "skip_special_tokens": False,
        }
    )
    assert (p.temperature, p.repetition_penalty, p.min_tokens, p.max_tokens) == (0.7, 1.3, 3, 20)
    assert p.stop_token_ids == [5, 6] and p.include_stop_str_in_output and not p.skip_special_tokens
    assert p.logit_bias == {7: -100} and p.allowed_token_ids == [1, 2, 3, 7]


@pytest.mark.parametrize("value", [True, 1, "json", ["regex"]])
def test_structured_outputs_that_is_no_object_is_a_400_not_a_crash_in_vllms_validator(value):
    # vLLM's before-validator reads the raw field as a mapping (an AttributeError on a bool).
    with pytest.raises(APIError) as err:
        params({"structured_outputs": value})
    assert (err.value.status, err.value.param) == (400, "structured_outputs")


def test_max_tokens_defaults_to_the_context_left_as_in_vllm():
    assert params({}, prompt_len=30, context=100).max_tokens == 70
    assert params({}, prompt_len=30, context=100, default_max_tokens=16).max_tokens == 16
    assert params({}, prompt_len=90, context=100, default_max_tokens=16).max_tokens == 10
    assert params({"max_tokens": 5}, default_max_tokens=16).max_tokens == 5
    with pytest.raises(APIError) as err:
        params({"max_completion_tokens": 95}, prompt_len=10, context=100)
    assert err.value.status == 400 and err.value.param == "max_completion_tokens"


def test_generation_config_defaults_apply_where_the_request_is_silent(model_dir, tmp_path):
    """`--generation-config FOLDER` read by vLLM's own ModelConfig, then applied by vLLM's own
    request model: the model's defaults fill what the request leaves out."""
    from vllm.engine.arg_utils import EngineArgs

    (tmp_path / "generation_config.json").write_text(
        json.dumps({"temperature": 0.25, "top_p": 0.5, "repetition_penalty": 1.1, "max_new_tokens": 7})
    )
    config = EngineArgs(model=str(model_dir), generation_config=str(tmp_path)).create_model_config()
    defaults = vllm_openai.default_sampling_params(config)
    assert defaults == {"temperature": 0.25, "top_p": 0.5, "repetition_penalty": 1.1, "max_tokens": 7}
    silent = params({}, defaults=defaults)
    assert (silent.temperature, silent.top_p, silent.repetition_penalty, silent.max_tokens) == (
        0.25,
        0.5,
        1.1,
        7,
    )
    explicit = params({"temperature": 0.9, "max_tokens": 30}, defaults=defaults)
    assert (explicit.temperature, explicit.top_p, explicit.max_tokens) == (0.9, 0.5, 30)
    # --generation-config vllm: vLLM's neutral defaults, nothing from the model.
    neutral = EngineArgs(model=str(model_dir), generation_config="vllm").create_model_config()
    assert vllm_openai.default_sampling_params(neutral) == {}


def body_of(request) -> dict:
    return request.model_dump(exclude_unset=True, mode="json")


@pytest.mark.parametrize(
    ("extra", "refused"),
    [
        ({"prompt_logprobs": 2}, "prompt_logprobs"),
        ({"return_token_ids": True}, "return_token_ids"),
        ({"truncate_prompt_tokens": 5}, "truncate_prompt_tokens"),
        ({"cache_salt": "tenant-1"}, "cache_salt"),
        ({"echo": True}, "echo"),
        ({"function_call": "auto"}, "function_call"),
        # Defaults, and fields t2serve honours, pass.
        (
            {
                "logprobs": False,
                "tool_choice": "none",
                "response_format": None,
                "add_generation_prompt": True,
            },
            None,
        ),
        ({"repetition_penalty": 1.2, "min_tokens": 2, "user": "u", "stream_interval": 4}, None),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a+"}}, None),
    ],
)
def test_fields_t2serve_cannot_honour_are_refused_by_name(extra, refused):
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    )
    own = set(ChatCompletionRequest.model_fields)
    if refused is None:
        vllm_openai.check_fields(body_of(request), chat=True, own_fields=own)
        return
    with pytest.raises(APIError) as err:
        vllm_openai.check_fields(body_of(request), chat=True, own_fields=own)
    assert (err.value.status, err.value.param, err.value.code) == (400, refused, "unsupported_parameter")


def test_completion_fields_and_unknown_fields(caplog):
    own = set(CompletionRequest.model_fields)
    with pytest.raises(APIError) as err:
        vllm_openai.check_fields(
            body_of(CompletionRequest.model_validate({"model": "m", "prompt": "x", "suffix": "y"})),
            chat=False,
            own_fields=own,
        )
    assert err.value.param == "suffix"
    with caplog.at_level(logging.WARNING, logger="server.vllm_openai"):
        vllm_openai.check_fields(
            body_of(CompletionRequest.model_validate({"model": "m", "prompt": "x", "brand_new_field": 1})),
            chat=False,
            own_fields=own,
        )
    assert "brand_new_field" in caplog.text


def test_logprobs_are_shaped_by_vllms_own_builders(model_dir):
    """vLLM's chat and completion logprob builders, bound through t2serve's adapter."""
    from transformers import AutoTokenizer
    from vllm.logprobs import Logprob

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tokenizer.encode(" five apples", add_special_tokens=False)
    steps = [
        {t: Logprob(-0.5, 1, tokenizer.decode([t])), 0: Logprob(-1.5, 2, tokenizer.decode([0]))} for t in ids
    ]
    chat = vllm_openai.chat_logprobs(ids, steps, 1, tokenizer)
    assert "".join(c["token"] for c in chat["content"]) == " five apples"
    assert all(c["logprob"] == -0.5 and len(c["top_logprobs"]) == 1 for c in chat["content"])
    completion = vllm_openai.completion_logprobs(ids, steps, 1, tokenizer)
    assert completion["token_logprobs"] == [-0.5] * len(ids)
    assert "".join(completion["tokens"]) == " five apples" and completion["text_offset"][0] == 0


ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}},
    },
}


def vllm_chat(**fields):
    return vllm_openai.vllm_request_models()[0].model_validate({"messages": [], **fields})


def test_tool_choice_modes():
    mode = vllm_openai.tool_calls_mode
    assert mode(vllm_chat(), auto_tools=False) is None
    assert mode(vllm_chat(tools=[ADD], tool_choice="none"), auto_tools=False) is None
    assert mode(vllm_chat(tools=[ADD], tool_choice="required"), auto_tools=False).mode == "required"
    named = mode(vllm_chat(tools=[ADD], tool_choice={"type": "function", "function": {"name": "add"}}), False)
    assert (named.mode, named.function) == ("named", "add")
    # auto, explicit or by default (vLLM's model fills it in), needs a tool-call parser.
    assert mode(vllm_chat(tools=[ADD]), auto_tools=True).mode == "auto"
    with pytest.raises(APIError) as err:
        mode(vllm_chat(tools=[ADD]), auto_tools=False)
    assert err.value.param == "tool_choice"
    with pytest.raises(APIError) as err:  # found before admission, from the raw body
        vllm_openai.check_fields({"tools": [ADD]}, chat=True, own_fields=set(), auto_tools=False)
    assert err.value.param == "tool_choice" and "--tool-call-parser" in err.value.message
    vllm_openai.check_fields({"tools": [ADD]}, chat=True, own_fields=set(), auto_tools=True)
    # Constrained outputs become OpenAI tool calls; anything else is no call.
    (call,) = vllm_openai.tool_calls_of('{"a": 2, "b": 3}', named)
    assert call["function"] == {"name": "add", "arguments": '{"a": 2, "b": 3}'} and call["type"] == "function"
    required = vllm_openai.tool_calls_of(
        '[{"name": "add", "parameters": {"a": 1, "b": 1}}]', vllm_openai.ToolCalls("required")
    )
    assert [c["function"]["name"] for c in required] == ["add"]
    assert vllm_openai.tool_calls_of('{"a": 2', named) is None


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def test_vllms_parsers_split_reasoning_and_find_calls_that_vote_together(tokenizer):
    from server import aggregation

    parsers = vllm_openai.Parsers(tokenizer, reasoning="qwen3", tool_call="hermes")
    reader = parsers.for_request(vllm_chat(tools=[ADD], tool_choice="auto"), chat=True)
    assert reader.tools.mode == "auto" and reader.parses_tools
    one = reader.parse(
        '<think>sum them</think>Sure. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
    )
    assert one.reasoning == "sum them" and one.content.strip() == "Sure."
    assert [c["function"]["name"] for c in one.tool_calls] == ["add"]
    assert json.loads(one.tool_calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    # The same call with other key order and spacing votes with it; a text answer does not.
    other = reader.parse(
        '<think>x</think><tool_call>{"arguments": {"b": 2.0,"a":1}, "name": "add"}</tool_call>'
    )
    answer = aggregation.AnswerAggregator()
    assert aggregation.vote_key(one, answer) == aggregation.vote_key(other, answer)
    text = reader.parse("<think>x</think>Answer: 3")
    assert text.tool_calls is None and aggregation.vote_key(text, answer) == "3"
    # Still reasoning when it stopped: no final content, so it abstains.
    assert aggregation.vote_key(reader.parse("<think>Answer: 9"), answer) is None
    assert reader.reasoning_tokens(tokenizer.encode("<think>a b c</think> d")) > 0


def test_a_tool_call_parser_adjusts_the_request_as_vllm_does(tokenizer):
    # hermes under vLLM's strict tool calling: a named call is constrained to its own
    # <tool_call> envelope (a structural tag), and special tokens stay in the text.
    reader = vllm_openai.Parsers(tokenizer, tool_call="hermes").for_request(
        vllm_chat(tools=[ADD], tool_choice={"type": "function", "function": {"name": "add"}}), chat=True
    )
    assert reader.request.structured_outputs.structural_tag is not None
    assert reader.request.skip_special_tokens is False
    # Without parsers nothing is adjusted and named calls are plain JSON (constrain_to_tools).
    plain = vllm_openai.NO_PARSERS.for_request(vllm_chat(tools=[ADD], tool_choice="required"), chat=True)
    assert plain.parser is None and plain.request.structured_outputs is None


def test_a_response_format_folded_into_the_tool_tag_still_decides_the_vote(tokenizer):
    # tool_choice auto + response_format at --tool-strict-level parameter: vLLM ORs "a call"
    # with "this JSON" into one structural tag and clears response_format; the vote still
    # reads the client's JSON constraint (samples answering in JSON vote on canonical JSON).
    body = {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [ADD],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "n", "schema": {"type": "integer"}},
        },
    }
    parsers = vllm_openai.Parsers(tokenizer, tool_call="hermes", tool_strict_level="parameter")
    params, reader = vllm_openai.to_sampling_params(
        body, chat=True, prompt_len=4, context=100, defaults={}, default_max_tokens=None, parsers=parsers
    )
    assert params.structured_outputs.structural_tag is not None and params.structured_outputs.json is None
    assert reader.constraint.json == {"type": "integer"}
    assert aggregation.constrained(reader.constraint) == "json"
    # Without tools nothing is folded: the constraint is the params' own.
    params, reader = vllm_openai.to_sampling_params(
        {k: v for k, v in body.items() if k != "tools"},
        chat=True, prompt_len=4, context=100, defaults={}, default_max_tokens=None, parsers=parsers,
    )  # fmt: skip
    assert reader.constraint is params.structured_outputs and reader.constraint.json == {"type": "integer"}


def test_unknown_parsers_are_refused_with_vllms_names():
    with pytest.raises(ValueError, match="qwen3"):
        vllm_openai.Parsers(None, reasoning="no-such-parser")
    with pytest.raises(ValueError, match="hermes"):
        vllm_openai.Parsers(None, tool_call="no-such-parser")


# -- on the real engine: tool_choice ----------------------------------------------------


async def test_required_tool_choice_calls_a_listed_tool_streaming_too(client):
    response = await client.chat.completions.create(
        model=MODEL_NAME, messages=TOOL_QUESTION, tools=[ADD_TOOL], tool_choice="required", max_tokens=60,
        extra_body={"parallelism": 2},
    )  # fmt: skip
    choice = response.choices[0]
    if choice.finish_reason == "tool_calls":  # a sample cut off by max_tokens is text, not a call
        assert choice.message.tool_calls and all(c.function.name == "add" for c in choice.message.tool_calls)
    stream = await client.chat.completions.create(
        model=MODEL_NAME, messages=TOOL_QUESTION, tools=[ADD_TOOL], max_tokens=40, stream=True,
        tool_choice={"type": "function", "function": {"name": "add"}}, extra_body={"parallelism": 2},
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]
    calls = [c for chunk in chunks for choice in chunk.choices for c in (choice.delta.tool_calls or [])]
    finishes = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert finishes == ["tool_calls"] and len(calls) == 1 and calls[0].function.name == "add"


async def test_auto_tool_choice_runs_on_the_default_set_up_and_is_refused_without_a_parser(
    client, engine, server_settings
):
    # The embedded model's template and its default parser (hermes): auto answers.
    response = await client.chat.completions.create(
        model=MODEL_NAME, messages=TOOL_QUESTION, tools=[ADD_TOOL], max_tokens=8
    )
    assert response.choices[0].finish_reason in {"stop", "length", "tool_calls"}
    async with serve(engine, with_parsers(server_settings, tool_call_parser=None)) as (url, _):
        no_parser = AsyncOpenAI(base_url=f"{url}/v1", api_key="none")
        with pytest.raises(openai.BadRequestError) as err:
            await no_parser.chat.completions.create(
                model=MODEL_NAME, messages=TOOL_QUESTION, tools=[ADD_TOOL], max_tokens=8
            )
        assert err.value.body["param"] == "tool_choice"
        # tool_choice none: the tools reach the template, the answer is text.
        response = await no_parser.chat.completions.create(
            model=MODEL_NAME, messages=TOOL_QUESTION, tools=[ADD_TOOL], tool_choice="none", max_tokens=4
        )
    assert response.choices[0].message.content is not None and response.choices[0].message.tool_calls is None


# -- on the real engine: vLLM's output parsers ------------------------------------------


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

    # The regex writes the text; no structural tag on top of it (vLLM's auto strict level).
    settings = with_parsers(
        server_settings, reasoning_parser="qwen3", tool_call_parser="hermes", tool_strict_level="auto"
    )
    async with serve(engine, settings) as (url, _):
        # Reasoning, then a call: the call is found in the final content only.
        response = await ask(
            url, f"<think>Answer: 9</think>{CALL}", 300, messages=TOOL_QUESTION, tools=[ADD_TOOL]
        )
        # A sample may answer in text instead: it votes with its answer.
        text = await ask(url, "<think>add</think>Answer: 5", 100, messages=TOOL_QUESTION, tools=[ADD_TOOL])
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


# -- Responses API on the real engine: the reasoning parser's item --------------------------


async def test_a_reasoning_parser_gives_a_reasoning_item_and_counts_its_tokens(engine, reasoning_settings):
    async with (
        serve(engine, reasoning_settings) as (url, _),
        AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600) as client,
    ):
        response = await client.responses.create(
            model=MODEL_NAME,
            input=QUESTION,
            temperature=1.0,
            extra_body={
                "parallelism": 4,
                "max_output_tokens": 30,
                "structured_outputs": {"regex": THINK_THEN_ANSWER},
            },
        )
    reasoning, message = response.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == "Answer: 9"
    assert message.type == "message" and response.output_text in set("01234")
    details = response.usage.output_tokens_details
    assert 0 < details.reasoning_tokens < response.usage.output_tokens
