"""Hot reload of the policy `auto` runs (server/head_reload.py), alone or with a head, from
POST /admin/policy, SIGHUP (--policy @PATH) and --reload-watch (server/reload_watch.py):
validated as --policy is at start-up (a bad one refused, the old one stays), swapped by one
assignment (a plan keeps its policy), shown in the policy card; the live gauge replays the
policy and head now in use; and a real server swapping policies under concurrent load."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import httpx
import pytest

from estimator.head import DEFAULT_HEAD, T2Head
from estimator.policies import Fixed
from estimator.policy_spec import describe
from server.config import EngineSettings, ParallelismSettings, RecordingSettings, ServerSettings
from server.exploration import Exploration
from server.head_reload import HeadRefused, HeadReloader, PolicyRefused
from server.parallel import ParallelThinker
from server.reload_watch import ReloadWatch, reload_request
from server.shadow import ShadowGauge
from tests.conftest import MODEL_NAME, wait_until
from tests.server.engine_double import Finish, ScriptedEngine
from tests.server.helpers import PROMPT, QUESTION, assert_openai_error, metric, params, serve
from tests.server.test_head_reload import (
    GENERATOR_HEAD,
    assert_each_ran_with_its_plan,
    copy_head,
    engine_for,
    reload_under_load,
)


def reloader(head=None, **parallelism) -> HeadReloader:
    version = "0123456789ab@2026-01-01T00:00:00Z" if head is not None else None
    thinker = ParallelThinker(None, ParallelismSettings(**parallelism), estimator=head, head_version=version)  # type: ignore[arg-type]
    return HeadReloader(thinker, engine_for(), "default" if head is not None else None, None)


def estimator_info() -> dict[str, str]:
    """t2serve_estimator_info's labels."""
    from prometheus_client import REGISTRY

    return next(s.labels for f in REGISTRY.collect() for s in f.samples if s.name == "t2serve_estimator_info")


def tuned(path, policy: str):
    path.write_text(json.dumps({"policy": policy, "target": 0.99}))
    return path


# -- the swap ---------------------------------------------------------------------------


async def test_a_policy_alone_swaps_the_default_policy_and_keeps_the_head(tmp_path):
    reload = reloader(T2Head.load(DEFAULT_HEAD), policy="t2", estimator_margin=1.25)
    thinker = reload.thinker
    head, before = thinker.current.head, reload.policy_card()
    assert before.policy == "t2:margin=1.25" and before.spec == "t2"
    planned = thinker.plan("auto")
    card = await reload.reload(None, policy=f"@{tuned(tmp_path / 'tuned.json', 'ac-beta:c=0.99,max=16')}")
    assert card is not None and card.spec == "default"  # the head's card: the same head
    assert thinker.current.head is head and thinker.margin == 1.25
    after = reload.policy_card()
    assert after.spec == f"@{tmp_path / 'tuned.json'}" and after.policy.startswith("ac-beta:")
    assert after.policy == describe(thinker.plan("auto").policy) and "max=16" in after.policy
    assert after.version != before.version and len(after.version.partition("@")[0]) == 12
    assert planned.policy.name == "t2"  # a plan keeps the policy it was resolved with
    assert estimator_info()["policy"] == after.policy


@pytest.mark.parametrize(
    ("policy", "reason"),
    [
        ("esc:window=zero", "bad value for window"),
        ("nope", "nope"),
        ("@{tmp}/absent.json", "cannot read a policy from"),
        ("@{tmp}/empty.json", "names no policy"),
        ("t2+learned", "needs a stopping table"),
    ],
)
async def test_a_policy_that_cannot_serve_is_refused_and_the_old_one_stays(tmp_path, policy, reason):
    (tmp_path / "empty.json").write_text("{}")
    reload = reloader(None, policy="esc:window=2")  # no head: no stopping table either
    before, card = reload.thinker.current, reload.policy_card()
    refused = metric("t2serve_head_reloads_total", source="api", outcome="refused")
    with pytest.raises(PolicyRefused, match=reason):
        await reload.reload(None, policy=policy.format(tmp=tmp_path))
    assert reload.thinker.current is before and reload.policy_card() == card
    assert metric("t2serve_head_reloads_total", source="api", outcome="refused") == refused + 1


async def test_a_head_and_a_policy_it_needs_swap_together(tmp_path):
    bare = copy_head(tmp_path)
    bare.with_name("head.stopping.safetensors").unlink()
    reload = reloader(T2Head.load(bare), policy="t2")
    with pytest.raises(PolicyRefused, match="stopping table"):  # not with the head in use
        await reload.reload(None, policy="t2+learned")
    card = await reload.reload(str(GENERATOR_HEAD), policy="t2+learned:cost=0.005")
    assert card is not None and card.stopping and card.spec == str(GENERATOR_HEAD)
    assert reload.thinker.plan("auto").policy.name == "t2+learned"
    # A later head alone keeps the reloaded policy, and is refused if it cannot run it.
    with pytest.raises(HeadRefused, match=r"the policy in use \(t2\+learned:cost=0.005\)"):
        await reload.reload(str(bare))
    assert reload.thinker.current.head.stopping is not None


async def test_sighup_rereads_the_policy_file(tmp_path):
    path = tuned(tmp_path / "tuned.json", "fixed:n=3")
    reload = reloader(None, policy="fixed:n=3", policy_file=str(path))
    assert reload.policy_card().spec == f"@{path}"
    tuned(path, "esc:window=2,max=4")  # a new tune run replaced the file
    ok = metric("t2serve_head_reloads_total", source="sighup", outcome="ok")
    reload.on_sighup()
    assert await wait_until(lambda: reload.thinker.default_policy.name == "esc")
    assert metric("t2serve_head_reloads_total", source="sighup", outcome="ok") == ok + 1
    assert reload.thinker.estimator is None  # no --estimator-head: only the policy was re-read


# -- --reload-watch ---------------------------------------------------------------------


def test_a_watch_file_names_paths_relative_to_itself(tmp_path):
    request = reload_request(b'{"head": "v1/head", "policy": "@v1/tuned.json", "margin": 2}', tmp_path)
    assert request == {"spec": str(tmp_path / "v1/head"), "policy": f"@{tmp_path}/v1/tuned.json", "margin": 2}
    assert reload_request(b'{"head": "default", "policy": "fixed:n=2"}', tmp_path)["spec"] == "default"
    for bad in (
        b"[]",
        b'{"margin": 2}',
        b'{"policy": 3}',
        b'{"head": "h", "extra": 1}',
        b'{"policy": "t2", "margin": 0}',
    ):
        with pytest.raises(ValueError):
            reload_request(bad, tmp_path)


async def test_the_watch_reloads_when_the_file_changes_and_remembers_a_refusal(tmp_path):
    reload = reloader(None, policy="fixed:n=4")
    watch = ReloadWatch(reload, tmp_path / "current.json", interval_s=3600)
    assert not await watch.check()  # no file yet: nothing changes
    version = tmp_path / "versions" / "v1"
    version.mkdir(parents=True)
    tuned(version / "tuned.json", "esc:window=2,max=4")
    head = copy_head(version)
    (tmp_path / "current.json").write_text(
        json.dumps({"head": "versions/v1/head", "policy": "@versions/v1/tuned.json"})
    )
    ok = metric("t2serve_head_reloads_total", source="watch", outcome="ok")
    assert await watch.check()
    assert reload.spec == str(head) and reload.thinker.default_policy.name == "esc"
    assert reload.policy_card().spec == f"@{version / 'tuned.json'}"
    assert not await watch.check()  # unchanged: no second reload
    assert metric("t2serve_head_reloads_total", source="watch", outcome="ok") == ok + 1
    before = reload.thinker.current
    refused = metric("t2serve_head_reloads_total", source="watch", outcome="refused")
    (tmp_path / "current.json").write_text('{"policy": "esc:window=zero"}')
    assert not await watch.check() and not await watch.check()  # refused once, then remembered
    assert reload.thinker.current is before
    assert metric("t2serve_head_reloads_total", source="watch", outcome="refused") == refused + 1
    (tmp_path / "current.json").write_text("{not json")
    assert not await watch.check() and reload.thinker.current is before
    assert metric("t2serve_head_reloads_total", source="watch", outcome="refused") == refused + 2


async def test_the_watch_applies_the_file_at_start_and_polls_it(tmp_path):
    reload = reloader(None, policy="fixed:n=4")
    path = tmp_path / "current.json"
    path.write_text('{"policy": "fixed:n=2"}')
    watch = ReloadWatch(reload, path, interval_s=0.01)
    await watch.start()
    try:
        assert reload.thinker.default_policy == Fixed(2)  # before start() returned
        path.write_text('{"policy": "fixed:n=3"}')
        assert await wait_until(lambda: reload.thinker.default_policy == Fixed(3))
    finally:
        await watch.stop()


# -- the live gauge follows -------------------------------------------------------------


async def test_after_a_reload_the_gauge_replays_the_policy_and_head_now_in_use():
    engine = ScriptedEngine(lambda i: Finish(str(i % 3)))
    thinker = ParallelThinker(engine, ParallelismSettings(default_parallelism=4, policy="fixed:n=1"))
    reload = HeadReloader(thinker, engine_for(), None, None)
    settings = ServerSettings(
        engine=EngineSettings(model="x", served_model_name=MODEL_NAME),
        recording=RecordingSettings(explore_share=1),
    )
    exploration = Exploration(settings, thinker, engine)
    gauge = exploration.gauge

    async def explore_one() -> None:
        result = await thinker.run(PROMPT, params(), thinker.explored(thinker.plan("auto")), request_id="r")
        exploration.observe(None, [result])

    await explore_one()
    assert gauge.policies["auto"] == Fixed(1) and gauge.totals["auto"].pools == 1
    assert "esc:window=2,max=3" not in gauge.policies
    await reload.reload(None, policy="esc:window=2,max=3")
    await explore_one()
    served = describe(thinker.default_policy)
    assert (
        gauge.policies["auto"] is thinker.default_policy and gauge.policies[served] is thinker.default_policy
    )
    assert gauge.totals["auto"].pools == 1 == gauge.totals[served].pools  # a new policy: counted afresh
    assert gauge.totals["fixed:n=2"].pools == 2  # an unchanged row keeps its pools
    assert metric("t2serve_shadow_samples", policy="auto") == gauge.totals["auto"].mean_samples == 3
    assert metric("t2serve_shadow_samples", policy=served) == 3


async def test_after_a_head_reload_the_rows_reading_its_prediction_start_afresh():
    thinker = ParallelThinker(
        None,  # type: ignore[arg-type]
        ParallelismSettings(policy="t2", estimator_margin=1.5),
        estimator=T2Head.load(DEFAULT_HEAD),
        head_version="0123456789ab@2026-01-01T00:00:00Z",
    )
    reload = HeadReloader(thinker, engine_for(), "default", None)
    gauge = ShadowGauge.following(thinker)
    n_max = thinker.n_max
    pool = ["1"] * (n_max - 1) + ["2"]
    gauge.observe(pool, 0.3, 1.0)
    before = dict(gauge.policies)
    await reload.reload(str(GENERATOR_HEAD))
    assert thinker.n_max == n_max  # the same N_max: only the head changed
    gauge.observe(pool, 0.3, 1.0)
    # t2 and t2+learned keep their spec, but read another head's prediction and table.
    assert describe(gauge.policies["auto"]) == describe(before["auto"]) == "t2:margin=1.5"
    assert gauge.totals["auto"].pools == gauge.totals["t2+learned"].pools == 1
    assert gauge.totals["esc"].pools == gauge.totals["fixed:n=1"].pools == 2


# -- a real server under load -----------------------------------------------------------


@pytest.mark.engine
async def test_policy_reload_under_concurrent_load_drops_nothing(engine, server_settings, tmp_path):
    settings = server_settings.model_copy(update={"admin_keys": ["adm"]})
    admin = {"authorization": "Bearer adm"}
    body = {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 8, "temperature": 0.8}
    file = tuned(tmp_path / "tuned.json", "esc:window=2,max=3")
    specs = ["fixed:n=2", f"@{file}", "ac-beta:c=0.9,max=3", "fixed:n=3"]
    async with serve(engine, settings) as (url, app), httpx.AsyncClient(base_url=url, timeout=None) as http:
        start = (await http.get("/v1/models")).json()["data"][0]["t2_policy"]["policy"]

        def swap(spec: str) -> Callable[[], Awaitable[str]]:
            async def reload() -> str:
                reply = await http.post("/admin/policy", json={"policy": spec}, headers=admin)
                assert reply.status_code == 200, reply.text
                return reply.json()["policy"]

            return reload

        outcomes, reloaded = await reload_under_load(
            http, app.state.head_reloader.thinker, body, [swap(s) for s in specs]
        )
        refused = await http.post("/admin/policy", json={"policy": "esc:window=zero"}, headers=admin)
        after = (await http.get("/v1/models")).json()["data"][0]["t2_policy"]
        last = (await http.post("/v1/chat/completions", json=body)).json()["t2"]

    policies = [start, *reloaded]  # in use after k reloads
    assert_each_ran_with_its_plan(outcomes, policies, "policy")
    assert {response.json()["t2"]["policy"] for _, _, response in outcomes} == set(policies)  # each ran
    assert policies[2].startswith("esc:") and after["spec"] == "fixed:n=3"
    assert_openai_error(refused, 400, "invalid_policy")
    assert after["policy"] == policies[-1] == last["policy"] == "fixed:n=3"


@pytest.mark.engine
async def test_a_server_watching_a_file_serves_it_from_the_first_request_and_follows_it(
    engine, server_settings, tmp_path
):
    watched = tmp_path / "current.json"
    tuned(tmp_path / "v1.json", "fixed:n=2")
    watched.write_text('{"policy": "@v1.json"}')
    recording = RecordingSettings(reload_watch=str(watched), reload_watch_interval_s=0.05)
    settings = server_settings.model_copy(update={"recording": recording, "admin_keys": ["adm"]})
    body = {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 4, "temperature": 0.8}
    async with serve(engine, settings) as (url, app), httpx.AsyncClient(base_url=url, timeout=None) as http:
        first = (await http.post("/v1/chat/completions", json=body)).json()["t2"]
        # A head with a policy that cannot run: neither is swapped in.
        pair = {"head": "default", "policy": "esc:window=zero"}
        refused = await http.post("/admin/head", json=pair, headers={"authorization": "Bearer adm"})
        models = (await http.get("/v1/models")).json()["data"][0]
        tuned(tmp_path / "v2.json", "fixed:n=3")
        watched.write_text('{"policy": "@v2.json"}')  # what the retrain job does, by a rename
        thinker = app.state.head_reloader.thinker
        assert await wait_until(lambda: thinker.default_policy == Fixed(3))
        card = (await http.get("/v1/models")).json()["data"][0]["t2_policy"]
        second = (await http.post("/v1/chat/completions", json=body)).json()["t2"]
    assert first["policy"] == "fixed:n=2" and first["n_used"] == 2
    assert_openai_error(refused, 400, "invalid_policy")
    assert models["t2_head"] is None and models["t2_policy"]["policy"] == "fixed:n=2"
    assert card["spec"] == f"@{tmp_path / 'v2.json'}" and second["policy"] == "fixed:n=3"
