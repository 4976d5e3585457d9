"""The request token budget (server/budget.py) in the orchestration loop, against the
scripted engine: what ends the vote, who votes, and that nothing is left running. Then the
same on the real engine, and the server's ceiling (--max-request-tokens)."""

from __future__ import annotations

import httpx
import pytest

from server.budget import TokenBudget
from tests.conftest import MODEL_NAME, wait_until
from tests.server.engine_double import Finish, Hang, ScriptedEngine
from tests.server.helpers import (
    PROMPT,
    QUESTION,
    FirstSampleQuick,
    assert_openai_error,
    metric,
    params,
    serve,
    settings_with,
    thinker_for,
)


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


# -- on the real engine -----------------------------------------------------------------


async def test_the_token_budget_ends_the_vote_over_the_samples_that_finished(engine, server_settings):
    import uuid

    from vllm import SamplingParams

    from server.budget import TokenBudget
    from server.parallel import ParallelThinker
    from server.prompts import render_chat

    settings = server_settings.parallelism.model_copy(update={"default_parallelism": 4})
    thinker = ParallelThinker(FirstSampleQuick(engine), settings)
    budget = TokenBudget(engine, 40)
    try:
        result = await thinker.run(
            render_chat(engine.tokenizer, QUESTION),
            SamplingParams(max_tokens=1500, ignore_eos=True, temperature=1.0, seed=3),
            thinker.plan("auto"),
            request_id=uuid.uuid4().hex,
            budget=budget,
        )
    finally:
        await budget.close()
    # Sample 0 finished (one token); the other three decoded until the budget ran out.
    assert result.budget_exhausted and not result.timed_out and result.launched == 4 and result.aborted == 3
    (choice,) = result.choices
    assert [s.number for s in choice.samples] == [0] and choice.winner.finish_reason == "length"
    # The engine's own count reached the budget (it is read from vLLM's request states: this
    # pins that read), and usage counts every token, the aborted samples' included.
    assert result.completion_tokens >= 40 and result.aborted_tokens == result.completion_tokens - 1
    assert await wait_until(lambda: engine.num_unfinished_requests() == 0)
    assert thinker.samples_in_flight == 0


async def test_the_server_bounds_each_request_by_its_token_budget(engine, server_settings):
    settings = settings_with(server_settings, max_request_tokens=64)
    chat = "/v1/chat/completions"
    async with serve(engine, settings) as (url, _), httpx.AsyncClient(timeout=None) as http:
        body = {"model": MODEL_NAME, "messages": QUESTION, "parallelism": 8, "ignore_eos": True}
        over = await http.post(f"{url}{chat}", json={**body, "max_total_tokens": 65})
        assert assert_openai_error(over, 400, "invalid_value")["param"] == "max_total_tokens"
        # No max_tokens: every sample could decode the whole context left; the server's
        # budget (its ceiling, the default) ends the vote instead.
        response = await http.post(f"{url}{chat}", json=body)
        assert response.status_code == 200, response.text
        reply = response.json()
        t2, usage = reply["t2"], reply["usage"]
        assert t2["budget_exhausted"] and t2["max_total_tokens"] == 64
        assert t2["launched"] == 8 and usage["completion_tokens"] >= 64
        assert reply["choices"][0]["finish_reason"] == "length"
        assert metric("t2serve_budget_exhausted_total") >= 1
    assert await wait_until(lambda: engine.num_unfinished_requests() == 0)


async def test_a_budget_the_request_cannot_reach_is_not_watched():
    engine = ScriptedEngine(lambda i: Hang(7))
    unreachable = TokenBudget(engine, 100, most=100)  # every sample at max_tokens: exactly the budget
    reachable = TokenBudget(engine, 100, most=101)
    try:
        assert unreachable.limit is None and unreachable._watcher is None
        assert reachable.limit == 100 and reachable._watcher is not None
    finally:
        await unreachable.close()
        await reachable.close()
