"""OpenAIServing (server/serving.py): every check a request can fail, decided before it
takes an admission slot (404 for another model, 400 naming the field), the plan resolved with
the prompt count, and the reply shaped from the winning sample (its logprobs)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from server.errors import APIError
from server.protocol import ChatCompletionRequest, CompletionRequest
from tests.conftest import MODEL_NAME, wait_until
from tests.server.engine_double import Finish, ScriptedEngine
from tests.server.helpers import LONG, QUESTION, assert_openai_error, serve, settings_with, thinker_for


async def test_serving_resolves_the_plan_with_the_prompt_count():
    from server.config import EngineSettings, ServerSettings
    from server.serving import OpenAIServing

    engine = ScriptedEngine(lambda i: Finish("1"))
    engine.info = type("Info", (), {"name": "m"})()
    settings = ServerSettings(engine=EngineSettings(model="x", served_model_name="m"))
    serving = OpenAIServing(engine, thinker_for(engine), settings)
    chat = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], n=3)
    assert serving.plan(chat).minimum_samples == 3
    assert serving.plan(chat.model_copy(update={"parallelism": 4})).minimum_samples == 12
    assert serving.plan(CompletionRequest(model="m", prompt=["a", "b"], parallelism=2)).minimum_samples == 4
    assert serving.plan(CompletionRequest(model="m", prompt=[1, 2, 3])).minimum_samples == 1
    with pytest.raises(APIError) as err:
        serving.plan(chat.model_copy(update={"model": "other"}))
    assert err.value.status == 404


# -- every 400 before admission ---------------------------------------------------------


async def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        await client.chat.completions.create(model="no-such-model", messages=QUESTION)
    body = err.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model"
    assert body["type"] == "not_found_error" and "no-such-model" in body["message"]


async def test_max_parallelism_bounds_the_request(client):
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model=MODEL_NAME,
            messages=QUESTION,
            max_tokens=4,
            extra_body={"parallelism": 9, "max_parallelism": 4},
        )
    assert err.value.body["param"] == "parallelism"


@pytest.mark.parametrize(
    ("path", "body", "param", "code"),
    [
        ("chat", {"top_p": 0}, "top_p", "invalid_value"),
        ("chat", {"top_p": 1.5}, "top_p", "invalid_value"),
        ("chat", {"n": 1000}, "n", "invalid_value"),
        ("chat", {"max_parallelism": 0}, "max_parallelism", "invalid_value"),
        ("chat", {"max_tokens": 0}, "max_tokens", "invalid_value"),
        ("chat", {"max_tokens": "ten"}, "max_tokens", "invalid_value"),
        ("chat", {"temperature": "hot"}, "temperature", "invalid_value"),
        # vLLM fields t2serve does not honour (yet) are refused by name, never dropped.
        ("chat", {"prompt_logprobs": 1}, "prompt_logprobs", "unsupported_parameter"),
        ("chat", {"top_logprobs": 5}, "top_logprobs", "invalid_value"),  # without logprobs: true
        ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "invalid_value"),
        # A named tool_choice must name one of the tools.
        (
            "chat",
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
            None,
        ),
        ("chat", {"tool_choice": "required"}, "tool_choice", "invalid_value"),  # without tools
        ("chat", {"response_format": {"type": "json_schema"}}, "response_format", None),  # no schema
        ("chat", {"cache_salt": "tenant-1"}, "cache_salt", "unsupported_parameter"),
        ("chat", {"chat_template": "{{ messages }}"}, "chat_template", "unsupported_parameter"),
        ("chat", {"vllm_xargs": {"k": 1}}, "vllm_xargs", "unsupported_parameter"),
        ("chat", {"functions": [{"name": "f"}]}, "functions", "unsupported_parameter"),
        # vLLM's own checks on the sampling fields it builds.
        ("chat", {"repetition_penalty": -1}, "repetition_penalty", "invalid_value"),
        ("chat", {"min_tokens": 9, "max_tokens": 4}, "min_tokens", "invalid_value"),
        ("chat", {"seed": -1}, "seed", "invalid_value"),
        ("chat", {"top_k": 2**70}, "top_k", "invalid_value"),  # was a 500: msgpack caps at 2**64
        ("chat", {"timeout": 0}, "timeout", "invalid_value"),
        ("chat", {"temperature": 0, "parallelism": 3}, "temperature", "invalid_value"),
        ("chat", {"temperature": 0, "n": 2}, "temperature", "invalid_value"),
        ("chat", {"messages": "hi"}, "messages", "invalid_value"),
        ("chat", {"messages": [{}]}, "messages", "invalid_value"),
        ("chat", {"model": None}, "model", "invalid_value"),
        ("completions", {"prompt": []}, "prompt", "invalid_value"),
        ("completions", {"prompt": [[]]}, "prompt", None),
        ("completions", {"prompt": [10**9]}, "prompt", None),
        ("completions", {"prompt": [1] * 3000}, "prompt", "context_length_exceeded"),
        ("completions", {"prompt": "hi", "max_tokens": 10**6}, "max_tokens", "context_length_exceeded"),
        ("completions", {"prompt": "hi", "echo": True}, "echo", "unsupported_parameter"),
        ("completions", {"prompt": "hi", "logprobs": 21}, "logprobs", "invalid_value"),
        ("completions", {"prompt": "hi", "parallelism": 17}, "parallelism", "invalid_value"),
    ],
)
async def test_out_of_range_requests_get_400(server_url, path, body, param, code):
    base = {"model": MODEL_NAME, "max_tokens": 4}
    base |= {"messages": QUESTION} if path == "chat" else {}
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{server_url}/v1/{path.replace('chat', 'chat/completions')}", json=base | body
        )
    error = assert_openai_error(response, 400, code)
    assert error["type"] == "invalid_request_error"
    assert (error["param"] or "").startswith(param)


async def test_unsupported_vllm_fields_are_refused_by_name(client):
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model=MODEL_NAME,
            messages=QUESTION,
            max_tokens=4,
            extra_body={"cache_salt": "tenant-1"},
        )
    assert err.value.body["param"] == "cache_salt" and err.value.body["code"] == "unsupported_parameter"


async def test_a_schema_vllm_cannot_compile_is_a_400_naming_response_format(client):
    bad = {
        "type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nosuch"}}}},
    }
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(
                model=MODEL_NAME, messages=QUESTION, max_tokens=8, response_format=bad, stream=stream
            )
        assert err.value.body["param"] == "response_format"


async def test_an_aggregate_that_cannot_apply_is_refused(client):
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model=MODEL_NAME,
            messages=QUESTION,
            max_tokens=8,
            response_format={"type": "json_object"},
            extra_body={"aggregate": "consensus"},
        )
    assert err.value.body["param"] == "aggregate"
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model=MODEL_NAME, messages=QUESTION, max_tokens=8, extra_body={"aggregate": "vibes"}
        )
    assert "aggregate" in str(err.value.body)


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        # The prompt is longer than the model's context: found when the prompt is rendered.
        (
            {"messages": [{"role": "user", "content": "seven " * 20_000}]},
            "messages",
            "context_length_exceeded",
        ),
        # vLLM's own checks of the built params (a log-prob count past its limit).
        ({"logprobs": True, "top_logprobs": 10_000}, "top_logprobs", "invalid_value"),
        # An aggregate that cannot apply to a constrained output.
        (
            {"response_format": {"type": "json_object"}, "aggregate": "consensus"},
            "aggregate",
            "invalid_value",
        ),
    ],
)
async def test_every_400_is_decided_before_the_request_queues(engine, server_settings, fields, param, code):
    # The server is full and its queue never times out: a request that waited for a slot
    # would still be waiting when the test looks.
    settings = settings_with(server_settings, max_concurrent_requests=1, max_queue=2, queue_timeout_s=3600)
    running = {"model": MODEL_NAME, "messages": QUESTION, "parallelism": 2, **LONG}
    chat = "/v1/chat/completions"
    async with serve(engine, settings) as (url, app), httpx.AsyncClient(timeout=None) as http:
        admission = app.state.admission
        holder = asyncio.ensure_future(http.post(f"{url}{chat}", json=running))
        assert await wait_until(lambda: admission.active == 1)
        body = {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 2, "parallelism": 1, **fields}
        refused = asyncio.ensure_future(http.post(f"{url}{chat}", json=body))
        assert await wait_until(lambda: refused.done() or admission.queued > 0)
        assert admission.queued == 0 and refused.done()
        error = assert_openai_error(refused.result(), 400, code)
        assert error["param"] == param
        holder.cancel()
        assert await wait_until(lambda: admission.active == 0 and engine.num_unfinished_requests() == 0)


# -- the reply --------------------------------------------------------------------------


async def test_chat_logprobs_are_the_winning_samples_own(client):
    response = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=QUESTION,
        max_tokens=8,
        temperature=1.0,
        seed=5,
        logprobs=True,
        top_logprobs=2,
        extra_body={"parallelism": 3},
    )
    choice = response.choices[0]
    content = choice.logprobs.content
    # As vLLM's server does, the tokens include the end-of-sequence token the text omits.
    joined = "".join(t.token for t in content)
    assert joined == choice.message.content or (
        choice.finish_reason == "stop" and joined == choice.message.content + content[-1].token
    )
    for token in content:
        assert token.logprob <= 0 and len(token.top_logprobs) == 2
        assert token.top_logprobs[0].logprob >= token.logprob - 1e-6  # best alternative first
    # The usage still counts every sample; only the winner's tokens carry logprobs.
    assert response.usage.completion_tokens >= len(content)


async def test_completion_logprobs(client):
    response = await client.completions.create(
        model=MODEL_NAME, prompt="Two plus two is", max_tokens=5, logprobs=2, extra_body={"parallelism": 2}
    )
    choice = response.choices[0]
    # As in vLLM's server, a sample that ends at EOS lists the EOS token too (its text does not).
    joined = "".join(choice.logprobs.tokens)
    assert joined == choice.text or (choice.finish_reason == "stop" and joined == choice.text + "<|im_end|>")
    assert (
        len(choice.logprobs.token_logprobs)
        == len(choice.logprobs.tokens)
        == len(choice.logprobs.top_logprobs)
    )
    assert all(len(top) >= 2 for top in choice.logprobs.top_logprobs)
