"""Traffic records (server/recording.py): what a record holds (no text unless asked), the
bounded queue and the writer (written / dropped_full / dropped_error, flushed at stop); then
explored requests through the real server writing records that the label loader reads (and
feeding the live gauge, server/shadow.py)."""

from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np

from estimator.label_store import load_labels
from server.config import RecordingSettings
from server.parallel import Deadline
from server.recording import Record, Recorder, traffic_records
from tests.conftest import MODEL_NAME, wait_until
from tests.server.engine_double import Finish, Hang, ScriptedEngine
from tests.server.helpers import PROMPT, QUESTION, metric, params, serve, thinker_for

MODEL = {"name": "m", "num_layers": 3, "hidden_size": 4, "fingerprint": "f"}


def written(outcome: str) -> float:
    return metric("t2serve_label_records_total", outcome=outcome)


async def explored_result(script=lambda i: Finish(str(i % 2)), **plan):
    engine = ScriptedEngine(script)
    thinker = thinker_for(engine)
    return await thinker.run(
        PROMPT, params(seed=3), thinker.explored(thinker.plan("auto", **plan)), request_id="req"
    )


def records_of(result, **extra) -> list[Record]:
    return traffic_records(
        result,
        request_id="req",
        prompt=0,
        params=params(seed=3),
        model=MODEL,
        replica="r",
        shape=(3, 4),
        **extra,
    )


async def test_a_record_holds_the_pool_in_finishing_order_and_no_text_unless_asked():
    result = await explored_result(n_choices=2)
    records = records_of(result)
    assert [r.body["id"] for r in records] == ["req-p0-c0", "req-p0-c1"]
    body = records[0].body
    assert body["samples"] == result.finish_order[0] and len(body["answers"]) == body["n_max"] == 4
    by_number = {s.number: s.answer for s in result.choices[0].samples}
    assert body["answers"] == [by_number[n] for n in body["samples"]]
    assert body["vote"] == result.choices[0].vote.answer and body["aggregate"] == result.aggregate
    assert body["sampling"] == {"temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "seed": 3}
    assert body["model"] == MODEL and body["replica"] == "r" and body["states_captured"]
    assert records[0].states.shape == (3, 4) and np.isfinite(records[0].states).all()
    assert "texts" not in body and "prompt_text" not in body
    with_text = records_of(result, prompt_text="the prompt")[0].body
    assert with_text["prompt_text"] == "the prompt" and len(with_text["texts"]) == 4


async def test_a_pool_cut_by_the_deadline_is_not_recorded():
    engine = ScriptedEngine(lambda i: Finish("1") if i == 0 else Hang())
    thinker = thinker_for(engine)
    deadline = Deadline(None)
    plan = thinker.explored(thinker.plan("auto"))
    task = asyncio.ensure_future(thinker.run(PROMPT, params(), plan, request_id="r", deadline=deadline))
    assert await wait_until(lambda: len(engine.requests) == 4)
    deadline.expire()
    result = await task
    assert result.timed_out and records_of(result) == []


def record(i: int) -> Record:
    return Record({"id": f"r{i}", "answers": ["1"]}, np.full((3, 4), i, np.float32))


async def test_the_writer_appends_what_is_queued_and_flushes_at_stop(tmp_path):
    recorder = Recorder(RecordingSettings(record_dir=str(tmp_path), record_queue=2, replica="r1"))
    before = {o: written(o) for o in ("written", "dropped_full")}
    recorder.submit([record(0), record(1), record(2)])  # the queue holds 2: the third is dropped
    assert written("dropped_full") == before["dropped_full"] + 1
    await recorder.start()
    await recorder.stop()  # nothing queued is lost
    assert written("written") == before["written"] + 2
    records, states = load_labels(tmp_path)
    assert [r["id"] for r in records] == ["r0", "r1"] and states[:, 0, 0].tolist() == [0, 1]
    assert [p.name for p in sorted(tmp_path.glob("shard-*.json"))] == ["shard-r1-00000000.json"]


async def test_a_store_that_fails_drops_the_records_and_counts_them(tmp_path):
    recorder = Recorder(RecordingSettings(record_dir=str(tmp_path / "store"), replica="r1"))
    (tmp_path / "store").rmdir()
    (tmp_path / "store").write_text("not a folder")  # every write fails now
    before = written("dropped_error")
    await recorder.start()
    recorder.submit([record(0), record(1)])
    await recorder.stop()
    assert written("dropped_error") == before + 2


async def test_explored_requests_write_records_the_label_loader_reads(engine, server_settings, tmp_path):
    """Every request explored (--explore-share 1): the records load with the label loader,
    with the prompt's states and no text; with --record-text the texts are kept."""
    body = {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 8, "temperature": 0.8, "n": 2}
    pools = metric("t2serve_shadow_pools_total")
    for store, text in [(tmp_path / "plain", False), (tmp_path / "text", True)]:
        recording = RecordingSettings(explore_share=1.0, record_dir=str(store), record_text=text, replica="a")
        settings = server_settings.model_copy(update={"recording": recording})
        async with serve(engine, settings) as (url, _), httpx.AsyncClient(timeout=None) as http:
            for _ in range(2):
                reply = await http.post(f"{url}/v1/chat/completions", json=body)
                assert reply.status_code == 200 and reply.json()["t2"]["explored"] is True
        records, states = load_labels(store)  # the server stopped: its queue was flushed
        assert len(records) == 4 and {r["choice"] for r in records} == {0, 1}
        assert (
            states.shape == (4, engine.info.num_layers, engine.info.hidden_size) and np.isfinite(states).all()
        )
        assert all(r["states_captured"] and len(r["answers"]) == r["n_max"] == 4 for r in records)
        assert all(r["model"]["name"] == MODEL_NAME and r["sampling"]["temperature"] == 0.8 for r in records)
        raw = "".join(p.read_text() for p in store.glob("shard-*.json"))
        if text:
            assert all(len(r["texts"]) == 4 and "2 + 3" in r["prompt_text"] for r in records)
        else:
            assert "texts" not in raw and "prompt_text" not in raw and QUESTION[0]["content"] not in raw
            assert all(set(r) >= {"request_id", "time", "replica", "vote", "samples"} for r in records)
    json.loads((tmp_path / "plain" / "shard-a-00000000.json").read_text())  # named by replica and sequence
    # Every pool fed the live gauge too; fixed N_max agrees with itself.
    assert metric("t2serve_shadow_pools_total") == pools + 8
    assert metric("t2serve_shadow_agreement", policy="fixed:n=4") == 1.0
