"""The label store: one folder of append-only shards, shared by `t2serve label` and by every
serving replica's traffic records (server/recording.py), read by one loader.

    shard-<name>.npz    states [Q, L, d] float16, ids [Q]
    shard-<name>.json   {"sha256": of the .npz, "records": [Q records, dicts]}

<name> is the shard's index for `t2serve label` (00000, 00001, ...: a killed run resumes at
the first missing one) and <replica>-<sequence> for a server's records. Each file is written
under a temporary name (a leading dot: the loader never matches it), synced, then hard-linked
to its final name, which fails if that name exists: a shard is whole or absent, never
overwritten, so any number of processes append to one folder (a volume every pod mounts)
with no lock. The .json is the shard's commit, linked after its .npz: a writer killed
between the two leaves a .npz that no loader reads, and the next writer of that replica
skips its sequence number.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path

import numpy as np

SHARD_GLOB = "shard-*.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_name(index: int) -> str:
    """The name of `t2serve label`'s shard `index`."""
    return f"{index:05d}"


def shard_paths(folder: Path, name: int | str) -> tuple[Path, Path]:
    """The .npz and .json of a shard, by label index or by name."""
    stem = f"shard-{shard_name(name) if isinstance(name, int) else name}"
    return folder / f"{stem}.npz", folder / f"{stem}.json"


def shard_complete(folder: Path, name: int | str) -> bool:
    npz, meta = shard_paths(folder, name)
    if not (npz.is_file() and meta.is_file()):
        return False
    try:
        return json.loads(meta.read_text())["sha256"] == _sha256(npz)
    except (json.JSONDecodeError, KeyError):
        return False


def discard_shard(folder: Path, name: int | str) -> None:
    """Remove an incomplete shard's files (`t2serve label` redoes it)."""
    for path in shard_paths(folder, name):
        path.unlink(missing_ok=True)


def _publish(tmp: Path, final: Path) -> None:
    """`tmp` (written) under the name `final`, atomically; FileExistsError if `final` exists."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    try:
        os.link(tmp, final)
    finally:
        tmp.unlink()


def write_shard(folder: Path, name: int | str, records: list[dict], states: np.ndarray) -> None:
    """Append one shard (states [Q, L, d], stored float16); FileExistsError if it exists."""
    npz, meta = shard_paths(folder, name)
    token = uuid.uuid4().hex  # temporary names of concurrent writers never meet
    tmp = folder / f".{npz.stem}.{token}.tmp.npz"
    np.savez(tmp, states=states.astype(np.float16), ids=np.array([r["id"] for r in records]))
    _publish(tmp, npz)
    tmp_meta = folder / f".{meta.stem}.{token}.tmp.json"
    tmp_meta.write_text(json.dumps({"sha256": _sha256(npz), "records": records}))
    _publish(tmp_meta, meta)


def replica_name(name: str) -> str:
    """A replica's name as shard names carry it (letters, digits, '.', '_' and '-')."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    if not cleaned:
        raise ValueError(f"replica name {name!r} has nothing usable in a file name")
    return cleaned


class ShardAppender:
    """One replica's writer: appends shards named <replica>-<sequence> to a shared folder.
    A sequence number already taken (this replica's earlier life, or a writer killed after
    its .npz) is skipped."""

    def __init__(self, folder: Path, replica: str):
        self.folder = Path(folder)
        self.replica = replica_name(replica)
        self.folder.mkdir(parents=True, exist_ok=True)
        pattern = re.compile(rf"shard-{re.escape(self.replica)}-(\d+)\.(?:npz|json)")
        taken = [int(m.group(1)) for p in self.folder.iterdir() if (m := pattern.fullmatch(p.name))]
        self.sequence = max(taken, default=-1) + 1

    def append(self, records: list[dict], states: np.ndarray) -> Path:
        """Write one shard; returns its .json (once it exists, the records are stored)."""
        while True:
            name = f"{self.replica}-{self.sequence:08d}"
            self.sequence += 1
            try:
                write_shard(self.folder, name, records, states)
            except FileExistsError:
                continue
            return shard_paths(self.folder, name)[1]


def load_records(folder: Path) -> list[dict]:
    """Every record of a store folder, without the states (shards in name order)."""
    records = []
    for meta in sorted(Path(folder).glob(SHARD_GLOB)):
        records += json.loads(meta.read_text())["records"]
    return records


def load_labels(folder: Path, verify: bool = True) -> tuple[list[dict], np.ndarray]:
    """All records and states [Q, L, d] float32 of a store folder (checksums verified)."""
    records, states = [], []
    for meta in sorted(Path(folder).glob(SHARD_GLOB)):
        body = json.loads(meta.read_text())
        npz = meta.with_suffix(".npz")
        if verify and _sha256(npz) != body["sha256"]:
            raise ValueError(f"{npz} does not match its checksum")
        with np.load(npz) as data:
            states.append(data["states"].astype(np.float32))
        records += body["records"]
    if not records:
        raise ValueError(f"no label shards in {folder}")
    return records, np.concatenate(states)
