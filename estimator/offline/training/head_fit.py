"""`t2serve train`: a head fitted on label folders and traffic stores, with what the server
runs beside it, and the report the command prints. Each record is trained on its target
(estimator.offline.labels.gold_free): gold where it has gold, a gold-free rule otherwise.

Beside the per-layer probes (estimator.offline.training.probes): the head's own T2 margin, chosen on
its validation split (margin_fit); given open-ended states, its answerable/open-ended gate
(gate_fit); and its learned stopping table (stopping_fit), fitted on cross-fitted predictions
for the train questions.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from estimator.gate import Gate, gate_path
from estimator.head import T2Head
from estimator.learned_stopping import StoppingTable
from estimator.offline.inputs.open_ended import load_states
from estimator.offline.labels.answer_posterior import AnswerPosterior
from estimator.offline.labels.gold_free import with_targets
from estimator.offline.labels.targets import TYPES, source_of
from estimator.offline.labels.traffic import VALIDATION_SHARE, carve_validation, load_store
from estimator.offline.training.gate_fit import fit_gate
from estimator.offline.training.margin_fit import TOLERANCE, fit_margin
from estimator.offline.training.probes import TrainConfig, cross_fitted_predictions, fit, in_split, targets
from estimator.offline.training.stopping_fit import fit_stopping

# Below this many validation questions the margin is also fitted on the train questions'
# cross-fitted predictions (the stopping table's folds, else CROSS_FIT_FOLDS).
MARGIN_QUESTIONS = 50
CROSS_FIT_FOLDS = 5


@dataclass
class TrainingLabels:
    """Label folders and traffic stores read together (estimator.offline.labels.traffic.load_store),
    each record with its training target (gold_free.with_targets), and their train and
    validation splits."""

    records: list[dict]
    header: dict
    train: tuple[list[dict], np.ndarray]
    validation: tuple[list[dict], np.ndarray]


def training_labels(
    folders: list[Path],
    *,
    rule: str | None = None,
    posterior: AnswerPosterior | None = None,
    eps: float = 0.0,
) -> TrainingLabels:
    """The folders' records with targets by `rule` (None: gold where a record has gold, else
    the posterior given one, else the pool's majority; gold_free.RULES) and N* at tolerance
    `eps` for the gold-free rules."""
    records, states, header = load_store(folders)
    fallback = "posterior" if posterior is not None else "majority"
    if posterior is not None and posterior.leader_states is not None:
        calibrated = posterior.fitted.get("model", {}).get("fingerprint")
        if calibrated != header["model"].get("fingerprint"):
            raise ValueError(
                f"the calibration reads the states of model {calibrated}, the labels are of model "
                f"{header['model'].get('fingerprint')}"
            )
    records = with_targets(records, rule, posterior=posterior, eps=eps, fallback=fallback, states=states)
    used = Counter(r["target_rule"] for r in records)
    header = {
        **header,
        "targets": {
            "rules": dict(used),
            "eps": eps,
            **({"calibration": posterior.fitted} if posterior is not None and used["posterior"] else {}),
        },
    }
    train, validation = in_split(records, states, "train"), in_split(records, states, "validation")
    if train[0] and not validation[0]:
        records = carve_validation(records)
        header["validation_carved"] = VALIDATION_SHARE
        train, validation = in_split(records, states, "train"), in_split(records, states, "validation")
    if not train[0] or not validation[0]:
        raise ValueError("the labels need both train and validation questions")
    return TrainingLabels(records, header, train, validation)


def source_table(records: list[dict]) -> str:
    """Questions per source and split, each source's sample-type shares (of its questions with
    gold), and the targets trained on: rules and mean N*."""
    sources = sorted({source_of(r) for r in records})
    names = [TYPES[t][:8] for t in TYPES]
    lines = [
        f"{'source':<18} {'train':>6} {'val':>5} {'test':>5}  "
        + " ".join(f"{n:>8}" for n in names)
        + "  targets (mean N*)"
    ]
    for source in sources:
        rows = [r for r in records if source_of(r) == source]
        splits = Counter(r["split"] for r in rows)
        types = Counter(r["type"] for r in rows if "type" in r)
        typed = sum(types.values())
        rules = Counter(r.get("target_rule", "gold") for r in rows)
        n_star = np.mean([r.get("target_n_star", r.get("n_star", 0)) for r in rows])
        lines.append(
            f"{source[:18]:<18} {splits['train']:6d} {splits['validation']:5d} {splits['test']:5d}  "
            + " ".join(f"{types.get(t, 0) / typed:8.1%}" if typed else f"{'-':>8}" for t in TYPES)
            + "  "
            + ", ".join(f"{rule} {count}" for rule, count in rules.items())
            + f" ({n_star:.2f})"
        )
    return "\n".join(lines)


@dataclass
class TrainedHead:
    """What `train_head` fitted and saved at `out`."""

    labels: TrainingLabels
    out: Path
    head: T2Head | None  # None: --gate-only kept the head at `out` as it was
    gate: Gate | None
    table: StoppingTable | None
    stopping_folds: int


def train_head(
    labels: TrainingLabels,
    out: Path,
    *,
    config: TrainConfig,
    stopping_folds: int,
    open_ended: Path | None = None,
    gate_only: bool = False,
    margin_tolerance: float = TOLERANCE,
    stopping_bandwidth: float | None = None,
) -> TrainedHead:
    """Fit and save the head at `out` (<out>.safetensors/.json), its gate (given `open_ended`,
    a `t2serve label --data open-ended` folder) and, for `stopping_folds` > 1, its stopping
    table; `gate_only` fits and saves the gate alone. `stopping_bandwidth` None: fit_stopping's."""
    if gate_only:
        if open_ended is None:
            raise ValueError("a gate-only fit needs open-ended states")
        gate = fit_gate_on(labels, open_ended)
        gate.save(out)
        return TrainedHead(labels, out, None, gate, None, 0)
    (train_records, train_states), (val_records, val_states) = labels.train, labels.validation
    head = fit(
        train_states,
        targets(train_records),
        val_states,
        targets(val_records),
        model_name=labels.header["model"]["name"],
        n_max=labels.header["config"]["n_max"],
        config=config,
        labels_info=labels.header,
    )
    head.meta.model_fingerprint = labels.header["model"].get("fingerprint", "")
    gate = fit_gate_on(labels, open_ended) if open_ended else None
    small = len(val_records) < MARGIN_QUESTIONS
    cross_fitted = None
    if stopping_folds > 1 or small:
        cross_fitted = cross_fitted_predictions(
            train_states,
            targets(train_records),
            val_states,
            targets(val_records),
            folds=stopping_folds if stopping_folds > 1 else CROSS_FIT_FOLDS,
            config=config,
        )
    # The margin is chosen as the server will run it: times the gate's multiple. On a small
    # validation split (a store's first retrains: a handful of questions, where one question
    # solved only at N_max decides it) it is chosen on the train questions' cross-fitted
    # predictions too.
    margin_records, margin_states, predictions = val_records, val_states, head.predict_batch(val_states)
    if small:
        assert cross_fitted is not None
        margin_records = [*train_records, *val_records]
        margin_states = np.concatenate([train_states, val_states])
        predictions = np.concatenate([cross_fitted, predictions])
    fitted = fit_margin(
        np.array([r.get("target_accuracy", r.get("accuracy")) for r in margin_records]),
        predictions,
        scales=gate.margin_scale(margin_states) if gate is not None else None,
        tolerance=margin_tolerance,
    )
    fitted["cross_fitted_train"] = len(train_records) if small else 0
    head.meta.margin, head.meta.margin_fit = fitted["margin"], fitted
    head.save(out)
    if gate is not None:
        gate.save(out)  # after the head: saving a head removes the gate of an earlier one
    table = None
    if stopping_folds > 1:
        assert cross_fitted is not None
        bandwidth = {} if stopping_bandwidth is None else {"bandwidth": stopping_bandwidth}
        table = fit_stopping(train_records, cross_fitted, seed=config.seed, **bandwidth)
        table.save(out)
    return TrainedHead(labels, out, head, gate, table, stopping_folds)


def fit_gate_on(labels: TrainingLabels, open_ended: Path) -> Gate:
    """The answerable/open-ended gate on the labels' states and `open_ended`'s (not saved)."""
    prompts, states, model = load_states(open_ended)
    if (model["num_layers"], model["hidden_size"]) != (
        labels.header["model"]["num_layers"],
        labels.header["model"]["hidden_size"],
    ):
        raise ValueError(f"{open_ended} holds states of another model than the labels'")
    split = np.array([p["split"] for p in prompts])
    return fit_gate(
        labels.train[1],
        states[split == "train"],
        labels.validation[1],
        states[split == "validation"],
        layers=list(range(model["num_layers"])),
    )


def report(trained: TrainedHead) -> str:
    """What `t2serve train` prints once the head is saved."""
    out, gate, head = trained.out, trained.gate, trained.head
    lines = []
    if gate is not None:
        lines.append(
            f"gate: layer {gate.layer}, radius {gate.radius:.2f}; validation {json.dumps(gate.fitted['validation'])}"
        )
    if head is None:
        return "\n".join([*lines, f"wrote {gate_path(out)}"])
    train_records, val_records = trained.labels.train[0], trained.labels.validation[0]
    if trained.table is not None:
        lines.append(
            f"stopping table: {len(trained.table.states)} vote states x {len(trained.table.grid)} estimates, "
            f"from {trained.stopping_folds}-fold cross-fitted predictions on {len(train_records)} train questions"
        )
    mse = head.meta.layer_val_mse
    order = sorted(range(len(mse)), key=mse.__getitem__)
    fitted = head.meta.margin_fit
    lines += [
        f"train {len(train_records)}  validation {len(val_records)}  N_max {head.meta.n_max}",
        "best layers (validation MSE of N*/N_max): " + ", ".join(f"{i}: {mse[i]:.4f}" for i in order[:5]),
        f"combined over {len(head.meta.layers)} layers {head.meta.layers}: {head.meta.combined_val_mse:.4f}",
        f"t2:margin={fitted['margin']:g} ({margin_questions(fitted)}: accuracy {fitted['accuracy']:.3f} at "
        f"{fitted['samples']:.2f} samples, fixed N_max {fitted['fixed_accuracy']:.3f}, tolerance "
        f"{fitted['tolerance']:g}{'' if fitted['met'] else ', not met: the grid largest'})",
        f"wrote {out}.safetensors and {out}.json" + (f", {gate_path(out)}" if gate else ""),
    ]
    return "\n".join(lines)


def margin_questions(fitted: dict) -> str:
    """What the margin was fitted on, as the report says it."""
    train = fitted.get("cross_fitted_train", 0)
    validation = fitted["questions"] - train
    return f"{validation} validation and {train} cross-fitted train questions" if train else "validation"
