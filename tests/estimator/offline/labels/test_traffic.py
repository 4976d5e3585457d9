"""Traffic stores as train and evaluate read them (estimator/offline/labels/traffic.py): gold
joined by request id, splits, and mixes with label folders; a hand-made store, no engine."""

from __future__ import annotations

import json

import numpy as np
import pytest

from estimator.label_store import ShardAppender, write_shard
from estimator.offline.inputs.problems import generate, split_of
from estimator.offline.labels.labeling import LabelConfig, label_record, prepare_output
from estimator.offline.labels.targets import expected_accuracy, sample_optimal_n
from estimator.offline.labels.traffic import carve_validation, load_gold, load_store, load_traffic
from tests.estimator.offline.labels.traffic_store import (
    HIDDEN,
    LAYERS,
    MODEL,
    N_MAX,
    pools,
    recorded,
    write_store,
)


def test_gold_lines_join_onto_every_record_of_their_request(tmp_path):
    records, states, gold = pools(20)
    # Request 0 has two choices: both get its gold.
    records.append(recorded(0, 1, ["b"] * N_MAX))
    states = np.concatenate([states, states[:1]])
    gold = {rid: answer for k, (rid, answer) in enumerate(gold.items()) if k % 2 == 0}  # half the requests
    write_store(tmp_path, records, states, gold)
    loaded, loaded_states = load_traffic(tmp_path)
    assert len(loaded) == 21 and loaded_states.shape == (21, LAYERS, HIDDEN)
    by_id = {r["id"]: r for r in loaded}
    lines = {
        json.loads(x)["request_id"]: json.loads(x)
        for x in (tmp_path / "gold-run.jsonl").read_text().splitlines()
    }
    for record in loaded:
        rid = record["request_id"]
        if rid not in gold:
            assert "answer" not in record and "accuracy" not in record
            assert record["split"] == split_of(rid)  # the labeller's hash split, of the request
            continue
        assert record["answer"] == "a" and record["source"] == "gen"
        assert record["split"] == split_of(lines[rid]["problem_id"])  # one split per question
        accuracy = expected_accuracy(record["answers"], "a")
        assert record["accuracy"] == pytest.approx(accuracy, abs=1e-6)
        assert record["n_star"] == sample_optimal_n(accuracy)
        assert record["gold_keys"] == (["a"] if "a" in record["answers"] else [])
    assert by_id["req-0-p0-c1"]["answer"] == "a" and by_id["req-0-p0-c1"]["accuracy"] == [0.0] * N_MAX


def test_a_line_may_name_its_split_and_a_malformed_line_is_refused(tmp_path):
    records, states, _ = pools(4)
    write_store(tmp_path, records, states, {})
    (tmp_path / "gold-x.jsonl").write_text(
        json.dumps({"request_id": "req-1", "answer": "a", "source": "s", "problem_id": "q", "split": "test"})
        + "\n"
    )
    assert {r["request_id"]: r["split"] for r in load_traffic(tmp_path)[0]}["req-1"] == "test"
    (tmp_path / "gold-y.jsonl").write_text(json.dumps({"request_id": "req-2", "answer": 7}) + "\n")
    with pytest.raises(ValueError, match="gold-y.jsonl:1: gold line without answer, source, problem_id"):
        load_gold(tmp_path)


def test_records_whose_states_were_not_captured_are_left_out(tmp_path):
    records, states, _ = pools(6)
    records[2] = {**records[2], "states_captured": False}
    states[2] = np.nan
    write_store(tmp_path, records, states, {})
    loaded, loaded_states = load_traffic(tmp_path)
    assert [r["request_id"] for r in loaded] == [f"req-{i}" for i in (0, 1, 3, 4, 5)]
    assert np.isfinite(loaded_states).all()


def label_folder(folder, config: LabelConfig):
    problems = generate(10, seed=0)
    records = [label_record(p, [p.answer] * config.n_max, [3] * config.n_max, config) for p in problems]
    prepare_output(folder, config, MODEL, problems)
    write_shard(folder, 0, records, np.zeros((len(records), LAYERS, HIDDEN), np.float32))
    return records


def test_label_folders_and_traffic_stores_load_together_when_their_setup_is_one(tmp_path):
    labels = label_folder(tmp_path / "labels", LabelConfig(n_max=N_MAX, temperature=0.3, max_tokens=48))
    records, states, gold = pools(12)
    write_store(tmp_path / "traffic", records, states, gold)
    # The same traffic stored twice (a store copied into another) is read once.
    write_store(tmp_path / "copy", records, states, {})
    loaded, loaded_states, header = load_store([tmp_path / "labels", tmp_path / "traffic", tmp_path / "copy"])
    assert len(loaded) == len(labels) + 12 and len(loaded_states) == len(loaded)
    assert header["problems"] == len(loaded) and header["config"]["n_max"] == N_MAX
    assert header["folders"] == [str(tmp_path / f) for f in ("labels", "traffic", "copy")]
    # Traffic alone: the header is the records' own setup.
    _, _, alone = load_store([tmp_path / "traffic"])
    assert alone["config"] == {"n_max": N_MAX, "temperature": 0.3, "max_tokens": 48, "aggregate": "answer"}
    assert alone["model"] == MODEL

    label_folder(tmp_path / "hot", LabelConfig(n_max=N_MAX, temperature=0.9, max_tokens=48))
    with pytest.raises(ValueError, match="another model or sampling setup"):
        load_store([tmp_path / "hot", tmp_path / "traffic"])


def test_traffic_of_two_sampling_setups_is_refused(tmp_path):
    records, states, _ = pools(4)
    records[1] = {**records[1], "sampling": {**records[1]["sampling"], "temperature": 1.0}}
    ShardAppender(tmp_path, "pod").append(records, states)
    with pytest.raises(ValueError, match="traffic records of 2 models or sampling setups"):
        load_store([tmp_path])


def test_auto_traffic_whose_requests_voted_with_different_aggregators_loads_as_one_setup(tmp_path):
    # A server on `aggregate: auto` records what each request voted with: one store mixes them.
    records, states, _ = pools(4)
    records = [{**r, "aggregate": "auto:mbr" if i == 1 else "auto:answer"} for i, r in enumerate(records)]
    ShardAppender(tmp_path, "pod").append(records, states)
    loaded, _, header = load_store([tmp_path])
    assert len(loaded) == 4
    assert header["config"]["aggregate"] == "answer+mbr"


def test_carving_keeps_a_question_s_requests_together_and_leaves_other_splits_alone():
    records = [
        {"id": f"r{i}", "request_id": f"r{i}", "problem_id": f"q{i // 3}", "split": "train"}
        for i in range(600)
    ]
    records += [{"id": "t", "request_id": "t", "problem_id": "x", "split": "test"}]
    carved = carve_validation(records)
    by_question: dict[str, set[str]] = {}
    for record in carved:
        by_question.setdefault(record["problem_id"], set()).add(record["split"])
    assert all(len(splits) == 1 for splits in by_question.values())
    share = sum(r["split"] == "validation" for r in carved) / 600
    assert 0.08 < share < 0.22 and carved[-1]["split"] == "test"
