"""A hand-made traffic store with gold for some of its requests, as serving replicas
(server/recording.py) and `t2serve label --server` (gold-<name>.jsonl) write it: no engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from estimator.label_store import ShardAppender
from tests.estimator.offline.evaluation.traffic import traffic_record

N_MAX = 8
LAYERS, HIDDEN = 3, 4
MODEL = {"name": "m", "num_layers": LAYERS, "hidden_size": HIDDEN, "fingerprint": "f"}
SAMPLING = {"temperature": 0.3, "top_p": 1.0, "max_tokens": 48, "seed": None}


def recorded(request: int, choice: int, answers: list[str | None], **extra) -> dict:
    """A traffic record with what a replica writes beside the pool (model, sampling, aggregate)."""
    return {
        **traffic_record(request, choice, answers, prediction=None),
        "model": MODEL,
        "sampling": SAMPLING,
        "aggregate": "answer",
        **extra,
    }


def pools(requests: int, seed: int = 0) -> tuple[list[dict], np.ndarray, dict[str, str]]:
    """`requests` requests of one choice each: request r's question has gold answer "a"; its
    pool names "a" in a share of its samples that rises with r (the rest "b" or "c", one
    abstention now and then). The states carry the share (noisily). Returns the records, their
    states [Q, L, d] and each request's gold answer."""
    rng = np.random.default_rng(seed)
    shares = np.linspace(0.1, 1.0, requests)
    records = []
    for r, share in enumerate(shares):
        answers = [
            "a" if rng.random() < share else (None if rng.random() < 0.05 else str(rng.choice(["b", "c"])))
            for _ in range(N_MAX)
        ]
        records.append(recorded(r, 0, answers))
    states = (shares[:, None, None] + rng.normal(0, 0.3, (requests, LAYERS, HIDDEN))).astype(np.float32)
    return records, states, {r["request_id"]: "a" for r in records}


def write_store(
    folder: Path, records: list[dict], states: np.ndarray, gold: dict[str, str], name: str = "run"
) -> Path:
    """The records appended by two replicas (a few shards each) and the gold lines of `gold`
    (request id -> answer) in gold-<name>.jsonl; two requests at a time ask one question
    (problem id q<k // 2>)."""
    appenders = [ShardAppender(folder, f"pod-{i}") for i in range(2)]
    for i in range(0, len(records), 10):
        appenders[i // 10 % 2].append(records[i : i + 10], states[i : i + 10])
    lines = [
        {"request_id": rid, "answer": answer, "source": "gen", "problem_id": f"q{k // 2}"}
        for k, (rid, answer) in enumerate(gold.items())
    ]
    (folder / f"gold-{name}.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder
