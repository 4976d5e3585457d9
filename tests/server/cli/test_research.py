"""server/cli/research.py and train.py: `label`, `train`, `evaluate` take only their own flags, leave unset
ones at the offline code's defaults, and run end to end on made-up labels (pure data, no engine)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from estimator.head import T2Head
from estimator.label_store import write_shard
from estimator.offline.inputs.problems import generate
from estimator.offline.labels.labeling import LabelConfig, label_record, prepare_output
from estimator.offline.training.probes import TrainConfig
from server.cli import build_parser, main
from server.cli.research import label_config
from server.cli.train import train_config


@pytest.mark.parametrize(
    "flag",
    [
        ["--policy", "t2"],
        ["--estimator-head", "none"],
        ["--tie-break", "order"],
        ["--default-parallelism", "4"],
        ["--open-ended-parallelism", "2"],
        ["--reasoning-parser", "qwen3"],
        ["--max-queue", "3"],
        ["--request-timeout", "5"],
        ["--api-key", "k"],
        ["--port", "9000"],
    ],
)
def test_label_refuses_the_flags_only_serve_reads(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["label", "--out", "labels", *flag])
    assert exit_.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


def test_label_takes_the_engine_flags_and_its_own():
    args = build_parser().parse_args(
        ["label", "--out", "l", "--dtype", "float32", "--enforce-eager", "--count", "40", "--data", "x.jsonl"]
    )
    assert (args.dtype, args.enforce_eager, args.count, args.data) == ("float32", True, 40, "x.jsonl")


def test_label_flags_left_unset_keep_the_label_config_defaults():
    assert label_config(build_parser().parse_args(["label", "--out", "l"])) == LabelConfig()
    args = build_parser().parse_args(
        [
            "label",
            "--out",
            "l",
            "--n-max",
            "4",
            "--temperature",
            "0.9",
            "--aggregate",
            "consensus",
            "--seed",
            "3",
        ]
    )
    assert label_config(args) == LabelConfig(n_max=4, temperature=0.9, aggregate="consensus", seed=3)


def test_label_aggregate_refuses_usc(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["label", "--out", "l", "--aggregate", "usc"])
    assert "invalid choice: 'usc'" in capsys.readouterr().err


def test_train_flags_left_unset_keep_the_train_config_defaults():
    args = build_parser().parse_args(["train", "--labels", "l", "--out", "h"])
    assert train_config(args) == TrainConfig()
    args = build_parser().parse_args(["train", "--labels", "l", "--out", "h", "--epochs", "7", "--seed", "2"])
    assert train_config(args) == TrainConfig(epochs=7, seed=2)


def test_evaluate_command_takes_the_replay_options():
    args = build_parser().parse_args(["evaluate", "--labels", "l", "--head", "h", "--policies", "t2,esc"])
    assert (args.orderings, args.replay_seed, args.policies) == (200, 0, "t2,esc")
    args = build_parser().parse_args(["evaluate", "--labels", "l", "--head", "h", "--orderings", "0"])
    assert args.orderings == 0 and str(args.policies_out) == "benchmarks/results/policies"


@pytest.fixture
def labels(tmp_path):
    """A label folder: question i is right in a share of its samples that rises with i; its
    states say so (noisily)."""
    config = LabelConfig(n_max=8)
    problems = generate(60, seed=0)
    rng = np.random.default_rng(0)
    shares = np.linspace(0.2, 1.0, len(problems))
    records = []
    for p, share in zip(problems, shares, strict=True):
        answers = [p.answer if rng.random() < share else "wrong" for _ in range(config.n_max)]
        records.append(label_record(p, answers, [3] * config.n_max, config))
    states = (shares[:, None, None] + rng.normal(0, 0.3, (len(problems), 3, 4))).astype(np.float32)
    model = {"name": "m", "num_layers": 3, "hidden_size": 4, "fingerprint": "f"}
    prepare_output(tmp_path / "labels", config, model, problems)
    write_shard(tmp_path / "labels", 0, records, states)
    return tmp_path / "labels", records


def test_train_command_stores_the_margin_chosen_on_validation(labels, tmp_path, capsys):
    """`t2serve train` writes the head's own T2 margin: the smallest on the grid whose
    validation accuracy is within the tolerance of fixed N_max's; with fewer than 50
    validation questions (these labels have 7), on the train questions' cross-fitted
    predictions too."""
    from estimator.offline.training.margin_fit import MARGIN_GRID

    folder, records = labels
    head_path = tmp_path / "head"
    args = ["train", "--labels", str(folder), "--out", str(head_path), "--epochs", "5"]
    main([*args, "--stopping-folds", "0"])
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:4] == ["source", "train", "val", "test"]  # the source table first
    assert "t2:margin=" in out and f"wrote {head_path}.safetensors and {head_path}.json" in out
    assert "stopping table" not in out  # --stopping-folds 0
    head = T2Head.load(head_path)
    fitted = head.meta.margin_fit
    assert head.meta.margin == fitted["margin"] and head.meta.margin in MARGIN_GRID
    validation = [r for r in records if r["split"] == "validation"]
    train = [r for r in records if r["split"] == "train"]
    assert len(validation) < 50 and fitted["cross_fitted_train"] == len(train)
    assert fitted["questions"] == len(validation) + len(train)
    assert f"{len(validation)} validation and {len(train)} cross-fitted train questions" in out
    assert fitted["tolerance"] == 0.005  # margin_fit.TOLERANCE: --margin-tolerance unset
    assert fitted["fixed_accuracy"] == pytest.approx(np.mean([r["accuracy"][-1] for r in train + validation]))
    # The rule: the chosen margin is the first on the curve within the line (or the last).
    line = fitted["fixed_accuracy"] - fitted["tolerance"]
    first_within = next((p["margin"] for p in fitted["curve"] if p["accuracy"] >= line), MARGIN_GRID[-1])
    assert head.meta.margin == first_within

    main([*args, "--stopping-folds", "0", "--margin-tolerance", "0.2"])
    assert T2Head.load(head_path).meta.margin_fit["tolerance"] == 0.2


def test_train_fits_the_stopping_table_on_the_folds_asked_for(labels, tmp_path, capsys):
    from estimator.learned_stopping import StoppingTable

    folder, records = labels
    head_path = tmp_path / "head"
    args = ["train", "--labels", str(folder), "--out", str(head_path), "--epochs", "3"]
    main([*args, "--stopping-folds", "2", "--stopping-bandwidth", "2.5"])
    train = sum(r["split"] == "train" for r in records)
    assert f"from 2-fold cross-fitted predictions on {train} train questions" in capsys.readouterr().out
    assert StoppingTable.load(head_path).bandwidth == 2.5


def test_train_gate_only_needs_open_ended_states(labels, tmp_path):
    folder, _ = labels
    with pytest.raises(SystemExit, match="--gate-only needs --open-ended"):
        main(["train", "--labels", str(folder), "--out", str(tmp_path / "head"), "--gate-only"])


def test_evaluate_command_writes_the_report_of_the_head(labels, tmp_path, capsys):
    folder, records = labels
    head_path, out = tmp_path / "head", tmp_path / "evaluate"
    main(
        ["train", "--labels", str(folder), "--out", str(head_path), "--epochs", "3", "--stopping-folds", "0"]
    )
    capsys.readouterr()
    main(
        ["evaluate", "--labels", str(folder), "--head", str(head_path), "--out", str(out), "--orderings", "0"]
    )
    assert f"wrote {out}.json and {out}.png" in capsys.readouterr().out
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["questions"] == sum(r["split"] == "test" for r in records) and report["n_max"] == 8

    with pytest.raises(SystemExit, match=r"unknown policies \['T2'\]"):
        main(["evaluate", "--labels", str(folder), "--head", str(head_path), "--policies", "T2"])
    with pytest.raises(SystemExit, match="--head is needed"):
        main(["evaluate", "--labels", str(folder)])


def test_tune_command_writes_the_choice_into_the_store_and_serve_reads_it(tmp_path, capsys, model_dir):
    from estimator.offline.evaluation.tune import OUTPUT_NAME
    from server.cli.serve import serve_settings
    from tests.estimator.offline.evaluation.traffic import traffic_records, write_traffic_store

    store = write_traffic_store(tmp_path / "store", traffic_records())
    main(["tune", "--labels", str(store), "--agreement", "0.99"])
    out = capsys.readouterr().out
    tuned = store / OUTPUT_NAME
    result = json.loads(tuned.read_text())
    assert (result["target"], result["records"], result["held_out_share"]) == (0.99, 200, 0.3)
    assert result["tuning"]["agreement"] >= 0.99 and result["held_out"]["pools"] == 60
    header, first = out.splitlines()[:2]
    assert header.split()[:2] == ["policy", "tune"] and first.startswith(" fixed:n=1 ")
    assert f"*{result['policy']}" in out and result["message"] in out
    assert f"wrote {tuned}: serve it with `t2serve serve --policy @{tuned}`" in out
    args = build_parser().parse_args(["serve", "--model", str(model_dir), "--policy", f"@{tuned}"])
    assert serve_settings(args).parallelism.policy == result["policy"]
    args = build_parser().parse_args(
        ["serve", "--model", str(model_dir), "--policy", f"@{tmp_path}/none.json"]
    )
    with pytest.raises(SystemExit, match="--policy: cannot read a policy from"):
        serve_settings(args)


def test_tune_command_by_accuracy_reads_the_stores_gold_and_refuses_a_store_without(tmp_path, capsys):
    from tests.estimator.offline.evaluation.test_tune_accuracy import HURT, write_gold
    from tests.estimator.offline.evaluation.traffic import traffic_records, write_traffic_store

    records = traffic_records(split=HURT)
    store = write_traffic_store(tmp_path / "store", records)
    with pytest.raises(SystemExit, match=r"t2serve tune: objective accuracy: .*t2serve label --server"):
        main(["tune", "--labels", str(store), "--objective", "accuracy"])
    with pytest.raises(SystemExit, match="--tolerance is for --objective accuracy"):
        main(["tune", "--labels", str(store), "--tolerance", "0.01"])
    write_gold(store, records, share=1.0)
    main(["tune", "--labels", str(store), "--objective", "accuracy", "--tolerance", "0.01"])
    out = capsys.readouterr().out
    result = json.loads((store / "tuned.json").read_text())
    assert (result["objective"], result["tolerance"], result["policy"]) == ("accuracy", 0.01, "fixed:n=1")
    assert out.splitlines()[0].split()[:3] == ["policy", "tune", "acc"] and result["message"] in out


def test_tune_command_reads_label_output_and_refuses_a_bad_target(labels, tmp_path, capsys):
    folder, records = labels
    out = tmp_path / "tuned.json"
    main(
        [
            "tune",
            "--labels",
            str(folder),
            "--agreement",
            "0.9",
            "--held-out",
            "0.5",
            "--seed",
            "2",
            "--out",
            str(out),
        ]
    )
    result = json.loads(out.read_text())
    assert (result["records"], result["n_max"], result["seed"]) == (len(records), 8, 2)
    assert not [r for r in result["candidates"] if r["policy"].startswith("t2")]  # no predictions
    with pytest.raises(SystemExit, match=r"t2serve tune: agreement target 1.5: it must be in \(0, 1\]"):
        main(["tune", "--labels", str(folder), "--agreement", "1.5"])
    with pytest.raises(SystemExit, match="has no stopping table"):
        main(["tune", "--labels", str(folder), "--head", str(tmp_path / "head")])
