"""The label store (estimator/label_store.py): shards are whole or absent, never overwritten;
several processes append to one folder with no lock and lose nothing; a writer killed with
SIGKILL mid-shard leaves nothing the loader reads."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from estimator.label_store import ShardAppender, load_labels, load_records, shard_complete, write_shard

ROOT = Path(__file__).resolve().parents[2]


def records(prefix: str, n: int) -> list[dict]:
    return [{"id": f"{prefix}-{i}", "answers": ["1", None]} for i in range(n)]


def states(n: int, value: float = 1.0) -> np.ndarray:
    return np.full((n, 2, 3), value, np.float32)


def test_a_shard_round_trips_and_is_never_overwritten(tmp_path):
    write_shard(tmp_path, 0, records("a", 2), states(2))
    assert shard_complete(tmp_path, 0)
    with pytest.raises(FileExistsError):
        write_shard(tmp_path, 0, records("b", 1), states(1))
    loaded, st = load_labels(tmp_path)
    assert [r["id"] for r in loaded] == ["a-0", "a-1"] and st.shape == (2, 2, 3)
    assert not list(tmp_path.glob(".*"))  # no temporary file is left behind


def test_an_appender_names_shards_by_replica_and_sequence_and_skips_taken_ones(tmp_path):
    first = ShardAppender(tmp_path, "pod/a")  # a name that is no file name is cleaned
    assert first.append(records("x", 1), states(1)).name == "shard-pod_a-00000000.json"
    (tmp_path / "shard-pod_a-00000001.npz").write_bytes(b"left by a killed writer")
    again = ShardAppender(tmp_path, "pod/a")  # the replica restarted
    assert again.append(records("y", 1), states(1)).name == "shard-pod_a-00000002.json"
    assert [r["id"] for r in load_records(tmp_path)] == ["x-0", "y-0"]


WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from estimator.label_store import ShardAppender
    folder, replica, shards = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = ShardAppender(folder, replica)
    for k in range(shards):
        ids = [f"{replica}-{k}-{i}" for i in range(3)]
        store.append([{"id": i} for i in ids], np.full((3, 8, 64), k, np.float32))
        print(*ids, flush=True)  # acknowledged: the shard is in the store
    """
)


def test_two_processes_append_to_one_folder_concurrently_and_lose_nothing(tmp_path):
    # Both use the same replica name, so they race for every sequence number.
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), "same", "40"],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    acknowledged = []
    for writer in writers:
        out, _ = writer.communicate(timeout=600)
        assert writer.returncode == 0
        acknowledged += out.split()
    loaded, st = load_labels(tmp_path)  # verifies every shard's checksum
    ids = [r["id"] for r in loaded]
    assert sorted(ids) == sorted(acknowledged) and len(ids) == 2 * 40 * 3
    assert len(list(tmp_path.glob("shard-*.json"))) == 80 and st.shape == (240, 8, 64)


KILLED = textwrap.dedent(
    """
    import os, signal, sys, numpy as np
    from estimator import label_store
    folder, when = sys.argv[1], sys.argv[2]
    store = label_store.ShardAppender(folder, "k")
    store.append([{"id": "kept"}], np.zeros((1, 8, 64), np.float32))
    print("kept", flush=True)
    publish = label_store._publish
    def killed(tmp, final):
        if when == "before-npz" or final.suffix == ".json":
            os.kill(os.getpid(), signal.SIGKILL)  # mid-shard: its files half written
        publish(tmp, final)
    label_store._publish = killed
    store.append([{"id": "lost"}], np.ones((1, 8, 64), np.float32))
    """
)


@pytest.mark.parametrize("when", ["before-npz", "before-json"])
def test_a_writer_killed_mid_shard_leaves_nothing_the_loader_reads(tmp_path, when):
    proc = subprocess.run(
        [sys.executable, "-c", KILLED, str(tmp_path), when],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -9 and proc.stdout.split() == ["kept"]
    loaded, st = load_labels(tmp_path)
    assert [r["id"] for r in loaded] == ["kept"] and st.shape == (1, 8, 64)
    for meta in tmp_path.glob("shard-*.json"):
        assert shard_complete(tmp_path, meta.stem.removeprefix("shard-"))
    # The replica's next life appends past whatever the killed writer left.
    ShardAppender(tmp_path, "k").append([{"id": "next"}], np.zeros((1, 8, 64), np.float32))
    assert [r["id"] for r in load_records(tmp_path)] == ["kept", "next"]
    assert all(json.loads(m.read_text())["records"] for m in tmp_path.glob("shard-*.json"))
