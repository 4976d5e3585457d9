"""The whole app end to end (server/app.py): the real uvicorn server on loopback, the real
engine, the official OpenAI SDK. Its routes (models, health, metrics), chat and completions
plain and streamed, the metrics one request leaves, and a head that cannot load."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from server.voting import extract_answer
from tests.conftest import MODEL_NAME
from tests.server.helpers import QUESTION, metric, scrape, serve, settings_with


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


# The session server has no head: the estimator info checked here is the last started
# server's, so this runs before any test that starts one with a head (test_estimate).
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
    # No head: the info names only N_max and the policy `auto` runs, as /v1/models names it.
    async with httpx.AsyncClient() as http:
        policy = (await http.get(f"{server_url}/v1/models")).json()["data"][0]["t2_policy"]["policy"]
    info = {k: v for k, v in after.items() if k.startswith("t2serve_estimator_info{")}
    assert info == {
        f"t2serve_estimator_info{{identity=,layers=,margin=,n_max=4,policy={policy},spec=,version=}}": 1
    }


# -- estimator head fallback ------------------------------------------------------------


@pytest.mark.parametrize("broken", ["other_model", "corrupt", "missing"])
async def test_unusable_head_falls_back_to_default_n(engine, server_settings, tmp_path, broken):
    from estimator.head import DEFAULT_HEAD

    head = tmp_path / "head"
    if broken != "missing":
        meta = json.loads(DEFAULT_HEAD.with_suffix(".json").read_text())
        if broken == "other_model":
            meta["model_fingerprint"] = "0123456789abcdef"
        head.with_suffix(".json").write_text(json.dumps(meta))
        if broken == "corrupt":
            head.with_suffix(".safetensors").write_bytes(b"not a tensor file")
        else:
            shutil.copy(DEFAULT_HEAD.with_suffix(".safetensors"), head.with_suffix(".safetensors"))
    parallelism = server_settings.parallelism.model_copy(update={"estimator_head": str(head)})
    settings = settings_with(server_settings, parallelism=parallelism)
    before = metric("t2serve_estimator_fallbacks_total", reason="load")
    async with serve(engine, settings) as (url, _), httpx.AsyncClient(timeout=None) as http:
        health = await http.get(f"{url}/health")
        response = await http.post(
            f"{url}/v1/chat/completions", json={"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 3}
        )
    assert health.status_code == 200
    assert response.status_code == 200, response.text
    t2 = response.json()["t2"]
    assert t2["estimator"] == "default" and t2["n_used"] == parallelism.default_parallelism
    assert metric("t2serve_estimator_fallbacks_total", reason="load") == before + 1
