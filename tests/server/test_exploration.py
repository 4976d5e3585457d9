"""Exploration (server/exploration.py): which requests run at N_max, and how the loop runs
them (every sample its own engine request, none stopped early, the states captured), against
the scripted engine; then the admin-only field and `t2.explored` through the real server."""

from __future__ import annotations

import httpx
import pytest

from server.config import EngineSettings, RecordingSettings, ServerSettings
from server.errors import APIError
from server.exploration import Exploration, Explore
from server.protocol import ChatCompletionRequest
from tests.conftest import MODEL_NAME
from tests.server.engine_double import Finish, ScriptedEngine
from tests.server.helpers import PROMPT, QUESTION, assert_openai_error, metric, params, serve, thinker_for


def exploration(share: float, thinker) -> Exploration:
    settings = ServerSettings(
        engine=EngineSettings(model="x", served_model_name="m"),
        recording=RecordingSettings(explore_share=share),
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
