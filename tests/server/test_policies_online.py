"""Stopping policies online: the real server and engine, the official OpenAI SDK, the
request's `policy` extension field. After each request no sample may be left in the engine."""

from __future__ import annotations

import openai
import pytest

from estimator.offline.inputs.problems import PROMPT_SUFFIX
from tests.conftest import MODEL_NAME, wait_until
from tests.server.helpers import scrape

QUESTION = [{"role": "user", "content": "What is 2 + 3? Reply with just the number."}]


async def ask(client, policy: str | None, **fields):
    fields = {"max_tokens": 8, "temperature": 1.0, "seed": 5, **fields}
    extra = {"policy": policy} if policy is not None else {}
    response = await client.chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, extra_body=extra, **fields
    )
    return response, response.model_extra["t2"]


async def assert_engine_idle(engine) -> None:
    assert await wait_until(lambda: engine.num_unfinished_requests() == 0)


def assert_counts(t2: dict, cap: int) -> None:
    assert t2["launched"] == t2["finished"] + t2["aborted"]
    assert 1 <= t2["finished"] <= t2["launched"] <= cap
    assert t2["samples"] == t2["finished"]


async def test_default_policy_is_t2_and_runs_everything(client, engine, server_settings):
    _, t2 = await ask(client, None)
    default_n = server_settings.parallelism.default_parallelism
    assert t2["policy"] == "t2:margin=1.5"  # no head here: t2 falls back to the default N
    assert t2["launched"] == t2["finished"] == default_n and t2["aborted"] == 0
    await assert_engine_idle(engine)


async def test_esc_launches_whole_windows_per_choice(client, engine):
    response, t2 = await ask(client, "esc:window=2,max=6", n=2)
    assert t2["policy"] == "esc:window=2,max=6" and t2["mode"] == "auto"
    assert_counts(t2, cap=2 * 6)
    assert t2["launched"] % 2 == 0 and len(t2["choices"]) == len(response.choices) == 2
    # Every voted sample's tokens are paid for, and at most max_tokens each.
    assert t2["finished"] <= response.usage.completion_tokens <= 8 * t2["launched"]
    await assert_engine_idle(engine)


async def test_adaptive_consistency_stops_when_the_answers_agree(client, engine):
    # Nearly greedy: the samples give the same answer, so ac-beta at c=0.9 stops at 3
    # unanimous votes (P(Bin(4, 1/2) <= 3) = 15/16), long before its max of 8.
    _, t2 = await ask(client, "ac-beta:c=0.9,max=8", temperature=0.01, max_tokens=6)
    assert t2["policy"] == "ac-beta:c=0.9,max=8"
    assert_counts(t2, cap=8)
    assert t2["answer"] is not None and t2["agreement"] == 1.0
    assert t2["launched"] == t2["finished"] == 3 and t2["aborted"] == 0
    await assert_engine_idle(engine)


async def test_composition_aborts_running_samples_once_decided(client, engine, server_url, server_settings):
    # The composition launches the T2 estimate (the default N, no head here) at once; at
    # c=0.7 the first sample with an answer decides the vote (P(Bin(2, 1/2) <= 1) = 3/4), so
    # the others are aborted in the engine, and their tokens still count in usage.
    before = await scrape(server_url)
    response, t2 = await ask(client, "t2+beta:c=0.7", temperature=0.01, max_tokens=12)
    after = await scrape(server_url)
    default_n = server_settings.parallelism.default_parallelism
    assert t2["policy"].startswith("t2+beta:c=0.7")
    assert_counts(t2, cap=default_n)
    assert t2["launched"] == default_n and t2["finished"] == 1 and t2["aborted"] == default_n - 1
    assert response.usage.completion_tokens >= t2["finished"]

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("t2serve_samples_aborted_total{}") == t2["aborted"]
    assert delta("t2serve_samples_dispatched_total{}") == t2["launched"]
    assert delta("t2serve_policy_requests_total{policy=t2+beta}") == 1
    assert delta("t2serve_generated_tokens_total{}") == response.usage.completion_tokens
    await assert_engine_idle(engine)


async def test_integer_parallelism_overrides_the_policy(client, engine):
    response = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=QUESTION,
        max_tokens=6,
        temperature=1.0,
        extra_body={"parallelism": 3, "policy": "esc:window=2"},
    )
    t2 = response.model_extra["t2"]
    assert t2["mode"] == "fixed" and t2["policy"] == "fixed:n=3" and t2["launched"] == 3
    await assert_engine_idle(engine)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("greedy", "unknown policy"),
        ("esc:window=0", "window must be >= 1"),
        ("ac:c=2", "c must lie in (0, 1)"),
        ("t2+learned", "needs a stopping table"),  # this server runs without a head
    ],
)
async def test_bad_policy_is_a_400(client, spec, message):
    with pytest.raises(openai.BadRequestError) as err:
        await ask(client, spec)
    assert err.value.status_code == 400
    assert err.value.body["param"] == "policy" and err.value.body["code"] == "invalid_value"
    assert message in err.value.body["message"]


async def test_learned_stopping_runs_with_the_shipped_head(engine, server_settings):
    """t2+learned on the real engine with the head shipped for the embedded model, whose
    stopping table `t2serve train` fitted: a hopeless-looking vote may stop at one sample, an
    undecided one goes on one at a time; never past the cap, nothing left in the engine."""
    import uuid

    from vllm import SamplingParams

    from estimator.head import DEFAULT_HEAD, T2Head
    from estimator.policies import Tally
    from server.parallel import ParallelThinker
    from server.prompts import render_chat

    head = T2Head.load(DEFAULT_HEAD)
    assert head.stopping is not None and head.stopping.n_max == head.meta.n_max
    thinker = ParallelThinker(engine, server_settings.parallelism, estimator=head)
    # A question like the head's training ones, so its gate trusts the prediction.
    ids = render_chat(engine.tokenizer, [{"role": "user", "content": "What is 7 + 5?" + PROMPT_SUFFIX}])
    result = await thinker.run(
        ids,
        SamplingParams(max_tokens=8, temperature=0.3, seed=5),
        thinker.plan(policy="t2+learned:cost=0.001,margin=0.5", temperature=0.3),  # the head's T
        request_id=uuid.uuid4().hex,
    )
    assert result.policy == "t2+learned:cost=0.001,margin=0.5" and result.estimate.prediction is not None
    assert result.estimate.gate == "answerable"
    assert 1 <= result.samples <= result.launched <= result.max_parallelism
    assert result.launched == result.samples + result.aborted
    # What the table said at the end: stop (or nothing left to launch under the cap).
    tally = Tally()
    for sample in result.choices[0].samples:
        tally.add(sample.answer)
    assert head.stopping.should_stop(head.meta.n_max * result.estimate.prediction, tally.state(), 0.001) or (
        result.launched == result.max_parallelism
    )
    await assert_engine_idle(engine)


async def test_deadline_aborts_an_adaptive_policys_samples(client, engine, server_url):
    # 1900 tokens past end-of-sequence: no sample can finish within the 1 s deadline on any
    # machine, so the request fails with 504 and every sample is aborted in the engine.
    # (The partial vote at a deadline is checked in test_parallel.)
    before = await scrape(server_url)
    body = {"policy": "esc:window=2,max=4", "ignore_eos": True, "timeout": 1.0}
    with pytest.raises(openai.APIStatusError) as err:
        await client.chat.completions.create(
            model=MODEL_NAME, messages=QUESTION, max_tokens=1900, temperature=1.0, extra_body=body
        )
    assert err.value.status_code == 504 and err.value.body["code"] == "request_timeout"
    await assert_engine_idle(engine)
    after = await scrape(server_url)
    failed = "t2serve_request_timeouts_total{outcome=failed}"
    assert after[failed] - before.get(failed, 0.0) == 1
    assert after["t2serve_samples_in_flight{}"] == 0


async def test_a_request_at_another_temperature_gets_the_default_n_not_the_heads_guess(
    engine, server_settings
):
    """The shipped head's labels were sampled at T = 0.3; at T = 1.0 its N* is a guess for
    another distribution (README "Sampling setup"): `auto` uses the default N, says why in
    t2, and counts it."""
    import uuid

    from vllm import SamplingParams

    from estimator.head import DEFAULT_HEAD, T2Head
    from server import metrics
    from server.parallel import ParallelThinker
    from server.prompts import render_chat
    from server.result import record, t2_info

    head = T2Head.load(DEFAULT_HEAD)
    assert head.sampling["temperature"] == 0.3
    settings = server_settings.parallelism
    ids = render_chat(engine.tokenizer, [{"role": "user", "content": "What is 3 + 4?" + PROMPT_SUFFIX}])
    counter = metrics.ESTIMATOR_FALLBACKS.labels("temperature")
    for tolerance, temperature, falls_back in ((0.2, 1.0, True), (0.2, 0.4, False), (None, 1.0, False)):
        thinker = ParallelThinker(
            engine, settings.model_copy(update={"estimator_temperature_tolerance": tolerance}), estimator=head
        )
        before = counter._value.get()
        result = await thinker.run(
            ids,
            SamplingParams(max_tokens=4, temperature=temperature, seed=1),
            thinker.plan(temperature=temperature),
            request_id=uuid.uuid4().hex,
        )
        record(result)
        info = t2_info([result])
        if falls_back:
            assert info.estimator_fallback == "temperature" and info.prediction is None
            assert result.n_used == settings.default_parallelism
            assert counter._value.get() == before + 1
        else:
            assert info.estimator_fallback is None and info.prediction is not None
            assert counter._value.get() == before
