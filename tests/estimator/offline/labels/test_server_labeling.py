"""`t2serve label --server` (estimator/offline/labels/server_labeling.py): the gold file, the
choice of server and the reading of replies; then the command against two real servers on the
session's engine sharing one label store: every record's request id is in the gold file."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from estimator.label_store import load_labels
from estimator.offline.inputs.problems import Problem
from estimator.offline.labels.server_labeling import (
    GoldFile,
    ServerPool,
    gold_line,
    label_through_servers,
    read_gold,
    reply_of,
)
from tests.conftest import ROOT

PROBLEM = Problem("p1", "What is 2 + 3?", "5", "sum", 1, "train", source="builtin", aliases=("five",))


def test_a_gold_line_has_exactly_the_joined_fields():
    assert gold_line("rid", PROBLEM) == {
        "request_id": "rid",
        "answer": "5",
        "source": "builtin",
        "problem_id": "p1",
        "split": "train",
    }


def test_the_gold_file_is_published_whole_and_only_complete_lines_are_read(tmp_path):
    gold = GoldFile(tmp_path, "client-1", publish_every=2)
    gold.add(gold_line("r0", PROBLEM))
    assert not gold.path.exists()  # nothing published yet
    gold.add(gold_line("r1", PROBLEM))
    assert gold.path.read_text().count("\n") == 2  # published at the second line
    gold.add(gold_line("r2", PROBLEM))
    assert set(read_gold(tmp_path)) == {"r0", "r1"}  # the third waits for the next publication
    gold.publish()
    assert set(read_gold(tmp_path)) == {"r0", "r1", "r2"}
    assert [p.name for p in tmp_path.iterdir()] == ["gold-client-1.jsonl"]  # no temporary left
    assert all(json.loads(line) for line in gold.path.read_text().splitlines())


def test_the_least_busy_server_is_picked_and_equals_take_turns():
    pool = ServerPool(["http://a/", "http://b", "http://c"])
    assert pool.urls == ["http://a", "http://b", "http://c"]
    assert [pool.pick() for _ in range(4)] == [0, 1, 2, 0]  # all idle: round robin
    pool.busy = [2, 0, 1]
    assert pool.pick() == 1
    pool.busy = [1, 1, 1]
    assert pool.pick() == 2  # after 1: the next among equals
    with pytest.raises(ValueError):
        ServerPool([])


def test_a_reply_is_read_from_its_t2_object():
    body = {"t2": {"explored": True, "answer": "5", "votes": {"5": 3, "6": 1}, "launched": 4, "n_max": 4}}
    reply = reply_of(PROBLEM, "rid", "http://a", 200, body)
    assert reply.explored and reply.correct and reply.right_share == 0.75 and reply.launched == 4
    assert reply_of(
        PROBLEM, "rid", "http://a", 200, {"t2": {"answer": "five", "votes": {}}}
    ).correct  # an alias
    refused = reply_of(PROBLEM, "rid", "http://a", 429, {})
    assert refused.status == "429" and not refused.explored and not refused.correct


async def test_forcing_exploration_needs_an_admin_key(tmp_path):
    with pytest.raises(ValueError, match="admin key"):
        await label_through_servers(
            [PROBLEM], ["http://127.0.0.1:9"], tmp_path, temperature=0.3, max_tokens=8
        )


@pytest.mark.parametrize("flag", [["--n-max", "8"], ["--aggregate", "consensus"], ["--shard-size", "4"]])
def test_label_server_refuses_what_the_servers_decide(flag, tmp_path, monkeypatch):
    from server.cli import main

    monkeypatch.delenv("T2SERVE_ADMIN_KEYS", raising=False)
    with pytest.raises(SystemExit, match="servers' to decide"):
        main(["label", "--server", "http://127.0.0.1:9", "--out", str(tmp_path), *flag])


def test_label_server_without_an_admin_key_stops_before_sending(tmp_path, monkeypatch):
    from server.cli import main

    monkeypatch.delenv("T2SERVE_ADMIN_KEYS", raising=False)
    with pytest.raises(SystemExit, match="admin key"):
        main(["label", "--server", "http://127.0.0.1:9", "--count", "2", "--out", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []  # nothing written


async def test_label_through_two_servers_leaves_records_joined_by_the_gold_file(
    engine, server_settings, tmp_path
):
    from server.config import RecordingSettings
    from tests.server.helpers import serve

    store = tmp_path / "store"

    def replica(name: str):
        recording = RecordingSettings(record_dir=str(store), replica=name)
        return server_settings.model_copy(update={"recording": recording, "admin_keys": ["admin"]})

    async with serve(engine, replica("a")) as (url_a, _), serve(engine, replica("b")) as (url_b, _):
        proc = await asyncio.create_subprocess_exec(
            *[sys.executable, "-m", "server.cli", "label", "--server", url_a, "--server", url_b],
            *["--admin-key", "admin", "--count", "6", "--max-tokens", "8", "--concurrency", "3"],
            *["--out", str(store)],
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        output = (await proc.communicate())[0].decode()
        assert proc.returncode == 0, output
    # The servers stopped: their queues were flushed into the store.
    records, _ = load_labels(store)
    gold = read_gold(store)
    assert len(records) == len(gold) == 6 and "explored 6" in output
    assert {r["request_id"] for r in records} == set(gold)
    assert {r["replica"] for r in records} == {"a", "b"}  # both servers took questions
    assert all(
        set(line) == {"request_id", "answer", "source", "problem_id", "split"} for line in gold.values()
    )
    assert all(line["source"] == "builtin" and line["answer"] for line in gold.values())
    assert len(list(store.glob("gold-*.jsonl"))) == 1 and not list(store.glob(".gold-*"))
