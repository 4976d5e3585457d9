"""End to end: the real uvicorn server on loopback, the real engine, the official OpenAI SDK."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from server.voting import extract_answer
from tests.conftest import MODEL_NAME, wait_until

QUESTION = [{"role": "user", "content": "What is 2 + 3? Reply with just the number."}]


async def test_models(client):
    models = await client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


async def test_the_engine_runs_in_the_fast_dtype_for_this_cpu(client, server_url):
    from server.engine.platform import cpu_has_native_bf16

    # `--dtype auto` on an x86 CPU: bf16 only with native bf16 kernels, else float32.
    expected = "bfloat16" if cpu_has_native_bf16() else "float32"
    (card,) = (await client.models.list()).data
    assert card.model_extra["dtype"] == expected
    info = await scrape(server_url)
    assert info[f"t2serve_engine_info{{device=cpu,dtype={expected},mode=compiled}}"] == 1


async def test_health_and_metrics(server_url):
    async with httpx.AsyncClient() as http:
        health = await http.get(f"{server_url}/health")
        assert health.status_code == 200 and health.json() == {"status": "ok"}
        text = (await http.get(f"{server_url}/metrics")).text
    assert "t2serve_requests_total" in text
    assert "t2serve_samples_dispatched_total" in text
    assert "vllm:" in text  # the engine's own metrics on the same endpoint


async def test_chat_auto_uses_default_parallelism(client, server_settings):
    response = await client.chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, max_tokens=12, temperature=0.8
    )
    t2 = response.model_extra["t2"]
    default_n = server_settings.parallelism.default_parallelism
    assert t2["mode"] == "auto" and t2["n_used"] == default_n and t2["samples"] == default_n
    assert t2["capture_ms"] is not None and t2["capture_ms"] > 0
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason in {"stop", "length"}
    assert response.usage.prompt_tokens > 0
    # usage counts every sample's tokens: at least one per sample, at most max_tokens each.
    assert default_n <= response.usage.completion_tokens <= 12 * default_n
    votes = t2["votes"]
    if t2["answer"] is not None:
        assert votes[t2["answer"]] == max(votes.values())
        assert t2["agreement"] == pytest.approx(votes[t2["answer"]] / sum(votes.values()))


async def test_chat_fixed_parallelism_and_choices(client):
    response = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=QUESTION,
        max_tokens=8,
        temperature=1.0,
        n=2,
        seed=11,
        extra_body={"parallelism": 3},
    )
    t2 = response.model_extra["t2"]
    assert len(response.choices) == 2 and [c.index for c in response.choices] == [0, 1]
    assert t2["mode"] == "fixed" and t2["n_used"] == 3 and t2["samples"] == 6
    assert len(t2["choices"]) == 2
    assert 6 <= response.usage.completion_tokens <= 48


async def test_max_parallelism_bounds_the_request(client):
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model=MODEL_NAME,
            messages=QUESTION,
            max_tokens=4,
            extra_body={"parallelism": 9, "max_parallelism": 4},
        )
    assert err.value.body["param"] == "parallelism"


async def test_completion(client):
    response = await client.completions.create(
        model=MODEL_NAME,
        prompt="Question: 4 + 4 = ?\nAnswer:",
        max_tokens=6,
        temperature=0.7,
        extra_body={"parallelism": 2},
    )
    assert response.object == "text_completion"
    t2 = response.model_extra["t2"]
    assert len(response.choices) == 1 and t2["samples"] == 2
    assert response.choices[0].finish_reason in {"stop", "length"}
    assert extract_answer(response.choices[0].text) == t2["answer"]


async def test_completion_several_prompts(client):
    response = await client.completions.create(
        model=MODEL_NAME, prompt=["1 + 1 =", "2 + 2 ="], max_tokens=4, n=2, extra_body={"parallelism": 2}
    )
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.model_extra["t2"]["samples"] == 8


async def test_chat_streaming(client):
    stream = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=QUESTION,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"parallelism": 3},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes and finishes[-1] in {"stop", "length"}
    t2 = [c.model_extra.get("t2") for c in chunks if c.model_extra.get("t2")]
    assert len(t2) == 1 and t2[0]["samples"] == 3
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 3
    assert content and extract_answer(content) == t2[0].get("answer")  # None is left out of chunks


async def test_completion_streaming(client):
    stream = await client.completions.create(
        model=MODEL_NAME,
        prompt="The capital of France is",
        max_tokens=5,
        stream=True,
        extra_body={"parallelism": 2},
    )
    chunks = [chunk async for chunk in stream]
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)


async def test_streamed_text_equals_winner_with_seed(client):
    kwargs = dict(
        model=MODEL_NAME,
        messages=QUESTION,
        max_tokens=10,
        temperature=0.9,
        seed=5,
        extra_body={"parallelism": 3},
    )
    whole = await client.chat.completions.create(**kwargs)
    stream = await client.chat.completions.create(stream=True, **kwargs)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == whole.choices[0].message.content


async def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        await client.chat.completions.create(model="no-such-model", messages=QUESTION)
    body = err.value.body
    assert body["code"] == "model_not_found" and body["param"] == "model"
    assert body["type"] == "not_found_error" and "no-such-model" in body["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": QUESTION, "temperature": 5}, "temperature"),
        ({"messages": QUESTION, "n": 0}, "n"),
        ({"messages": QUESTION, "parallelism": 0}, "parallelism"),
        ({"messages": QUESTION, "parallelism": "many"}, "parallelism"),
        ({"messages": QUESTION, "max_tokens": 100_000}, "max_tokens"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ],
)
async def test_bad_requests_get_openai_errors(server_url, body, param):
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{server_url}/v1/chat/completions", json={"model": MODEL_NAME, **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param.split(".")[0])


async def test_invalid_json(server_url):
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{server_url}/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


async def test_client_disconnect_aborts_samples(server_url, engine):
    body = {
        "model": MODEL_NAME,
        "messages": QUESTION,
        "max_tokens": 1500,
        "ignore_eos": True,
        "parallelism": 4,
        "temperature": 1.0,
    }
    async with httpx.AsyncClient(timeout=None) as http:
        request = asyncio.ensure_future(http.post(f"{server_url}/v1/chat/completions", json=body))
        await wait_until(lambda: engine.num_unfinished_requests() >= 4)
        assert engine.num_unfinished_requests() >= 4  # all four samples are running
        request.cancel()  # the client goes away mid-request
        with pytest.raises(asyncio.CancelledError):
            await request
    # 4 x 1500 tokens would take minutes here; the abort takes well under a few seconds.
    await wait_until(lambda: engine.num_unfinished_requests() == 0)
    assert engine.num_unfinished_requests() == 0


async def test_client_disconnect_mid_stream_aborts_samples(server_url, engine):
    body = {
        "model": MODEL_NAME,
        "messages": QUESTION,
        "max_tokens": 1500,
        "ignore_eos": True,
        "parallelism": 3,
        "stream": True,
    }
    async with (
        httpx.AsyncClient(timeout=None) as http,
        http.stream("POST", f"{server_url}/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        lines = response.aiter_lines()  # keep the iterator: dropping it closes the stream
        assert (await lines.__anext__()).startswith("data:")  # the role chunk: samples are running
        await wait_until(lambda: engine.num_unfinished_requests() >= 3)
        assert engine.num_unfinished_requests() >= 3
    await wait_until(lambda: engine.num_unfinished_requests() == 0)
    assert engine.num_unfinished_requests() == 0


async def scrape(server_url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{server_url}/metrics")).text
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}"] = sample.value
    return values


async def test_metrics_count_samples_and_baseline(client, server_url, server_settings):
    before = await scrape(server_url)
    response = await client.chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, max_tokens=6, n=2, extra_body={"parallelism": 3}
    )
    after = await scrape(server_url)
    t2 = response.model_extra["t2"]

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("t2serve_samples_dispatched_total{}") == t2["samples"] == 6
    # Baseline: what fixed N_max (here the default N, no head) would have dispatched per choice.
    assert delta("t2serve_samples_baseline_total{}") == server_settings.parallelism.default_parallelism * 2
    assert delta("t2serve_generated_tokens_total{}") == response.usage.completion_tokens
    assert delta("t2serve_requests_total{endpoint=chat,mode=fixed,outcome=ok}") == 1
    assert delta("t2serve_time_to_first_token_seconds_count{endpoint=chat}") == 1
    assert delta("t2serve_chosen_parallelism_count{}") == 1
    assert sum(delta(f"t2serve_votes_total{{outcome={o}}}") for o in ("decided", "tie", "no_answer")) == 2
    assert after["t2serve_samples_in_flight{}"] == 0 and after["t2serve_requests_in_flight{}"] == 0
    assert after["t2serve_estimator_info{identity=,layers=,margin=,n_max=4}"] == 1


@pytest.mark.parametrize(
    "extra",
    [{"parallelism": 3}, {"parallelism": "auto"}, {"policy": "esc:window=2,max=4"}],
    ids=["fixed", "auto", "esc"],
)
async def test_every_returned_choice_states_its_votes_answer(client, extra):
    """The core invariant: the content a choice returns is a sample whose extracted answer
    is the answer its vote chose (or no answer, when no sample had one)."""
    arithmetic = [{"role": "user", "content": "What is 6 + 7? Think, then give the answer."}]
    chat = await client.chat.completions.create(
        model=MODEL_NAME, messages=arithmetic, max_tokens=24, temperature=1.0, n=2, seed=4, extra_body=extra
    )
    votes = chat.model_extra["t2"]["choices"]
    assert len(chat.choices) == len(votes) == 2
    for choice, vote in zip(chat.choices, votes, strict=True):
        assert extract_answer(choice.message.content) == vote["answer"]
    completion = await client.completions.create(
        model=MODEL_NAME, prompt=["3 + 4 =", "10 - 8 ="], max_tokens=8, temperature=1.0, n=2, extra_body=extra
    )
    votes = completion.model_extra["t2"]["choices"]
    assert len(completion.choices) == len(votes) == 4
    for choice, vote in zip(completion.choices, votes, strict=True):
        assert extract_answer(choice.text) == vote["answer"]


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


async def test_unsupported_vllm_fields_are_refused_by_name(client):
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model=MODEL_NAME,
            messages=QUESTION,
            max_tokens=4,
            extra_body={"cache_salt": "tenant-1"},
        )
    assert err.value.body["param"] == "cache_salt" and err.value.body["code"] == "unsupported_parameter"


async def test_template_fields_and_tool_messages_reach_the_chat_template(client):
    """`add_generation_prompt` / `continue_final_message` change the rendered prompt, and an
    assistant turn with `tool_calls` plus a `tool` reply render without error."""
    base = await client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=1)
    bare = await client.chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, max_tokens=1, extra_body={"add_generation_prompt": False}
    )
    assert bare.usage.prompt_tokens < base.usage.prompt_tokens
    resumed = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[*QUESTION, {"role": "assistant", "content": "The answer is"}],
        max_tokens=1,
        extra_body={"add_generation_prompt": False, "continue_final_message": True},
    )
    assert resumed.usage.prompt_tokens > bare.usage.prompt_tokens
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    turn = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[
            *QUESTION,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        ],
        max_tokens=2,
    )
    assert turn.choices[0].message.content is not None


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


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


async def test_json_schema_constrains_every_sample_and_votes_on_canonical_json(
    client, engine, server_settings
):
    import json

    import jsonschema
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from server.aggregation import canonical_json
    from server.parallel import ParallelThinker

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    response = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Describe a person as JSON."}],
        max_tokens=100,
        temperature=1.0,
        seed=1,
        response_format=fmt,
        extra_body={"parallelism": 4},
    )
    t2 = response.model_extra["t2"]
    assert t2["aggregate"] == "json" and t2["n_used"] == 4
    jsonschema.validate(json.loads(response.choices[0].message.content), PERSON)
    assert t2["answer"] == canonical_json(response.choices[0].message.content)
    for key in t2["votes"]:  # every vote key is a canonical, schema-valid object
        jsonschema.validate(json.loads(key), PERSON)
        assert canonical_json(key) == key

    # Every sample of such a vote is constrained (thinker level: all samples visible).
    thinker = ParallelThinker(engine, server_settings.parallelism)
    ids = list(engine.tokenizer.encode("A person as JSON:"))
    params = SamplingParams(
        max_tokens=100, temperature=1.0, seed=2, structured_outputs=StructuredOutputsParams(json=PERSON)
    )
    result = await thinker.run(ids, params, thinker.plan(4), request_id="json-vote")
    samples = result.choices[0].samples
    assert len(samples) == 4 and result.aggregate == "json"
    for sample in samples:
        if sample.finish_reason == "stop":
            jsonschema.validate(json.loads(sample.text), PERSON)
            assert sample.answer == canonical_json(sample.text)


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


async def test_structured_outputs_choice_votes_on_the_choice(client):
    response = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "Is the sky blue? Answer yes or no."}],
        max_tokens=4,
        temperature=1.0,
        extra_body={"parallelism": 3, "structured_outputs": {"choice": ["yes", "no"]}},
    )
    t2 = response.model_extra["t2"]
    assert t2["aggregate"] == "exact" and set(t2["votes"]) <= {"yes", "no"} and sum(t2["votes"].values()) == 3
    assert response.choices[0].message.content in ("yes", "no")


ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOL_QUESTION = [{"role": "user", "content": "What is 2 + 3? Use the add tool."}]


async def test_a_named_tool_choice_returns_one_voted_schema_valid_call(client):
    import json

    import jsonschema

    from server.aggregation import canonical_calls

    response = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=TOOL_QUESTION,
        tools=[ADD],
        tool_choice={"type": "function", "function": {"name": "add"}},
        max_tokens=40,
        temperature=1.0,
        seed=3,
        extra_body={"parallelism": 4},
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "add" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, ADD["function"]["parameters"])
    t2 = response.model_extra["t2"]
    assert t2["aggregate"] == "json" and t2["n_used"] == 4
    # The vote is over canonical calls: name + normalised arguments, whatever the spacing.
    assert t2["answer"] == canonical_calls([call.model_dump()])
    for key in t2["votes"]:
        (voted,) = json.loads(key.removeprefix("calls:"))
        assert voted["name"] == "add"
        jsonschema.validate(voted["arguments"], ADD["function"]["parameters"])


async def test_required_tool_choice_calls_a_listed_tool_streaming_too(client):
    response = await client.chat.completions.create(
        model=MODEL_NAME, messages=TOOL_QUESTION, tools=[ADD], tool_choice="required", max_tokens=60,
        extra_body={"parallelism": 2},
    )  # fmt: skip
    choice = response.choices[0]
    if choice.finish_reason == "tool_calls":  # a sample cut off by max_tokens is text, not a call
        assert choice.message.tool_calls and all(c.function.name == "add" for c in choice.message.tool_calls)
    stream = await client.chat.completions.create(
        model=MODEL_NAME, messages=TOOL_QUESTION, tools=[ADD], max_tokens=40, stream=True,
        tool_choice={"type": "function", "function": {"name": "add"}}, extra_body={"parallelism": 2},
    )  # fmt: skip
    chunks = [chunk async for chunk in stream]
    calls = [c for chunk in chunks for choice in chunk.choices for c in (choice.delta.tool_calls or [])]
    finishes = [choice.finish_reason for chunk in chunks for choice in chunk.choices if choice.finish_reason]
    assert finishes == ["tool_calls"] and len(calls) == 1 and calls[0].function.name == "add"


async def test_auto_tool_choice_is_refused_without_a_tool_call_parser(client):
    with pytest.raises(openai.BadRequestError) as err:
        await client.chat.completions.create(
            model=MODEL_NAME, messages=TOOL_QUESTION, tools=[ADD], max_tokens=8
        )
    assert err.value.body["param"] == "tool_choice"
    # tool_choice none: the tools reach the template, the answer is text.
    response = await client.chat.completions.create(
        model=MODEL_NAME, messages=TOOL_QUESTION, tools=[ADD], tool_choice="none", max_tokens=4
    )
    assert response.choices[0].message.content is not None and response.choices[0].message.tool_calls is None
