"""The orchestration loop (server/parallel.py) against a scripted engine
(tests/server/engine_double.py): plans, launches, stopping, deadlines, the load cap. Every
outcome is driven by events, never by the clock. Then the same deadlines on the real engine
(a 504, a partial vote), and a greedy request's single sample; stopping policies on the real
engine are in test_policies_online."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from estimator.policies import ESC, Fixed
from server.config import ParallelismSettings
from server.errors import APIError
from server.parallel import Deadline, ParallelThinker
from tests.conftest import MODEL_NAME, wait_until
from tests.server.engine_double import Finish, Hang, ScriptedEngine
from tests.server.helpers import (
    PROMPT,
    QUESTION,
    FirstSampleQuick,
    assert_openai_error,
    metric,
    params,
    thinker_for,
)


def answers(result, choice: int = 0) -> list[str | None]:
    return [s.answer for s in result.choices[choice].samples]


# -- plans --------------------------------------------------------------------------------


def test_t2_margin_is_the_flag_else_the_heads_own_else_the_default():
    from estimator.head import DEFAULT_MARGIN, HeadMeta, LayerProbes, T2Head
    from estimator.policies import T2

    def head(margin):
        meta = HeadMeta("m", 2, 8, 16, 1 / 8, layers=[1], weights=[1.0], margin=margin)
        return T2Head(LayerProbes(2, 8), meta)

    settings = ParallelismSettings()
    assert ParallelThinker(None, settings, estimator=head(1.375)).margin == 1.375
    assert ParallelThinker(None, settings, estimator=head(None)).margin == DEFAULT_MARGIN
    assert ParallelThinker(None, settings).margin == DEFAULT_MARGIN
    flagged = ParallelThinker(None, ParallelismSettings(estimator_margin=2.0), estimator=head(1.375))
    assert flagged.margin == 2.0
    # It is the margin `auto` runs T2 at, and the one a spec without `margin=` gets.
    thinker = ParallelThinker(None, settings, estimator=head(1.375))
    assert thinker.default_policy == T2(1.375) and thinker.parse_policy("t2+beta").margin == 1.375


def test_plan_resolves_once_what_a_request_asks_for():
    thinker = thinker_for(None)
    fixed = thinker.plan(3, n_choices=2, prompts=2, policy="esc:window=2")
    assert fixed.mode == "fixed" and fixed.policy == Fixed(3) and fixed.minimum_samples == 12
    auto = thinker.plan("auto", max_parallelism=8, policy="esc:window=2", n_choices=3)
    assert (
        auto.mode == "auto" and isinstance(auto.policy, ESC) and auto.cap == 8 and auto.minimum_samples == 3
    )
    assert thinker.plan(None, max_parallelism=99).cap == 16  # bounded by the server's cap
    for bad, param in [
        (dict(parallelism=17), "parallelism"),
        (dict(parallelism=2, policy="nope"), "policy"),
        (dict(parallelism=2, temperature=0.0), "temperature"),
        (dict(n_choices=2, temperature=0.0), "temperature"),
    ]:
        with pytest.raises(APIError) as err:
            thinker.plan(**bad)
        assert err.value.status == 400 and err.value.param == param
    assert thinker.plan(temperature=0.0).greedy


# -- launching and voting -----------------------------------------------------------------


async def test_fixed_n_is_one_n_k_request_per_choice_with_seeds_spread():
    engine = ScriptedEngine(lambda i: Finish("7" if i % 3 else "5"))
    thinker = thinker_for(engine)
    result = await thinker.run(PROMPT, params(seed=10), thinker.plan(3, n_choices=2), request_id="r")
    assert sorted((r.params.n, r.params.seed) for r in engine.requests.values()) == [(3, 10), (3, 13)]
    assert answers(result, 0) == ["5", "7", "7"] and answers(result, 1) == ["5", "7", "7"]
    assert result.choices[0].vote.answer == "7" and result.launched == 6 and result.aborted == 0
    assert result.estimate.capture_ms is None  # a fixed N reads no states: nothing captured
    assert thinker.samples_in_flight == 0


async def test_auto_captures_sample_zero_then_launches_the_rest():
    engine = ScriptedEngine(lambda i: Finish(str(i)))
    thinker = thinker_for(engine)
    result = await thinker.run(PROMPT, params(seed=0), thinker.plan("auto"), request_id="r")
    sizes = {r.request_id: r.params.n for r in engine.requests.values()}
    assert sizes == {"r-s0": 1, "r-s1": 3}  # default N = 4: sample 0 alone, the rest as one request
    assert (
        result.estimate.states is not None and result.estimate.capture_ms is not None and result.n_used == 4
    )
    assert [s.number for s in result.choices[0].samples] == [0, 1, 2, 3]  # voted in launch order


async def test_missing_states_fall_back_to_the_default_n():
    engine = ScriptedEngine(lambda i: Finish("2"), states=False)
    engine.settings.capture_timeout_s = 60.0  # sample 0 ending must end the wait, not the timer
    thinker = thinker_for(engine)
    result = await thinker.run(PROMPT, params(), thinker.plan("auto"), request_id="r")
    assert result.estimate.states is None and result.estimate.prediction is None and result.n_used == 4


async def test_esc_stops_on_a_unanimous_window_and_aborts_nothing_more():
    script = ["1", "2", "3", "3"]
    engine = ScriptedEngine(lambda i: Finish(script[i]))
    thinker = thinker_for(engine)
    result = await thinker.run(PROMPT, params(), thinker.plan(policy="esc:window=2,max=8"), request_id="r")
    assert all(r.params.n == 1 for r in engine.requests.values())  # adaptive: one request a sample
    assert result.launched == 4 and answers(result) == ["1", "2", "3", "3"]
    assert result.choices[0].vote.answer == "3" and result.aborted == 0


async def test_a_stopped_vote_aborts_its_running_samples_and_counts_their_tokens():
    # t2+beta at c=0.7 is decided by the first answer; the other three hang until aborted.
    engine = ScriptedEngine(lambda i: Finish("4", tokens=2) if i == 0 else Hang(tokens_before_abort=5))
    thinker = thinker_for(engine)
    result = await thinker.run(PROMPT, params(), thinker.plan(policy="t2+beta:c=0.7"), request_id="r")
    assert result.launched == 4 and result.samples == 1 and result.aborted == 3
    assert sorted(engine.aborted_ids) == ["r-s1", "r-s2", "r-s3"]
    assert result.completion_tokens == 2 + 3 * 5 and not result.timed_out
    assert engine.running() == [] and thinker.samples_in_flight == 0


# -- deadlines ------------------------------------------------------------------------------


async def test_deadline_votes_over_the_finished_samples_and_aborts_the_rest():
    # Fixed N = 4 in one request per choice: samples 0, 1 finish, 2, 3 never do.
    engine = ScriptedEngine(lambda i: Finish("9") if i in (0, 1, 4) else Hang())
    thinker = thinker_for(engine)
    deadline = Deadline(None)
    task = asyncio.ensure_future(
        thinker.run(PROMPT, params(), thinker.plan(4, n_choices=2), request_id="r", deadline=deadline)
    )
    assert await wait_until(lambda: len(engine.requests) == 2)
    deadline.expire()
    result = await task
    assert result.timed_out and result.launched == 8
    assert answers(result, 0) == ["9", "9"] and answers(result, 1) == ["9"]
    assert result.aborted == 5 and result.completion_tokens == 3 * 3 + 5 * 7
    assert engine.running() == [] and thinker.samples_in_flight == 0


async def test_deadline_before_any_sample_finished_is_a_504():
    engine = ScriptedEngine(lambda i: Hang())
    thinker = thinker_for(engine)
    deadline = Deadline(None)
    task = asyncio.ensure_future(
        thinker.run(PROMPT, params(), thinker.plan(policy="esc"), request_id="r", deadline=deadline)
    )
    assert await wait_until(lambda: len(engine.requests) >= 1)
    deadline.expire()
    with pytest.raises(APIError) as err:
        await task
    assert err.value.status == 504 and err.value.code == "request_timeout"
    assert engine.running() == [] and thinker.samples_in_flight == 0


async def test_deadline_while_waiting_for_states_launches_nothing_more():
    engine = ScriptedEngine(lambda i: Hang(), states=False)
    thinker = thinker_for(engine)
    deadline = Deadline(None)
    task = asyncio.ensure_future(
        thinker.run(PROMPT, params(), thinker.plan(), request_id="r", deadline=deadline)
    )
    assert await wait_until(lambda: "r-s0" in engine.requests)
    deadline.expire()
    with pytest.raises(APIError):
        await task
    assert list(engine.requests) == ["r-s0"] and engine.running() == []


async def test_deadline_timer_expires_by_itself():
    deadline = Deadline(0.01)
    await asyncio.wait_for(deadline.expired, 60)  # a generous bound: only a hang fails this
    assert deadline.expired.done()


# -- load -------------------------------------------------------------------------------


async def test_load_curve_caps_auto_by_the_samples_other_requests_hold():
    engine = ScriptedEngine(lambda i: Finish("1"))
    thinker = ParallelThinker(engine, ParallelismSettings(default_parallelism=8), samples_limit=8)
    thinker.in_flight.add(6)  # another request's samples
    result = await thinker.run(PROMPT, params(), thinker.plan(policy="fixed"), request_id="b")
    # Load 6/8 = 0.75: the cap ramps down to 8 * 0.5 = 4, and the room left is 2.
    assert result.load_cap == 2 and result.n_used == 2
    fixed = await thinker.run(PROMPT, params(), thinker.plan(8), request_id="c")
    assert fixed.n_used == 8 and fixed.load_cap is None  # an integer N is not cut by load
    thinker.in_flight.add(-6)
    assert thinker.samples_in_flight == 0


# -- on the real engine -----------------------------------------------------------------


async def test_greedy_auto_runs_one_sample(server_url):
    body = {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 4, "temperature": 0}
    async with httpx.AsyncClient(timeout=None) as http:
        response = await http.post(f"{server_url}/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert response.json()["t2"]["n_used"] == 1 and response.json()["t2"]["samples"] == 1


async def test_timeout_without_a_finished_sample_is_504(server_url, engine):
    # 1900 tokens each: far more than any machine decodes in the 1 s deadline.
    body = {"model": MODEL_NAME, "messages": QUESTION, "parallelism": 3, "timeout": 1.0}
    body |= {"max_tokens": 1900, "ignore_eos": True}
    failed_before = metric("t2serve_request_timeouts_total", outcome="failed")
    async with httpx.AsyncClient(timeout=None) as http:
        response = await http.post(f"{server_url}/v1/chat/completions", json=body)
    assert_openai_error(response, 504, "request_timeout")
    assert response.json()["error"]["type"] == "timeout_error"
    assert metric("t2serve_request_timeouts_total", outcome="failed") == failed_before + 1
    assert await wait_until(lambda: engine.num_unfinished_requests() == 0)


def generated_tokens() -> float:
    """The session engine's vllm:generation_tokens_total (it lives in this process)."""
    from prometheus_client import REGISTRY

    return sum(
        sample.value
        for family in REGISTRY.collect()
        for sample in family.samples
        if sample.name == "vllm:generation_tokens_total"
    )


async def test_deadline_votes_over_the_samples_that_finished(engine, server_settings):
    import uuid

    from vllm import SamplingParams

    from server.parallel import Deadline, ParallelThinker
    from server.prompts import render_chat

    # `auto` with no head: sample 0 goes out alone for its states, then the default N's other
    # three as one request.
    settings = server_settings.parallelism.model_copy(update={"default_parallelism": 4})
    thinker = ParallelThinker(FirstSampleQuick(engine), settings)
    deadline = Deadline(None)  # ended by the test, once sample 0 has finished
    partial_before = metric("t2serve_request_timeouts_total", outcome="partial")
    task = asyncio.ensure_future(
        thinker.run(
            render_chat(engine.tokenizer, QUESTION),
            SamplingParams(max_tokens=1500, ignore_eos=True, temperature=1.0, seed=1),
            thinker.plan("auto"),
            request_id=uuid.uuid4().hex,
            deadline=deadline,
        )
    )
    generated_before = generated_tokens()
    assert await wait_until(lambda: thinker.samples_in_flight == 3)  # sample 0 is done
    # ... and the other three have decoded a few tokens each (vLLM publishes its counters
    # about once a second), so their partial outputs carry tokens to account for.
    assert await wait_until(lambda: generated_tokens() >= generated_before + 1 + 3 * 3)
    deadline.expire()
    result = await task
    assert result.timed_out and result.launched == 4 and result.aborted == 3
    (choice,) = result.choices
    assert [s.number for s in choice.samples] == [0] and choice.winner.num_tokens == 1
    assert choice.winner.finish_reason == "length"
    # The aborted samples' tokens are paid for: usage counts them.
    assert result.completion_tokens > 1 and result.aborted_tokens == result.completion_tokens - 1
    assert metric("t2serve_request_timeouts_total", outcome="partial") == partial_before + 1
    assert await wait_until(lambda: engine.num_unfinished_requests() == 0)
    assert thinker.samples_in_flight == 0
