"""A request's samples in the engine (server/samples.py, SampleGroup), against the scripted
engine: however the loop ends (an engine error, a policy's bug, a cancelled run) every engine
request is aborted and the samples-in-flight count settles at zero."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import pytest

from estimator.policies import Budget, Decision, Tally
from server.engine.engine import EngineDead
from server.parallel import Plan
from tests.conftest import wait_until
from tests.server.engine_double import Fail, Finish, Hang, ScriptedEngine
from tests.server.helpers import PROMPT, params, thinker_for


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
