"""`label` on the real engine (embedded model): shards, checksums, resume, records."""

from __future__ import annotations

import json

import numpy as np
import pytest

from estimator.label_store import load_labels, shard_complete, shard_paths
from estimator.offline.inputs.problems import generate
from estimator.offline.labels.labeling import LabelConfig, run_labeling


async def test_label_writes_verifiable_resumable_shards(engine, tmp_path, capsys):
    problems = generate(6, seed=1, families=["add_small", "compare"])
    config = LabelConfig(n_max=4, max_tokens=8, temperature=0.9, shard_size=4)
    out = tmp_path / "labels"
    records = await run_labeling(engine, problems, out, config)
    assert "type" in capsys.readouterr().out  # the summary table

    assert [r["id"] for r in records] == [p.id for p in problems]
    assert shard_complete(out, 0) and shard_complete(out, 1)
    for r in records:
        assert len(r["answers"]) == 4 and len(r["accuracy"]) == 4
        assert 1 <= r["n_star"] <= 4 and 1 <= r["type"] <= 5
        assert all(0.0 <= a <= 1.0 for a in r["accuracy"])
        assert all(1 <= t <= 8 for t in r["tokens"])
        # A(1) is the share of samples that got the gold answer.
        assert r["accuracy"][0] == pytest.approx(sum(a == r["answer"] for a in r["answers"]) / 4, abs=1e-6)
    loaded, states = load_labels(out)
    assert states.shape == (6, engine.info.num_layers, engine.info.hidden_size)
    assert np.isfinite(states).all() and np.abs(states).sum() > 0

    # Resume: a lost shard is redone, a complete one is left alone.
    npz0, meta0 = shard_paths(out, 0)
    before = meta0.read_text()
    npz1, _ = shard_paths(out, 1)
    npz1.unlink()
    await run_labeling(engine, problems, out, config)
    assert meta0.read_text() == before
    assert shard_complete(out, 1)

    # A corrupted shard fails verification.
    npz0.write_bytes(npz0.read_bytes()[:-10] + b"0123456789")
    assert not shard_complete(out, 0)
    with pytest.raises(ValueError, match="checksum"):
        load_labels(out)


async def test_labels_keyed_by_consensus_grade_each_group_by_its_medoid(engine, tmp_path):
    """`--aggregate consensus`: the stored keys are the similarity groups the server's vote
    would see, and a group is right when its medoid states the gold answer."""
    from server import consensus
    from server.voting import extract_answer

    problems = generate(3, seed=3, families=["add_small"])
    config = LabelConfig(n_max=6, max_tokens=24, temperature=0.9, shard_size=3, aggregate="consensus")
    records = await run_labeling(engine, problems, tmp_path / "labels", config)
    header = json.loads((tmp_path / "labels" / "labels.json").read_text())
    assert header["config"]["aggregate"] == "consensus"
    texts_seen = 0
    for r in records:
        keys = [k for k in r["answers"] if k is not None]
        assert keys and all(consensus.is_group_key(k) for k in keys)
        assert set(r["gold_keys"]) <= set(keys)
        # A(1) is the share of samples in a right group.
        right = sum(k in r["gold_keys"] for k in r["answers"]) / 6
        assert r["accuracy"][0] == pytest.approx(right, abs=1e-6)
        texts_seen += len(keys)
    assert texts_seen > 0
    # The grading rule itself, on texts whose answers are known.
    from estimator.offline.labels.labeling import correct_keys

    answers = ["#1: it is 7", "#2: no idea", "#1: it is 7"]
    texts = ["It is 7.", "No idea, sorry", "It is 7, I think."]
    assert extract_answer(texts[0]) == "7"
    assert correct_keys(answers, texts, "7") == ["#1: it is 7"]
    assert correct_keys(answers, texts, "8") == []
    # A multiple-choice question: its letter and its right option's value are both right.
    assert correct_keys(["E", "450", "266", None], [""] * 4, "E", aliases=("450",)) == ["E", "450"]


async def test_label_refuses_to_mix_runs(engine, tmp_path):
    problems = generate(2, seed=2, families=["add_small"])
    out = tmp_path / "labels"
    await run_labeling(engine, problems, out, LabelConfig(n_max=2, max_tokens=4))
    with pytest.raises(SystemExit, match="another run"):
        await run_labeling(engine, problems, out, LabelConfig(n_max=3, max_tokens=4))
    assert json.loads((out / "labels.json").read_text())["config"]["n_max"] == 2


async def test_trained_head_drives_auto_parallelism(engine, server_settings, tmp_path):
    """label -> train -> a head that the serving path uses for `auto` on the real engine."""
    import uuid

    from vllm import SamplingParams

    from estimator.head import T2Head, load_head
    from estimator.offline.training.probes import TrainConfig, fit, targets
    from server.parallel import ParallelThinker
    from server.prompts import render_chat

    problems = generate(12, seed=5, families=["add_small", "compare", "times"])
    out = tmp_path / "labels"
    await run_labeling(engine, problems, out, LabelConfig(n_max=6, max_tokens=8, shard_size=6))
    records, states = load_labels(out)
    head = fit(
        states[:8],
        targets(records[:8]),
        states[8:],
        targets(records[8:]),
        model_name=engine.info.name,
        n_max=6,
        config=TrainConfig(epochs=5),
        progress=False,
    )
    head.meta.model_fingerprint = engine.info.fingerprint
    head.save(tmp_path / "head")
    loaded = load_head(
        str(tmp_path / "head"),
        name=engine.info.name,
        num_layers=engine.info.num_layers,
        hidden_size=engine.info.hidden_size,
        fingerprint=engine.info.fingerprint,
    )
    assert isinstance(loaded, T2Head)
    with pytest.raises(ValueError, match="fingerprint"):
        load_head(
            str(tmp_path / "head"),
            name="x",
            num_layers=engine.info.num_layers,
            hidden_size=engine.info.hidden_size,
            fingerprint="0000",
        )

    settings = server_settings.parallelism.model_copy(update={"max_parallelism": 16})
    thinker = ParallelThinker(engine, settings, estimator=loaded)
    ids = render_chat(engine.tokenizer, [{"role": "user", "content": problems[0].question}])
    result = await thinker.run(
        ids,
        SamplingParams(max_tokens=4),
        thinker.plan("auto"),
        request_id=uuid.uuid4().hex,
    )
    assert result.estimator == "t2" and result.estimate.prediction is not None
    assert result.n_max == 6
    assert result.n_used == max(1, min(round(6 * result.estimate.prediction * thinker.margin), 16))
    # The prediction comes from this request's own captured states.
    assert result.estimate.prediction == pytest.approx(loaded.predict(result.estimate.states), abs=1e-6)


async def test_replay_through_server_measures_both_modes(server_url):
    from estimator.offline.evaluation.evaluate import replay_through_server

    test = [p.to_json() for p in generate(3, seed=9, families=["add_small"])]
    out = await replay_through_server(server_url, test, n_max=3, temperature=0.5, max_tokens=6, concurrency=2)
    assert out["fixed N_max"]["mean_samples"] == 3
    # The session server has no head: auto uses its default N (4) capped by max_parallelism 3.
    assert out["auto"]["mean_samples"] == 3
    for mode in ("auto", "fixed N_max"):
        assert out[mode]["wall_s"] > 0 and 0.0 <= out[mode]["accuracy"] <= 1.0 and out[mode]["tokens"] >= 9
    assert out["c_time_wall"] > 0


def _fake_label_folder(path, problems, config: LabelConfig, num_layers: int = 3, hidden: int = 4):
    """A label folder as `label` writes it, with made-up answers and states (pure data)."""
    from estimator.label_store import write_shard
    from estimator.offline.labels.labeling import label_record, prepare_output

    model = {"name": "m", "num_layers": num_layers, "hidden_size": hidden, "fingerprint": "f"}
    prepare_output(path, config, model, problems)
    records = [label_record(p, [p.answer] * config.n_max, [3] * config.n_max, config) for p in problems]
    states = np.stack([np.full((num_layers, hidden), i, dtype=np.float32) for i in range(len(problems))])
    write_shard(path, 0, records, states)


def test_label_sets_combine_seeds_and_refuse_other_sampling(tmp_path):
    from estimator.offline.labels.labeling import load_label_sets

    first, second = generate(4, seed=0), generate(4, seed=1)
    overlap = [first[0], *second[:2]]  # a question both runs labelled is kept once
    _fake_label_folder(tmp_path / "a", first, LabelConfig(n_max=4, seed=0))
    _fake_label_folder(tmp_path / "b", overlap, LabelConfig(n_max=4, seed=1, shard_size=8))
    records, states, header = load_label_sets([tmp_path / "a", tmp_path / "b"])
    expected = [p.question for p in first] + [p.question for p in second[:2] if p not in first]
    assert [r["question"] for r in records] == expected
    assert states.shape == (len(expected), 3, 4) and header["problems"] == len(expected)

    _fake_label_folder(tmp_path / "c", second, LabelConfig(n_max=4, temperature=0.9))
    with pytest.raises(ValueError, match="sampling config"):
        load_label_sets([tmp_path / "a", tmp_path / "c"])
