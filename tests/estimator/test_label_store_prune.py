"""The label store's retention bound (estimator.label_store.prune_store, `t2serve store
prune`): whole shards go, oldest first, .json before .npz; the newest are kept under an age
or a size bound; `t2serve label` shards only when asked; several pruners at once, beside a
loader, neither crash nor leave a half shard; what killed writers left is cleared."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from estimator.label_store import (
    ORPHAN_AGE_S,
    ShardAppender,
    load_labels,
    load_records,
    prune_store,
    stored_shards,
    write_shard,
)
from server.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
NOW = 1_800_000_000.0
DAY = 86_400.0


def traffic(folder: Path, ages_days: list[float], replica: str = "pod") -> list[str]:
    """One traffic shard per age (days before NOW), oldest first; their record ids."""
    store = ShardAppender(folder, replica)
    ids = []
    for k, age in enumerate(ages_days):
        meta = store.append([{"id": f"{replica}-{k}"}], np.full((1, 2, 3), k, np.float32))
        committed = NOW - age * DAY
        os.utime(meta, (committed, committed))
        ids.append(f"{replica}-{k}")
    return ids


def test_an_age_bound_removes_the_older_shards_whole_and_the_loader_reads_the_rest(tmp_path):
    ids = traffic(tmp_path, [40, 31, 29, 2, 0])
    pruned = prune_store(tmp_path, max_age_s=30 * DAY, now=NOW)
    assert (pruned.shards, pruned.kept) == (2, 3)
    records, states = load_labels(tmp_path)
    assert [r["id"] for r in records] == ids[2:] and states[:, 0, 0].tolist() == [2, 3, 4]
    assert len(list(tmp_path.glob("shard-*.npz"))) == 3  # no .npz left without its .json
    assert prune_store(tmp_path, max_age_s=30 * DAY, now=NOW).shards == 0  # nothing more to do


def test_a_size_bound_keeps_the_newest_shards_that_fit(tmp_path):
    ids = traffic(tmp_path, [5, 4, 3, 2, 1])
    sizes = [s.size for s in stored_shards(tmp_path)]
    pruned = prune_store(tmp_path, max_bytes=sum(sizes[-2:]), now=NOW)
    assert (pruned.shards, pruned.bytes, pruned.kept) == (3, sum(sizes[:3]), 2)
    assert pruned.kept_bytes == sum(sizes[-2:])
    assert [r["id"] for r in load_records(tmp_path)] == ids[-2:]
    # Both bounds: the tighter one wins.
    assert prune_store(tmp_path, max_age_s=1.5 * DAY, max_bytes=10**9, now=NOW).kept == 1


def test_label_shards_are_kept_unless_asked_for(tmp_path):
    write_shard(tmp_path, 0, [{"id": "gold-0"}], np.zeros((1, 2, 3), np.float32))
    os.utime(tmp_path / "shard-00000.json", (NOW - 90 * DAY, NOW - 90 * DAY))
    traffic(tmp_path, [60, 1])
    pruned = prune_store(tmp_path, max_age_s=30 * DAY, max_bytes=0, now=NOW)
    assert (pruned.shards, pruned.kept) == (2, 0)  # the label shard is neither pruned nor counted
    assert [r["id"] for r in load_records(tmp_path)] == ["gold-0"]
    assert prune_store(tmp_path, max_age_s=30 * DAY, include_labels=True, now=NOW).shards == 1
    assert not list(tmp_path.iterdir())


def test_what_killed_writers_left_is_cleared_once_old(tmp_path):
    traffic(tmp_path, [0])
    orphan = tmp_path / "shard-pod-00000007.npz"  # a writer killed between its .npz and .json
    temporary = tmp_path / ".shard-pod-00000008.ab12.tmp.npz"  # killed before linking
    fresh = tmp_path / "shard-pod-00000009.npz"  # a writer linking its .json right now
    label_orphan = tmp_path / "shard-00003.npz"  # `t2serve label` redoes it itself
    for path in (orphan, temporary, fresh, label_orphan):
        path.write_bytes(b"x")
    for path in (orphan, temporary, label_orphan):
        os.utime(path, (NOW - 2 * ORPHAN_AGE_S, NOW - 2 * ORPHAN_AGE_S))
    os.utime(fresh, (NOW - 1, NOW - 1))
    pruned = prune_store(tmp_path, max_age_s=30 * DAY, now=NOW)
    assert (pruned.shards, pruned.orphans) == (0, 2)
    assert not orphan.exists() and not temporary.exists() and fresh.exists() and label_orphan.exists()
    assert len(load_records(tmp_path)) == 1


PRUNER = textwrap.dedent(
    """
    import json, os, sys, time
    from dataclasses import asdict
    from estimator.label_store import prune_store
    folder, max_bytes, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    while not os.path.exists(go):  # all start at once
        time.sleep(0.001)
    print(json.dumps(asdict(prune_store(folder, max_bytes=max_bytes))), flush=True)
    """
)
LOADER = textwrap.dedent(
    """
    import os, sys, time
    from estimator.label_store import load_labels
    folder, go, done = sys.argv[1], sys.argv[2], sys.argv[3]
    while not os.path.exists(go):
        time.sleep(0.001)
    loads = 0
    while not os.path.exists(done) or loads < 3:
        records, states = load_labels(folder)  # checksums verified: no half shard is read
        assert len(records) == len(states) and records, len(records)
        loads += 1
    print(loads, flush=True)
    """
)


def test_concurrent_pruners_beside_a_loader_neither_crash_nor_remove_twice(tmp_path):
    store = tmp_path / "store"
    ids = traffic(store, [float(200 - k) / 10 for k in range(200)])
    sizes = [s.size for s in stored_shards(store)]
    keep = sum(sizes[-50:])
    go, done = tmp_path / "go", tmp_path / "done"
    run = {"cwd": ROOT, "stdout": subprocess.PIPE, "text": True}
    loader = subprocess.Popen([sys.executable, "-c", LOADER, str(store), str(go), str(done)], **run)
    pruners = [
        subprocess.Popen([sys.executable, "-c", PRUNER, str(store), str(keep), str(go)], **run)
        for _ in range(3)
    ]
    go.touch()  # all start pruning at once
    outcomes = []
    for pruner in pruners:
        out, _ = pruner.communicate(timeout=600)
        assert pruner.returncode == 0
        outcomes.append(json.loads(out))
    done.touch()
    out, _ = loader.communicate(timeout=600)
    assert loader.returncode == 0 and int(out) >= 3
    assert sum(o["shards"] for o in outcomes) == 150  # each shard removed by one of them
    assert all(o["kept"] == 50 for o in outcomes)
    assert [r["id"] for r in load_labels(store)[0]] == ids[-50:]
    assert len(list(store.glob("shard-*.npz"))) == 50


def test_the_prune_command_reports_each_folder_and_needs_a_bound(tmp_path, capsys):
    traffic(tmp_path, [100, -1])  # NOW is ahead of the clock: 100 days before it is over 30 days ago
    args = build_parser().parse_args(["store", "prune", "--labels", str(tmp_path), "--max-age-days", "30"])
    args.run(args)
    report = json.loads(capsys.readouterr().out)
    assert report["store"] == str(tmp_path) and (report["shards"], report["kept"]) == (1, 1)
    with pytest.raises(SystemExit) as no_bound:
        args = build_parser().parse_args(["store", "prune", "--labels", str(tmp_path)])
        args.run(args)
    assert no_bound.value.code == 2
