"""Exploration (server/exploration.py): which requests run at N_max, and how the loop runs
them (every sample its own engine request, none stopped early, the states captured), against
the scripted engine; then the admin-only field and `t2.explored` through the real server."""

from __future__ import annotations

import argparse
import random

import httpx
import pytest

from server import metrics
from server.cli.args import add_settings_flags, settings_from
from server.config import EngineSettings, RecordingSettings, ServerSettings
from server.errors import APIError
from server.exploration import Exploration, Explore, ExploreBudget
from server.protocol import ChatCompletionRequest
from tests.conftest import MODEL_NAME
from tests.server.engine_double import Finish, ScriptedEngine
from tests.server.helpers import PROMPT, QUESTION, assert_openai_error, metric, params, serve, thinker_for


def exploration(share: float, thinker, budget: float | None = None) -> Exploration:
    settings = ServerSettings(
        engine=EngineSettings(model="x", served_model_name="m"),
        recording=RecordingSettings(explore_share=share, explore_budget=budget),
    )
    return Exploration(settings, thinker, engine=None)


def chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}], **fields)


async def test_an_explored_plan_runs_n_max_samples_each_alone_and_stops_none_early():
    # ESC (window 2) would stop after two unanimous answers; explored, all N_max = 4 run.
    engine = ScriptedEngine(lambda i: Finish("3"))
    thinker = thinker_for(engine)
    plan = thinker.explored(thinker.plan("auto", policy="esc:window=2", n_choices=2))
    assert (
        plan.explore and plan.policy == Explore(4) and plan.minimum_samples == 8
    )  # admission reserves N_max
    result = await thinker.run(PROMPT, params(seed=5), plan, request_id="r")
    assert result.explored and result.n_used == 4 and result.launched == 8 and result.aborted == 0
    assert all(r.params.n == 1 for r in engine.requests.values())  # each finishes on its own
    assert result.estimate.states is not None  # the prompt's states were captured
    assert [sorted(order) for order in result.finish_order] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert result.policy == "explore:n=4" and result.choices[0].vote.answer == "3"


async def test_exploration_ignores_the_load_curve():
    engine = ScriptedEngine(lambda i: Finish("1"))
    thinker = thinker_for(engine)
    thinker.samples_limit = 1  # every sample over it: `auto` would run one
    thinker.in_flight.value = 1
    result = await thinker.run(PROMPT, params(), thinker.explored(thinker.plan("auto")), request_id="r")
    assert result.launched == 4 and result.load_cap is None


def test_a_greedy_request_cannot_be_explored():
    thinker = thinker_for(None)
    with pytest.raises(APIError) as err:
        thinker.explored(thinker.plan("auto", temperature=0.0))
    assert err.value.status == 400 and err.value.param == "temperature"


def test_the_share_draws_auto_requests_only_and_the_field_needs_an_admin_key():
    thinker = thinker_for(None)
    always, never = exploration(1.0, thinker), exploration(0.0, thinker)
    before = metric("t2serve_explored_requests_total", reason="share")
    assert always.plan(thinker.plan("auto"), chat(), admin=False).explore
    assert metric("t2serve_explored_requests_total", reason="share") == before + 1
    assert not always.plan(thinker.plan(2), chat(), admin=False).explore  # fixed N: not drawn
    assert not always.plan(thinker.plan("auto", temperature=0.0), chat(), admin=False).explore  # greedy
    assert not never.plan(thinker.plan("auto"), chat(), admin=False).explore
    # t2_explore: refused without an admin key, obeyed with one, for any request.
    with pytest.raises(APIError) as err:
        never.plan(thinker.plan("auto"), chat(t2_explore=True), admin=False)
    assert err.value.status == 403 and err.value.param == "t2_explore"
    assert never.plan(thinker.plan(2), chat(t2_explore=True), admin=True).explore
    assert not never.plan(thinker.plan("auto"), chat(t2_explore=False), admin=False).explore


async def test_t2_explore_over_http_needs_an_admin_key_and_returns_the_n_max_vote(engine, server_settings):
    settings = server_settings.model_copy(update={"api_keys": ["user"], "admin_keys": ["admin"]})
    body = {
        "model": MODEL_NAME,
        "messages": QUESTION,
        "max_tokens": 8,
        "temperature": 0.8,
        "t2_explore": True,
    }
    async with serve(engine, settings) as (url, _), httpx.AsyncClient(timeout=None) as http:
        refused = await http.post(
            f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer user"}
        )
        assert assert_openai_error(refused, 403, "admin_only")["param"] == "t2_explore"
        ok = await http.post(
            f"{url}/v1/chat/completions", json=body, headers={"Authorization": "Bearer admin"}
        )
        assert ok.status_code == 200, ok.text
        t2, usage = ok.json()["t2"], ok.json()["usage"]
        assert t2["explored"] is True and t2["n_used"] == t2["n_max"] == 4 and t2["finished"] == 4
        assert t2["policy"] == "explore:n=4" and sum(t2["votes"].values()) <= 4
        assert usage["completion_tokens"] >= 4  # every sample counts
        plain = await http.post(
            f"{url}/v1/chat/completions",
            json={**body, "t2_explore": False},
            headers={"Authorization": "Bearer user"},
        )
        assert plain.status_code == 200 and plain.json()["t2"]["explored"] is None


# -- --explore-budget ---------------------------------------------------------------------


@pytest.mark.parametrize("share", [0.01, 0.05, 0.3])
def test_the_budget_holds_extra_samples_within_its_share_at_every_prefix(share):
    # 20,000 `auto` requests of 1 to 3 choices, `auto` launching 1 to 16 samples per choice
    # (N_max 16): at every request, extra <= B x launched + one request's cost, and the
    # budget is spent, not merely respected (the share ends above 0.9 B).
    budget, traffic = ExploreBudget(share, random.Random(0)), random.Random(1)
    launched = extra = 0.0
    worst = 16 * 3
    for _ in range(20_000):
        choices = traffic.randint(1, 3)
        auto = sum(traffic.randint(1, 16) for _ in range(choices))
        cost = 16 * choices - auto
        if budget.allows(cost):
            budget.charge(cost)
            extra += cost
            samples = 16 * choices
        else:
            samples = auto
        assert extra <= share * launched + worst
        launched += samples
        budget.earn(samples)
    assert extra / launched > 0.9 * share


def test_the_budget_never_explores_without_credit_and_draws_once_there_is_some():
    budget = ExploreBudget(0.1, random.Random(0))
    assert not any(budget.allows(5) for _ in range(100))  # no credit: never
    budget.earn(25)  # credit 2.5 of a cost of 5: about half the draws
    drawn = sum(budget.allows(5) for _ in range(2000))
    assert 900 < drawn < 1100
    budget.earn(25)
    assert all(budget.allows(5) for _ in range(100))  # enough credit: always
    assert budget.allows(0)  # costs nothing: `auto` would have spent N_max anyway


def test_with_a_budget_a_drawn_request_waits_for_credit_earned_by_launched_samples():
    thinker = thinker_for(None)  # N_max 4; no gauge pool yet: `auto` counted at 1 sample per choice
    explorer = exploration(1.0, thinker, budget=0.05)
    skipped = metric("t2serve_explored_requests_total", reason="budget_skipped")
    extra = metric("t2serve_explore_extra_samples_total")
    assert not explorer.plan(thinker.plan("auto"), chat(), admin=False).explore  # no credit yet
    assert metric("t2serve_explored_requests_total", reason="budget_skipped") == skipped + 1
    metrics.SAMPLES.inc(60)  # served requests launched 60 samples: credit 3, one exploration's cost
    assert explorer.plan(thinker.plan("auto"), chat(), admin=False).explore
    assert metric("t2serve_explore_extra_samples_total") == extra + 3
    assert explorer.budget.credit == 0 and metric("t2serve_explore_budget_credit") == 0
    assert not explorer.plan(thinker.plan("auto"), chat(), admin=False).explore  # spent
    assert not explorer.plan(thinker.plan(2), chat(), admin=False).explore  # fixed N: never a candidate


def test_with_a_large_budget_the_share_decides():
    thinker = thinker_for(None)
    explorer = exploration(0.3, thinker, budget=1.0)
    explorer.random.seed(0)
    metrics.SAMPLES.inc(10**6)
    explored = sum(explorer.plan(thinker.plan("auto"), chat(), admin=False).explore for _ in range(2000))
    assert 540 < explored < 660  # 0.3 of 2,000, within 4.6 standard deviations


def test_admin_requests_are_explored_without_credit_and_charged():
    thinker = thinker_for(None)
    explorer = exploration(0.0, thinker, budget=0.05)
    assert explorer.plan(thinker.plan("auto"), chat(t2_explore=True), admin=True).explore
    assert explorer.budget.credit == -3  # N_max 4 - 1: the credit goes negative
    metrics.SAMPLES.inc(60)  # earns 3: back to 0, still nothing to spend
    assert not explorer.plan(thinker.plan("auto"), chat(), admin=False).explore


def test_the_cost_is_n_max_minus_the_gauges_auto_samples_per_choice():
    thinker = thinker_for(None)
    explorer = exploration(0.0, thinker, budget=0.05)
    plan = thinker.explored(thinker.plan("auto", n_choices=2))
    assert explorer.extra_samples(plan) == (4 - 1) * 2  # before any pool: `auto` at its fewest
    explorer.gauge.observe(["7", "7", "7", "7"], prediction=0.0)
    auto = explorer.gauge.totals["auto"].mean_samples
    assert auto >= 1 and explorer.extra_samples(plan) == (4 - auto) * 2


@pytest.mark.parametrize("value", ["0", "1.5", "-0.1"])
def test_a_budget_outside_0_1_is_refused_at_start_up(value):
    parser = argparse.ArgumentParser()
    add_settings_flags(parser, RecordingSettings, "recording")
    with pytest.raises(SystemExit, match="explore_budget"):
        settings_from(RecordingSettings, parser.parse_args(["--explore-budget", value]))
    assert settings_from(RecordingSettings, parser.parse_args(["--explore-budget", "1"])).explore_budget == 1
