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
    from server.engine import cpu_has_native_bf16

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
    assert after["t2serve_estimator_info{identity=,layers=,n_max=4}"] == 1


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
