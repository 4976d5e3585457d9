"""Hot reload of the estimator head (server/head_reload.py): the version, what a reload
refuses (and that the old head stays), the swap one request never straddles, SIGHUP, the
/admin keys, and a real server swapping heads under concurrent `auto` load."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from types import SimpleNamespace

import httpx
import pytest

from estimator.head import DEFAULT_HEAD, T2Head
from server.config import ParallelismSettings
from server.head_reload import HeadRefused, HeadReloader, head_path, head_version, load
from server.parallel import ParallelThinker
from tests.conftest import MODEL_NAME, wait_until
from tests.server.helpers import QUESTION, assert_openai_error, metric, serve, settings_with

GENERATOR_HEAD = DEFAULT_HEAD.with_name(DEFAULT_HEAD.name + "-generator")
SHIPPED = json.loads(DEFAULT_HEAD.with_suffix(".json").read_text())


def engine_for(capture: bool = True, hidden_size: int = SHIPPED["hidden_size"]) -> SimpleNamespace:
    """What `load` reads of the engine: the served model's state space (the shipped head's)."""
    info = SimpleNamespace(
        name=SHIPPED["model_name"],
        num_layers=SHIPPED["num_layers"],
        hidden_size=hidden_size,
        fingerprint=SHIPPED["model_fingerprint"],
    )
    return SimpleNamespace(info=info, settings=SimpleNamespace(capture=capture))


def copy_head(tmp_path, name: str = "head"):
    head = tmp_path / name
    for file in DEFAULT_HEAD.parent.glob(DEFAULT_HEAD.name + ".*"):
        shutil.copy(file, tmp_path / file.name.replace(DEFAULT_HEAD.name, name))
    return head


def reloader(start_spec: str | None = "default", **parallelism) -> HeadReloader:
    thinker = ParallelThinker(None, ParallelismSettings(**parallelism))  # type: ignore[arg-type]
    return HeadReloader(thinker, engine_for(), None, start_spec)


# -- the version ------------------------------------------------------------------------


def test_version_is_the_files_content_hash_at_the_load_time(tmp_path):
    head = copy_head(tmp_path)
    digest, _, loaded = head_version(head, 0.0).partition("@")
    assert len(digest) == 12 and loaded == "1970-01-01T00:00:00Z"
    assert head_version(head_path("default"), 0.0) == head_version(head, 0.0)  # same bytes, same hash
    assert head_version(head, 3600.0) == f"{digest}@1970-01-01T01:00:00Z"
    table = head.with_name("head.stopping.safetensors")
    table.write_bytes(table.read_bytes() + b"\0")  # a retrained table alone changes the version
    assert head_version(head, 0.0).partition("@")[0] != digest
    assert head_path(f"{head}.json") == head_path(f"{head}.safetensors") == head


# -- what a reload refuses --------------------------------------------------------------


@pytest.mark.parametrize("broken", ["other_model", "hidden_size", "corrupt", "missing"])
def test_a_head_that_cannot_serve_is_refused_with_the_reason(tmp_path, broken):
    head = copy_head(tmp_path)
    meta = dict(SHIPPED)
    if broken == "other_model":
        meta["model_fingerprint"] = "0123456789abcdef"
    head.with_suffix(".json").write_text(json.dumps(meta))
    if broken == "corrupt":
        head.with_suffix(".safetensors").write_bytes(b"not a tensor file")
    spec = str(tmp_path / "absent") if broken == "missing" else str(head)
    with pytest.raises(HeadRefused, match="cannot be used") as refused:
        load(spec, engine_for(hidden_size=1024 if broken == "hidden_size" else SHIPPED["hidden_size"]))
    reason = {"other_model": "fingerprint", "hidden_size": "hidden size 1024", "missing": "not found"}
    assert reason.get(broken, "") in str(refused.value)


def test_no_head_without_capture():
    with pytest.raises(HeadRefused, match="capture is off"):
        load("default", engine_for(capture=False))


async def test_a_refused_reload_keeps_the_old_head_and_is_counted(tmp_path):
    reload = reloader()
    card = await reload.reload("default")
    before = reload.thinker.current
    refused = metric("t2serve_head_reloads_total", source="api", outcome="refused")
    with pytest.raises(HeadRefused, match="not found"):
        await reload.reload(str(tmp_path / "absent"))
    assert reload.thinker.current is before and reload.card() == card
    assert metric("t2serve_head_reloads_total", source="api", outcome="refused") == refused + 1


async def test_a_head_the_default_policy_cannot_run_with_is_refused(tmp_path):
    head = copy_head(tmp_path)
    head.with_name("head.stopping.safetensors").unlink()  # t2+learned needs the table
    thinker = ParallelThinker(
        None, ParallelismSettings(policy="t2+learned"), estimator=T2Head.load(DEFAULT_HEAD)
    )  # type: ignore[arg-type]
    reload = HeadReloader(thinker, engine_for(), "default", "default")
    before = thinker.current
    with pytest.raises(HeadRefused, match="the policy in use \\(t2\\+learned\\) cannot run with it"):
        await reload.reload(str(head))
    assert thinker.current is before


# -- the swap ---------------------------------------------------------------------------


async def test_a_plan_keeps_the_head_it_was_resolved_with():
    reload = reloader()
    thinker = reload.thinker
    first = await reload.reload("default")
    planned = thinker.plan("auto")
    explored = thinker.explored(planned)
    second = await reload.reload(str(GENERATOR_HEAD), margin=2.0)
    assert first.version != second.version and second.margin == 2.0
    assert thinker.using(planned).version == thinker.using(explored).version == first.version
    assert thinker.using(thinker.plan("auto")).version == second.version
    assert planned.policy.margin == first.margin  # the policy was parsed for the old head too
    assert thinker.plan("auto").policy.margin == 2.0 == thinker.margin


async def test_sighup_reloads_the_start_head():
    reload = reloader(start_spec=str(GENERATOR_HEAD))
    ok = metric("t2serve_head_reloads_total", source="sighup", outcome="ok")
    reload.on_sighup()
    assert await wait_until(lambda: reload.card() is not None)
    card = reload.card()
    assert card is not None and card.spec == str(GENERATOR_HEAD) and card.stopping and card.gate
    assert metric("t2serve_head_reloads_total", source="sighup", outcome="ok") == ok + 1
    version = card.version
    reload.on_sighup()  # the same files again: the same hash, a new load
    assert await wait_until(
        lambda: metric("t2serve_head_reloads_total", source="sighup", outcome="ok") == ok + 2
    )
    assert reload.thinker.current.version.partition("@")[0] == version.partition("@")[0]


async def test_sighup_without_a_start_head_changes_nothing():
    reload = reloader(start_spec=None)
    reload.on_sighup()
    await asyncio.sleep(0)
    assert reload.thinker.estimator is None and not reload._signalled


# -- /admin keys, before the body -------------------------------------------------------


@pytest.mark.parametrize(
    ("admin_keys", "token", "status", "code"),
    [
        ([], "adm", 403, "admin_disabled"),
        (["adm"], None, 401, "invalid_api_key"),
        (["adm"], "x", 401, "invalid_api_key"),
    ],
)
async def test_admin_routes_take_an_admin_key_before_the_body(
    server_settings, admin_keys, token, status, code
):
    from server.app import create_app

    settings = server_settings.model_copy(update={"admin_keys": admin_keys, "api_keys": ["api"]})
    app = create_app(settings)  # its lifespan never runs: the middleware answers first
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        response = await http.post("/admin/head", content=b"{not json", headers=headers)
        api_key = await http.post(
            "/admin/head", json={"head": "default"}, headers={"authorization": "Bearer api"}
        )
    assert_openai_error(response, status, code)
    assert_openai_error(api_key, 403 if not admin_keys else 401)  # an API key is no admin key


# -- a real server under load -----------------------------------------------------------

# (reloads ended when it was sent, reloads begun when it was answered, the response)
Outcome = tuple[int, int, httpx.Response]


async def reload_under_load(
    http: httpx.AsyncClient, thinker: ParallelThinker, body: dict, reloads: list[Callable[[], Awaitable[str]]]
) -> tuple[list[Outcome], list[str]]:
    """Four clients send `body` in a loop while each reload in turn runs, once samples are in
    the engine (polling, not timing); each reload returns the version its reply names. The
    requests, and those versions; each reload waits for a request sent after it to finish."""
    begun = ended = 0
    stop = asyncio.Event()
    outcomes: list[Outcome] = []

    async def client() -> None:
        while not stop.is_set():
            sent = ended
            response = await http.post("/v1/chat/completions", json=body)
            outcomes.append((sent, begun, response))

    clients = [asyncio.ensure_future(client()) for _ in range(4)]
    versions = []
    for reload in reloads:
        assert await wait_until(lambda: thinker.samples_in_flight > 0)
        begun += 1
        versions.append(await reload())
        ended += 1
        assert await wait_until(lambda epoch=ended: any(sent == epoch for sent, _, _ in outcomes))
    stop.set()
    await asyncio.gather(*clients)
    return outcomes, versions


def assert_each_ran_with_its_plan(outcomes: list[Outcome], versions: list[str], field: str) -> None:
    """No request failed, and each ran with the `t2.<field>` in use when it was planned: one
    between its send and its reply (`versions[k]`: in use after k reloads)."""
    assert all(response.status_code == 200 for _, _, response in outcomes), [
        r.text for _, _, r in outcomes if r.status_code != 200
    ]
    for sent, replied, response in outcomes:
        ran = response.json()["t2"][field]
        assert ran in versions[sent : replied + 1]
        if sent == replied:  # no reload began while it ran
            assert ran == versions[sent]


@pytest.mark.engine
async def test_reload_under_concurrent_auto_load_drops_nothing(engine, server_settings, tmp_path):
    parallelism = server_settings.parallelism.model_copy(update={"estimator_head": str(DEFAULT_HEAD)})
    settings = settings_with(server_settings, parallelism=parallelism).model_copy(
        update={"admin_keys": ["adm"]}
    )
    admin = {"authorization": "Bearer adm"}
    body = {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 8, "temperature": 0.8}
    ok = metric("t2serve_head_reloads_total", source="api", outcome="ok")
    async with serve(engine, settings) as (url, app), httpx.AsyncClient(base_url=url, timeout=None) as http:
        models = (await http.get("/v1/models")).json()["data"][0]
        assert models["t2_head"]["spec"] == str(DEFAULT_HEAD)

        def swap(spec) -> Callable[[], Awaitable[str]]:
            async def reload() -> str:
                reply = await http.post("/admin/head", json={"head": str(spec)}, headers=admin)
                assert reply.status_code == 200, reply.text
                return reply.json()["version"]

            return reload

        heads = [GENERATOR_HEAD, DEFAULT_HEAD, GENERATOR_HEAD, DEFAULT_HEAD]
        outcomes, reloaded = await reload_under_load(
            http, app.state.head_reloader.thinker, body, [swap(h) for h in heads]
        )
        refused = await http.post("/admin/head", json={"head": str(tmp_path / "absent")}, headers=admin)
        after = (await http.get("/v1/models")).json()["data"][0]["t2_head"]
        last = (await http.post("/v1/chat/completions", json=body)).json()["t2"]

    versions = [models["t2_head"]["version"], *reloaded]  # epoch k's version; epoch 0: the start head
    assert_each_ran_with_its_plan(outcomes, versions, "head")
    assert len({response.json()["t2"]["head"] for _, _, response in outcomes}) > 1
    digests = [version.partition("@")[0] for version in versions]
    assert digests[0::2] == [digests[0]] * 3 and digests[1::2] == [digests[1]] * 2 != [digests[0]] * 2
    assert_openai_error(refused, 400, "invalid_head")
    assert after["version"] == versions[-1] == last["head"] and last["estimator"] == "t2"
    assert metric("t2serve_head_reloads_total", source="api", outcome="ok") == ok + 4
