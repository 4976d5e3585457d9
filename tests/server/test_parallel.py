"""The orchestration loop's logic (server.parallel, server.samples) against a scripted
engine (tests/server/engine_double.py): plans, launches, stopping, deadlines, aborts, the
samples-in-flight count. Every outcome is driven by events, never by the clock; the same
semantics are checked on the real engine in test_capture, test_policies_online and
test_hardening."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from estimator.policies import ESC, Budget, Decision, Fixed, Tally
from server.config import ParallelismSettings
from server.engine.engine import EngineDead
from server.errors import APIError
from server.parallel import Deadline, ParallelThinker, Plan
from server.protocol import ChatCompletionRequest, CompletionRequest
from tests.conftest import wait_until
from tests.server.engine_double import Fail, Finish, Hang, ScriptedEngine

PROMPT = list(range(10))


def params(**fields):
    from vllm import SamplingParams

    return SamplingParams(**{"max_tokens": 16, "temperature": 1.0, **fields})


def thinker_for(engine, **settings) -> ParallelThinker:
    return ParallelThinker(
        engine, ParallelismSettings(**{"default_parallelism": 4, "max_parallelism": 16, **settings})
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


# -- failures leave nothing behind ------------------------------------------------------------


async def test_engine_error_mid_way_aborts_everything_and_settles_the_count():
    engine = ScriptedEngine(lambda i: Fail() if i == 2 else Hang())
    thinker = thinker_for(engine)
    with pytest.raises(EngineDead, match="engine failed"):
        await thinker.run(PROMPT, params(), thinker.plan(policy="esc:window=4"), request_id="r")
    assert thinker.samples_in_flight == 0
    assert engine.running() == [] and set(engine.aborted_ids) >= {"r-s0", "r-s1", "r-s3"}


@dataclass(frozen=True)
class Exploding:
    """A policy that fails on its second result (a bug in a policy must not leak samples)."""

    adapts = True
    reads_prediction = False
    family = "exploding"
    knob = ""

    def first_launch(self, budget: Budget) -> int:
        return 3

    def on_result(self, tally: Tally, launched: int, budget: Budget) -> Decision:
        if tally.finished == 2:
            raise RuntimeError("policy bug")
        return Decision()


async def test_a_policy_failing_mid_loop_leaves_the_in_flight_count_at_zero():
    engine = ScriptedEngine(lambda i: Finish("1") if i < 2 else Hang())
    thinker = thinker_for(engine)
    plan = Plan(Exploding(), "auto", cap=8)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="policy bug"):
        await thinker.run(PROMPT, params(), plan, request_id="r")
    assert thinker.samples_in_flight == 0 and engine.running() == []


async def test_cancelling_a_run_aborts_its_engine_requests():
    engine = ScriptedEngine(lambda i: Hang())
    thinker = thinker_for(engine)
    task = asyncio.ensure_future(thinker.run(PROMPT, params(), thinker.plan(5), request_id="r"))
    assert await wait_until(lambda: thinker.samples_in_flight == 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert thinker.samples_in_flight == 0 and engine.aborted_ids == ["r-s0"]
    assert await wait_until(lambda: engine.running() == [])


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
