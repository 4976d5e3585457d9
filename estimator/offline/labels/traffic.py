"""Label stores as `t2serve train` and `evaluate` read them: `t2serve label` folders, serving
replicas' traffic records (server/recording.py), or both, with gold joined onto traffic.

Gold for traffic is kept client-side by whoever sent the questions (`t2serve label --server`)
and written into the store folder as `gold-<name>.jsonl`, one line per request:

    {"request_id": str, "answer": str, "source": str, "problem_id": str}   (+ "split", optional)

`join_gold` gives every traffic record of that request_id (each choice of the request) the
`answer`, `source` and `problem_id`, its correct keys (`gold_keys`: the vote keys equal to
the answer), A_x(N) (`expected_accuracy`), N* and type, as a label record has.

Splits: a label record keeps its own. A traffic record joined to gold takes the line's split,
else the labeller's hash split (estimator.offline.inputs.problems.split_of) of its problem
id, so every request for one question falls in one split; an unjoined one the hash split of
its request id (a request's choices stay together).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from estimator.label_store import load_labels
from estimator.offline.inputs.problems import split_of
from estimator.offline.labels.labeling import LABELS_FILE, load_label_sets
from estimator.offline.labels.targets import expected_accuracy, sample_optimal_n, sample_type

GOLD_GLOB = "gold-*.jsonl"
GOLD_FIELDS = ("request_id", "answer", "source", "problem_id")


def is_traffic(record: dict) -> bool:
    return record.get("source") == "traffic" or ("request_id" in record and "accuracy" not in record)


def load_gold(folder: Path) -> dict[str, dict]:
    """Every gold line of a store folder's gold-*.jsonl files, by request id."""
    gold: dict[str, dict] = {}
    for path in sorted(Path(folder).glob(GOLD_GLOB)):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if missing := [f for f in GOLD_FIELDS if not isinstance(row.get(f), str)]:
                raise ValueError(f"{path}:{number}: gold line without {', '.join(missing)}")
            gold[row["request_id"]] = row
    return gold


def join_gold(records: Sequence[dict], gold: dict[str, dict], eps: float = 0.0) -> list[dict]:
    """Traffic records with their request's gold joined on (and a split each, as the module
    says); records of requests without gold get only the split."""
    out = []
    for record in records:
        row = gold.get(record.get("request_id", ""))
        if row is None:
            out.append({**record, "split": record.get("split") or split_of(record["request_id"])})
            continue
        answers = record["answers"]
        accuracy = expected_accuracy(answers, row["answer"])
        out.append(
            {
                **record,
                "answer": row["answer"],
                "source": row["source"],
                "problem_id": row["problem_id"],
                "split": row.get("split") or split_of(row["problem_id"]),
                "gold_keys": [row["answer"]] if row["answer"] in answers else [],
                "accuracy": [round(float(a), 6) for a in accuracy],
                "n_star": sample_optimal_n(accuracy, eps),
                "type": sample_type(accuracy),
            }
        )
    return out


VALIDATION_SHARE = 0.15  # of the train split, where a store has no validation split


def carve_validation(records: Sequence[dict]) -> list[dict]:
    """Copies of `records` with a validation split taken out of the train split, for stores
    that have none: `t2serve label --server` run over a data set's train split gives every
    joined record its line's split, "train". A salted hash of the question (problem id, else
    request id) picks VALIDATION_SHARE of them, so a question's requests stay together (the
    unsalted hash already put all of them in train)."""
    out = []
    for record in records:
        key = record.get("problem_id") or record.get("request_id") or record["id"]
        carved = split_of(f"validation:{key}", (1 - VALIDATION_SHARE, VALIDATION_SHARE)) == "validation"
        out.append({**record, "split": "validation"} if record["split"] == "train" and carved else record)
    return out


def load_traffic(folder: Path) -> tuple[list[dict], np.ndarray]:
    """A store folder's traffic records, gold joined (`join_gold`), and their states; records
    whose states were not captured are left out."""
    records, states = load_labels(Path(folder))
    keep = [i for i, r in enumerate(records) if is_traffic(r) and r.get("states_captured", True)]
    return join_gold([records[i] for i in keep], load_gold(folder)), states[keep]


def voted_with(record: dict) -> str:
    """What a traffic record's samples voted with: `auto` records name the aggregator it
    chose for that request ("auto:answer" -> "answer"), as a label folder's config does."""
    aggregate = record["aggregate"]
    return aggregate.split(":", 1)[1] if aggregate.startswith("auto:") else aggregate


SETUP_KEYS = ("n_max", "temperature", "max_tokens")


def traffic_header(records: Sequence[dict], folders: Sequence[Path]) -> dict:
    """What labels.json says of a label folder, from traffic records: the model and the
    sampling setup, which must be one for all. The aggregate is not part of it: under
    `auto` it is chosen per request (each record's curve is on its own vote keys), so the
    header lists every one seen."""
    setups = {
        json.dumps(
            {
                "model": r["model"],
                "n_max": r["n_max"],
                "temperature": r["sampling"]["temperature"],
                "max_tokens": r["sampling"]["max_tokens"],
            },
            sort_keys=True,
        )
        for r in records
    }
    if len(setups) != 1:
        raise ValueError(
            f"traffic records of {len(setups)} models or sampling setups (N_max, temperature, max_tokens): "
            "a head is fitted for one; train on stores of one setup"
        )
    setup = json.loads(setups.pop())
    aggregates = sorted({voted_with(r) for r in records})
    return {
        "config": {**{k: setup[k] for k in SETUP_KEYS}, "aggregate": "+".join(aggregates)},
        "model": setup["model"],
        "folders": [str(f) for f in folders],
        "problems": len(records),
    }


def load_store(folders: Sequence[Path]) -> tuple[list[dict], np.ndarray, dict]:
    """Records, states and header of label folders (those with labels.json: load_label_sets)
    and traffic store folders together; traffic must share the labels' model and sampling.
    A traffic record stored twice (same id) is kept once."""
    label_folders = [Path(f) for f in folders if (Path(f) / LABELS_FILE).is_file()]
    traffic_folders = [Path(f) for f in folders if Path(f) not in label_folders]
    records: list[dict] = []
    states: list[np.ndarray] = []
    header: dict | None = None
    if label_folders:
        records, label_states, header = load_label_sets(label_folders)
        states.append(label_states)
    seen: set[str] = set()
    traffic: list[dict] = []
    for folder in traffic_folders:
        recs, st = load_traffic(folder)
        keep = [i for i, r in enumerate(recs) if r["id"] not in seen]
        seen.update(recs[i]["id"] for i in keep)
        traffic += [recs[i] for i in keep]
        states.append(st[keep])
    if traffic:
        mine = traffic_header(traffic, traffic_folders)
        if header is None:
            header = mine
        else:
            theirs = {k: header["config"].get(k) for k in SETUP_KEYS}
            if header["model"] != mine["model"] or theirs != {k: mine["config"][k] for k in SETUP_KEYS}:
                raise ValueError(
                    f"traffic in {', '.join(map(str, traffic_folders))} is of another model or sampling "
                    f"setup ({mine['config']}) than the labels ({theirs})"
                )
            header = {**header, "folders": [*header["folders"], *mine["folders"]]}
        records += traffic
    if header is None or not records:
        raise ValueError(f"no records in {', '.join(map(str, folders))}")
    return records, np.concatenate(states), {**header, "problems": len(records)}
