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

A retention bound (`prune_store`, run by `t2serve store prune`) removes whole shards, oldest
first: each shard's .json before its .npz, so a loader listing the folder never finds a
shard without its states; several pruners on one folder at once each remove what is still
there (a file another one removed is skipped). `t2serve label` shards (an index for a name)
are kept unless asked for: a labelling run treats a missing index as work to redo.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHARD_GLOB = "shard-*.json"
LABEL_SHARD = re.compile(r"shard-(\d+)")  # `t2serve label`'s stem: an index, no replica
# A .npz without its .json this old is a killed writer's (a writer links its .json right after).
ORPHAN_AGE_S = 3600.0


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
        try:
            records += json.loads(meta.read_text())["records"]
        except FileNotFoundError:
            continue  # pruned since the folder was listed
    return records


def _read_states(npz: Path, sha256: str | None) -> np.ndarray:
    """A shard's states as float32, its checksum checked against `sha256` (None: not checked)."""
    if sha256 is not None and _sha256(npz) != sha256:
        raise ValueError(f"{npz} does not match its checksum")
    with np.load(npz) as data:
        return data["states"].astype(np.float32)


def load_labels(folder: Path, verify: bool = True) -> tuple[list[dict], np.ndarray]:
    """All records and states [Q, L, d] float32 of a store folder (checksums verified)."""
    records, states = [], []
    for meta in sorted(Path(folder).glob(SHARD_GLOB)):
        try:
            body = json.loads(meta.read_text())
            shard = _read_states(meta.with_suffix(".npz"), body["sha256"] if verify else None)
        except FileNotFoundError:
            if meta.exists():
                raise
            continue  # pruned since the folder was listed (its .json goes first)
        states.append(shard)
        records += body["records"]
    if not records:
        raise ValueError(f"no label shards in {folder}")
    return records, np.concatenate(states)


# -- retention --------------------------------------------------------------------------


@dataclass(frozen=True)
class StoredShard:
    """A committed shard (its .json exists) as retention sees it."""

    json: Path
    npz: Path
    committed: float  # the .json's mtime: when the shard was committed
    size: int  # bytes of both files

    @property
    def is_label(self) -> bool:
        return LABEL_SHARD.fullmatch(self.json.stem) is not None


def stored_shards(folder: Path) -> list[StoredShard]:
    """The committed shards of a store folder, oldest first (commit time, then name); a
    shard removed while the folder is read is left out."""
    shards = []
    for meta in Path(folder).glob(SHARD_GLOB):
        npz = meta.with_suffix(".npz")
        try:
            stat = meta.stat()
            size = stat.st_size + (npz.stat().st_size if npz.exists() else 0)
        except FileNotFoundError:
            continue
        shards.append(StoredShard(meta, npz, stat.st_mtime, size))
    return sorted(shards, key=lambda s: (s.committed, s.json.name))


def remove_shard(shard: StoredShard) -> bool:
    """Remove a shard, .json first; True if this call removed its .json (False: another
    pruner got there first)."""
    try:
        shard.json.unlink()
    except FileNotFoundError:
        removed = False
    else:
        removed = True
    shard.npz.unlink(missing_ok=True)
    return removed


@dataclass(frozen=True)
class Pruned:
    """What one prune removed and kept."""

    shards: int  # whole shards this pruner removed
    bytes: int  # their size
    orphans: int  # files of killed writers removed: a .npz with no .json, temporary files
    kept: int  # shards left under the bound
    kept_bytes: int


def prune_store(
    folder: Path,
    *,
    max_age_s: float | None = None,
    max_bytes: int | None = None,
    include_labels: bool = False,
    now: float | None = None,
) -> Pruned:
    """Remove whole shards, oldest first, until none is older than `max_age_s` and the
    shards hold at most `max_bytes`; `t2serve label` shards only with `include_labels`
    (else they are neither removed nor counted against `max_bytes`). Also removes what
    killed writers left (older than ORPHAN_AGE_S). Safe beside writers, loaders and other
    pruners of the same folder."""
    folder = Path(folder)
    now = time.time() if now is None else now
    shards = [s for s in stored_shards(folder) if include_labels or not s.is_label]
    total = sum(s.size for s in shards)
    removed = freed = pruned = 0
    for shard in shards:
        too_old = max_age_s is not None and now - shard.committed > max_age_s
        too_big = max_bytes is not None and total > max_bytes
        if not (too_old or too_big):
            break  # the rest are newer, and the bytes fit
        if remove_shard(shard):
            removed += 1
            freed += shard.size
        total -= shard.size
        pruned += 1
    orphans = _remove_orphans(folder, now, include_labels)
    return Pruned(removed, freed, orphans, len(shards) - pruned, total)


def _remove_orphans(folder: Path, now: float, include_labels: bool) -> int:
    """Remove a killed writer's leftovers older than ORPHAN_AGE_S: a .npz whose .json never
    came, a temporary file (a leading dot) never linked."""
    count = 0
    candidates = [*folder.glob("shard-*.npz"), *folder.glob(".shard-*.tmp.*")]
    for path in candidates:
        stem = path.name.lstrip(".").split(".")[0]
        if path.suffix == ".npz" and not path.name.startswith(".") and path.with_suffix(".json").exists():
            continue
        if not include_labels and LABEL_SHARD.fullmatch(stem):
            continue
        try:
            if now - path.stat().st_mtime <= ORPHAN_AGE_S:
                continue
            path.unlink()
        except FileNotFoundError:
            continue
        count += 1
    return count
