"""A made-up traffic store, as serving replicas write it (server/recording.py's record
fields, estimator.label_store's shards): no engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from estimator.label_store import ShardAppender

N_MAX = 8
UNANIMOUS = ["a"] * N_MAX
# Split pools whose N_max vote is "a": fixed N agrees from 5 samples on (a tie goes to the
# answer seen first), ...
LATE = ["b", "a", "b", "a", "a", "c", "a", "b"]
# ... and one whose vote changes only with the last sample: only N_max agrees.
LAST = ["b", "b", "b", "a", "a", "a", "c", "a"]


def traffic_record(request: int, choice: int, answers: list[str | None], prediction: float | None) -> dict:
    return {
        "id": f"req-{request}-p0-c{choice}",
        "request_id": f"req-{request}",
        "prompt": 0,
        "choice": choice,
        "source": "traffic",
        "answers": answers,
        "tokens": [5] * len(answers),
        "samples": list(range(len(answers))),
        "vote": "a",
        "n_max": len(answers),
        "prediction": prediction,
        "gate": None if prediction is None else 1.0,
        "margin_scale": None if prediction is None else 1.0,
        "states_captured": True,
    }


def traffic_records(
    requests: int = 100, split_share: float = 0.3, split: list[str | None] = LATE
) -> list[dict]:
    """`requests` requests of two choices each; a share of them split (the head predicts
    much for those, little for the unanimous ones), the rest unanimous."""
    records = []
    for r in range(requests):
        is_split = r < round(split_share * requests)
        answers, prediction = (split, 0.9) if is_split else (UNANIMOUS, 0.1)
        records += [traffic_record(r, c, answers, prediction) for c in range(2)]
    return records


def write_traffic_store(folder: Path, records: list[dict], replicas: int = 2) -> Path:
    """The records appended by `replicas` replicas, a few shards each."""
    appenders = [ShardAppender(folder, f"pod-{i}") for i in range(replicas)]
    for i in range(0, len(records), 16):
        chunk = records[i : i + 16]
        appenders[i // 16 % replicas].append(chunk, np.zeros((len(chunk), 2, 3), np.float32))
    return folder
