"""`t2serve train` and `evaluate` on a traffic store (serve --record-dir's records, gold joined
for some requests): end to end through the CLI, on a hand-made store, no engine."""

from __future__ import annotations

import json

import pytest

from estimator.head import T2Head
from estimator.learned_stopping import StoppingTable
from estimator.offline.labels.answer_posterior import AnswerPosterior, fit_posterior
from server.cli import main
from tests.estimator.offline.labels.traffic_store import MODEL, N_MAX, pools, write_store

REQUESTS = 90


@pytest.fixture
def store(tmp_path):
    """90 requests, gold joined for every third."""
    records, states, gold = pools(REQUESTS)
    joined = {rid: answer for k, (rid, answer) in enumerate(gold.items()) if k % 3 == 0}
    return write_store(tmp_path / "store", records, states, joined)


def train(store, out, *flags: str) -> None:
    main(["train", "--labels", str(store), "--out", str(out), "--epochs", "3", *flags])


def test_train_on_traffic_gives_gold_targets_where_gold_was_joined_and_gold_free_ones_elsewhere(
    store, tmp_path, capsys
):
    head_path = tmp_path / "head"
    train(store, head_path, "--stopping-folds", "2")
    out = capsys.readouterr().out
    table = out.splitlines()
    # Joined records carry their gold's source; the rest are "traffic", on majority targets.
    gen = next(line for line in table if line.startswith("gen "))
    traffic = next(line for line in table if line.startswith("traffic "))
    assert "gold 30" in gen and "majority 60" in traffic
    assert traffic.split()[4:9] == ["-"] * 5  # no gold: no sample types
    assert f"wrote {head_path}.safetensors" in out
    head = T2Head.load(head_path)
    assert head.meta.n_max == N_MAX and head.meta.labels["targets"]["rules"] == {"gold": 30, "majority": 60}
    assert head.sampling == {"temperature": 0.3, "max_tokens": 48}  # the records' own setup
    assert head.meta.margin_fit["met"] in (True, False)
    assert StoppingTable.load(head_path).n_max == N_MAX  # gold-free pools count agreement with their vote


def test_gold_targets_refuse_records_without_gold(store, tmp_path):
    with pytest.raises(
        SystemExit, match="has no gold answer: gold targets need label folders or traffic joined"
    ):
        train(store, tmp_path / "head", "--targets", "gold", "--stopping-folds", "0")
    with pytest.raises(SystemExit, match="--targets posterior needs --calibration"):
        train(store, tmp_path / "head", "--targets", "posterior")


def test_calibration_fitted_on_gold_then_posterior_targets_on_the_traffic(store, tmp_path, capsys):
    calibration = tmp_path / "calibration.json"
    main(["train", "--labels", str(store), "--fit-calibration", str(calibration)])
    out = capsys.readouterr().out
    posterior = AnswerPosterior.load(calibration)
    gold_pools = posterior.fitted["pools"]
    # The joined records of the train and validation splits, never test.
    assert 0 < gold_pools < 30 and f"answer posterior on {gold_pools} pools" in out
    assert not (tmp_path / "head.json").exists()  # no head trained

    head_path = tmp_path / "head"
    train(
        store, head_path, "--targets", "posterior", "--calibration", str(calibration), "--target-eps", "0.05"
    )
    printed = capsys.readouterr().out
    assert "posterior 60" in printed and "posterior 30" in printed  # gold records too, as asked
    meta = T2Head.load(head_path).meta.labels["targets"]
    assert meta["rules"] == {"posterior": REQUESTS} and meta["eps"] == 0.05
    assert meta["calibration"]["pools"] == gold_pools


def test_evaluate_scores_the_traffic_joined_to_gold(store, tmp_path, capsys):
    head_path, out = tmp_path / "head", tmp_path / "evaluate"
    train(store, head_path, "--stopping-folds", "0")
    capsys.readouterr()
    main(
        ["evaluate", "--labels", str(store), "--head", str(head_path), "--out", str(out), "--orderings", "0"]
    )
    printed = capsys.readouterr().out
    assert "60 traffic records without gold left out; 30 scored" in printed
    report = json.loads(out.with_suffix(".json").read_text())
    assert 0 < report["questions"] < 30 and report["n_max"] == N_MAX
    # The head's own margin and its multiples, against the fixed-N curve.
    assert [r["multiple"] for r in report["margin_multiples"]] == [1.0, 1.5, 2.0]
    assert "t2 at the head's margin x1.5" in printed and printed.count("fixed N curve: 1: ") == 1


def test_a_calibration_reads_states_only_of_the_model_it_was_fitted_on(store, tmp_path, capsys):
    """`--calibration-states off` fits the pool features alone; a calibration with a states
    part is refused on labels of another model (its states mean nothing there)."""
    off = tmp_path / "off.json"
    main(["train", "--labels", str(store), "--fit-calibration", str(off), "--calibration-states", "off"])
    assert "leader right" not in capsys.readouterr().out
    assert (
        AnswerPosterior.load(off).leader_states is None and "states" not in AnswerPosterior.load(off).fitted
    )

    records, states, _ = pools(400, seed=1)
    for record, state in zip(records, states, strict=True):  # the leader is right where layer 2 says so
        record["answer"] = "a" if state[2, 0] > 0.55 else "zz"
    with_states = fit_posterior(records, states=states.astype(float))
    assert with_states.leader_states is not None
    with_states.fitted["model"] = {**MODEL, "fingerprint": "another"}
    path = tmp_path / "states.json"
    with_states.save(path)
    with pytest.raises(SystemExit, match="reads the states of model another, the labels are of model f"):
        train(store, tmp_path / "head", "--targets", "posterior", "--calibration", str(path))
    with_states.fitted["model"] = MODEL
    with_states.save(path)
    train(
        store,
        tmp_path / "head",
        "--targets",
        "posterior",
        "--calibration",
        str(path),
        "--stopping-folds",
        "0",
    )
    assert T2Head.load(tmp_path / "head").meta.labels["targets"]["rules"] == {"posterior": REQUESTS}


def test_a_store_of_train_split_questions_gets_a_validation_split_carved_out(tmp_path, capsys):
    """`label --server` over a data set's train split joins every record as "train": train
    carves a validation split out of it, by question, rather than refusing the store."""
    records, states, gold = pools(60)
    folder = write_store(tmp_path / "store", records, states, gold)
    lines = [json.loads(line) for line in (folder / "gold-run.jsonl").read_text().splitlines()]
    (folder / "gold-run.jsonl").write_text(
        "".join(json.dumps({**line, "split": "train"}) + "\n" for line in lines)
    )
    train(folder, tmp_path / "head", "--stopping-folds", "0")
    assert "15% of the train questions carved out for it" in capsys.readouterr().out
    assert T2Head.load(tmp_path / "head").meta.labels["validation_carved"] == 0.15
