"""Leave-one-dataset-out (estimator/offline/evaluation/leave_one_out.py) on synthetic labelled sources."""

import json

import numpy as np
import pytest

from estimator.offline.evaluation import leave_one_out as loo
from estimator.offline.labels.targets import expected_accuracy, sample_optimal_n
from estimator.offline.training.margin_fit import MARGIN_GRID
from estimator.offline.training.probes import TrainConfig

# The server's N where the gate does not trust the head: the safe default and open-ended's one.
FALLBACKS = {"default_parallelism": 8, "open_ended_parallelism": 1}


def synthetic(sources: dict[str, float], per_source: int = 60, layers: int = 3, hidden: int = 8):
    """Per source, pools whose gold share is drawn around `p`; the states carry N*/N_max."""
    rng = np.random.default_rng(0)
    direction = rng.normal(size=hidden)
    records, states = [], []
    for name, p in sources.items():
        for i in range(per_source):
            share = float(np.clip(rng.normal(p, 0.2), 0.0, 1.0))
            answers = ["7" if rng.random() < share else str(rng.integers(1, 4)) for _ in range(16)]
            accuracy = expected_accuracy(answers, "7")
            n_star = sample_optimal_n(accuracy, 0.0)
            records.append(
                {
                    "answers": answers,
                    "tokens": [int(t) for t in rng.integers(5, 48, size=16)],
                    "answer": "7",
                    "accuracy": [float(a) for a in accuracy],
                    "n_star": n_star,
                    "source": name,
                    "split": ("train", "train", "train", "validation", "test")[i % 5],
                }
            )
            x = rng.normal(size=(layers, hidden)) + 3 * (n_star / 16) * direction
            states.append(x.astype(np.float32))
    return records, np.stack(states)


def test_each_source_is_scored_by_a_head_trained_without_it(tmp_path):
    records, states = synthetic({"easy": 0.8, "mixed": 0.45, "hard": 0.2})
    result = loo.leave_one_out(
        records, states, config=TrainConfig(epochs=15), stopping_folds=2, orderings=8, margin=1.5, **FALLBACKS
    )
    assert set(result["sources"]) == {"easy", "hard", "mixed"}
    for name, row in result["sources"].items():
        assert row["margin"] == 1.5  # given: every fold runs T2 at it
        others = [r for r in records if r["source"] != name]
        assert row["trained_on"] == {
            "train": sum(r["split"] == "train" for r in others),
            "validation": sum(r["split"] == "validation" for r in others),
        }
        assert row["questions"] == sum(r["source"] == name for r in records)  # every split of it
        policies = row["policies"]
        assert policies["fixed N_max"]["samples"] == 16
        assert 1 <= policies["t2"]["samples"] <= 16 and 1 <= policies["t2+learned"]["samples"] <= 16
        assert policies["oracle N*"]["accuracy"] >= policies["fixed N_max"]["accuracy"] - 1e-9
        # The margin sweep replays T2 on the same orderings: its x1.5 is the t2 column.
        assert row["t2_margins"][1.5] == pytest.approx(policies["t2"])
        samples = [row["t2_margins"][m]["samples"] for m in loo.SWEEP_MARGINS]
        assert samples == sorted(samples)
    mean = result["mean"]
    assert mean["t2_sample_share"] == pytest.approx(mean["policies"]["t2"]["samples"] / 16)
    sweep = {m["margin"]: m for m in result["margin_sweep"]}
    assert list(sweep) == list(loo.SWEEP_MARGINS)
    assert sweep[1.5]["accuracy_gap"] == pytest.approx(mean["t2_accuracy_gap"])
    assert sweep[1.5]["meets_target"] == mean["t2_meets_target"]
    loo.write_report(result, tmp_path / "loo")
    assert json.loads((tmp_path / "loo.json").read_text())["n_max"] == 16
    assert (tmp_path / "loo.png").stat().st_size > 0
    table = loo.report_table(result)
    assert "mean over sources" in table and ("met" in table or "missed" in table)


def test_the_gate_sends_unfamiliar_questions_to_the_default_and_open_ended_ones_to_one_sample():
    records, states = synthetic({"a": 0.7, "b": 0.4}, per_source=50)
    far = [{**r, "source": "far"} for r in records[:20]]  # the same pools, states far away
    far_states = states[:20] + 40.0
    prose = [{**r, "source": "prose"} for r in records[20:40]]  # the same pools, open-ended states
    open_prompts = [{"split": s} for s in ("train", "validation") * 30]
    rng = np.random.default_rng(5)
    open_states = rng.normal(size=(60, *states.shape[1:])).astype(np.float32) - 40.0
    prose_states = rng.normal(size=(20, *states.shape[1:])).astype(np.float32) - 40.0
    result = loo.leave_one_out(
        records + far + prose,
        np.concatenate([states, far_states, prose_states]),
        config=TrainConfig(epochs=10),
        stopping_folds=2,
        orderings=4,
        open_ended=(open_prompts, open_states),
        sources=["far", "prose"],
        **FALLBACKS,
    )
    # No margin given: each fold's own, chosen on its validation split as `t2serve train` does.
    assert all(row["margin"] in MARGIN_GRID for row in result["sources"].values())
    assert "each fold's" in result["margin"]
    row = result["sources"]["far"]
    assert row["gate"] == {"unfamiliar": 1.0}
    # Unfamiliar: T2 launches the safe default for every question, whatever the head guessed.
    assert row["policies"]["t2"]["samples"] == 8
    row = result["sources"]["prose"]
    assert row["gate"] == {"open_ended": 1.0}
    # Open-ended: one sample under the default policies (its exact A_x(1)); fixed N_max keeps 16.
    single = np.mean([r["accuracy"][0] for r in prose])
    for name in ("t2", "t2+learned"):
        assert row["policies"][name] == pytest.approx({"accuracy": single, "samples": 1.0})
    assert row["policies"]["fixed N_max"]["samples"] == 16


def test_one_source_is_refused():
    records, states = synthetic({"only": 0.5}, per_source=10)
    with pytest.raises(ValueError, match="two sources"):
        loo.leave_one_out(
            records, states, config=TrainConfig(epochs=2), stopping_folds=2, orderings=2, **FALLBACKS
        )


def test_t2_is_scored_with_the_exact_accuracy_and_the_gates_multiple_raises_its_n():
    from estimator.offline.training.stopping_fit import fit_stopping

    records, _ = synthetic({"a": 0.5}, per_source=30)
    predictions = np.full(len(records), 0.25)  # 16 * 0.25 * 1.5 = 6 samples
    table = fit_stopping(records, predictions, seed=0, progress=False)
    answerable = ["answerable"] * len(records)
    kwargs = {"orderings": 3, "seed": 0, "margin": 1.5, "sweep": (1.0,), **FALLBACKS}
    plain = loo.score_source(records, predictions, table, answerable, **kwargs)
    far = loo.score_source(
        records, predictions, table, answerable, margin_scales=np.full(len(records), 2.0), **kwargs
    )
    accuracy = np.array([r["accuracy"] for r in records])
    # Three orderings would be noisy; T2 chooses N before decoding, so it is A_x(N) exactly.
    assert plain["policies"]["t2"] == pytest.approx({"accuracy": accuracy[:, 5].mean(), "samples": 6.0})
    assert far["policies"]["t2"] == pytest.approx({"accuracy": accuracy[:, 11].mean(), "samples": 12.0})
    assert far["t2_margins"][1.0]["samples"] == 8.0  # the multiple applies to every swept margin
    assert far["policies"]["fixed N_max"] == plain["policies"]["fixed N_max"]
