"""The request token budget (server.budget) in the orchestration loop, against the scripted
engine: what ends the vote, who votes, and that nothing is left running. The same is checked
on the real engine in test_hardening."""

from __future__ import annotations

import pytest

from server.budget import TokenBudget
from tests.server.engine_double import Finish, Hang, ScriptedEngine
from tests.server.test_parallel import PROMPT, params, thinker_for


async def run_with_budget(engine, plan_kwargs: dict, limit: int | None):
    thinker = thinker_for(engine)
    budget = TokenBudget(engine, limit)
    try:
        result = await thinker.run(
            PROMPT, params(), thinker.plan(**plan_kwargs), request_id="r", budget=budget
        )
    finally:
        await budget.close()
    assert thinker.samples_in_flight == 0 and engine.running() == []
    return result, budget


async def test_the_budget_ends_the_vote_over_the_finished_samples():
    # Sample 0 finishes (3 tokens); the other three decode 7 tokens each and never end.
    engine = ScriptedEngine(lambda i: Finish("5") if i == 0 else Hang(7))
    result, budget = await run_with_budget(engine, {"policy": "esc:window=4,max=4"}, limit=20)
    assert budget.exhausted.done() and result.budget_exhausted and not result.timed_out
    (choice,) = result.choices
    assert [s.number for s in choice.samples] == [0] and choice.vote.answer == "5"
    assert result.launched == 4 and result.aborted == 3
    # The aborted samples' tokens are paid for: usage counts them.
    assert result.completion_tokens == 3 + 3 * 7


async def test_a_choice_with_no_finished_sample_votes_over_its_partial_ones():
    engine = ScriptedEngine(lambda i: Hang(7))
    result, _ = await run_with_budget(engine, {"parallelism": 4}, limit=10)
    (choice,) = result.choices
    assert result.budget_exhausted and len(choice.samples) == 4
    assert {s.finish_reason for s in choice.samples} == {"length"}  # cut as max_tokens cuts
    assert result.launched == 4 and result.aborted == 4  # aborted, and voting all the same
    assert result.completion_tokens == 4 * 7 and result.aborted_tokens == 0


@pytest.mark.parametrize("limit", [None, 1_000])
async def test_a_budget_not_reached_changes_nothing(limit):
    engine = ScriptedEngine(lambda i: Finish(str(i % 2)))
    result, budget = await run_with_budget(engine, {"parallelism": 3}, limit=limit)
    assert not result.budget_exhausted and not budget.exhausted.done()
    assert result.launched == 3 and result.aborted == 0 and result.choices[0].vote.answer == "0"
