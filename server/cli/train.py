"""`t2serve train`: the head (estimator.offline.training.head_fit) or the answer posterior
(training/calibration_fit) from label folders and traffic stores, its flags and what it
prints. The work is imported inside the command, so serving never loads it; a flag left
unset keeps the offline code's default (TrainConfig, fit_margin, fit_stopping).
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from server.cli.research import given


def add_parsers(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train the T2 head (per-layer probes) on labeled states")
    train.add_argument(
        "--labels",
        type=Path,
        action="append",
        required=True,
        help="a `t2serve label` output folder or a traffic store (serve --record-dir; gold-*.jsonl in it "
        "joined by request id); repeat to combine folders of the same model and sampling",
    )
    train.add_argument(
        "--out",
        type=Path,
        help="head path without suffix (.safetensors/.json); needed unless --fit-calibration",
    )
    targets = train.add_argument_group(
        "targets (estimator/offline/labels/gold_free.py; traffic without gold: labels/traffic.py)"
    )
    targets.add_argument(
        "--targets",
        choices=("gold", "majority", "share", "posterior"),
        help="what N* is of: gold (the labelled A(N); records without gold are an error), majority (A(N) "
        "against the pool's N_max vote), share (the gold N* expected with answers as likely right as their "
        "vote share) or posterior (expected under --calibration); default: gold where a record has gold, "
        "else posterior with --calibration, else majority",
    )
    targets.add_argument(
        "--target-eps",
        type=float,
        default=0.0,
        help="gold-free rules: N* of a curve is the smallest N within this of its maximum (default: %(default)s)",
    )
    targets.add_argument(
        "--calibration",
        type=Path,
        help="an answer posterior (JSON) from --fit-calibration, for posterior targets",
    )
    targets.add_argument(
        "--fit-calibration",
        type=Path,
        metavar="FILE",
        help="fit the answer posterior on the gold pools of --labels (train and validation splits only), "
        "write it to FILE and stop (no head)",
    )
    targets.add_argument(
        "--calibration-states",
        choices=("auto", "off"),
        default="auto",
        help="with --fit-calibration: auto also fits p(leader right) on the pools' states and keeps it where "
        "it beats the pool features alone in cross-validation (gold of the traffic's own source only: "
        "estimator/offline/labels/leader_states.py); off: pool features only (default: %(default)s)",
    )
    probes = train.add_argument_group("probes (defaults: estimator.offline.training.probes.TrainConfig)")
    probes.add_argument("--ratio", type=float, help="probe width as a fraction of the hidden size")
    probes.add_argument("--epochs", type=int)
    probes.add_argument("--lr", type=float)
    probes.add_argument("--weight-decay", type=float)
    probes.add_argument("--seed", type=int, help="also the stopping table's orderings")
    train.add_argument(
        "--open-ended",
        type=Path,
        help="a `t2serve label --data open-ended` folder: also fit the answerable/open-ended gate "
        "(<head>.gate.json) on its states and the labels'",
    )
    train.add_argument(
        "--gate-only", action="store_true", help="keep the head at --out as it is; fit only its gate"
    )
    train.add_argument(
        "--stopping-folds",
        type=int,
        default=5,
        help="cross-fitting folds for the learned stopping table (<head>.stopping.safetensors, policy "
        "t2+learned); 0: no table (default: %(default)s)",
    )
    train.add_argument(
        "--margin-tolerance",
        type=float,
        help="the head's T2 margin: the smallest whose validation accuracy is within this of fixed "
        "N_max's (default: estimator/offline/training/margin_fit.py's TOLERANCE)",
    )
    train.add_argument(
        "--stopping-bandwidth",
        type=float,
        help="stopping table: kernel width over the head's estimate, in samples (default: "
        "estimator/offline/training/stopping_fit.py's)",
    )
    train.set_defaults(run=train_command)


def train_config(args: argparse.Namespace) -> Any:
    """The probes' estimator.offline.training.probes.TrainConfig: the flags set, its defaults for the rest."""
    from estimator.offline.training.probes import TrainConfig

    return TrainConfig(**given(args, *(f.name for f in fields(TrainConfig))))


def train_command(args: argparse.Namespace) -> None:
    from estimator.offline.labels.answer_posterior import AnswerPosterior
    from estimator.offline.training import calibration_fit, head_fit

    if args.fit_calibration:
        try:
            posterior = calibration_fit.fit_calibration(args.labels, states=args.calibration_states == "auto")
        except ValueError as exc:
            raise SystemExit(f"t2serve train --fit-calibration: {exc}") from exc
        posterior.save(args.fit_calibration)
        print(calibration_fit.report(posterior, args.fit_calibration))
        return
    if args.out is None:
        raise SystemExit("t2serve train: --out is needed (the head's path)")
    if args.gate_only and not args.open_ended:
        raise SystemExit("t2serve train --gate-only needs --open-ended")
    if args.targets == "posterior" and args.calibration is None:
        raise SystemExit("t2serve train --targets posterior needs --calibration (from --fit-calibration)")
    try:
        posterior = AnswerPosterior.load(args.calibration) if args.calibration else None
        labels = head_fit.training_labels(
            args.labels, rule=args.targets, posterior=posterior, eps=args.target_eps
        )
        print(head_fit.source_table(labels.records))
        if carved := labels.header.get("validation_carved"):
            print(f"no validation split in the labels: {carved:.0%} of the train questions carved out for it")
        trained = head_fit.train_head(
            labels,
            args.out,
            config=train_config(args),
            open_ended=args.open_ended,
            gate_only=args.gate_only,
            stopping_folds=args.stopping_folds,
            **given(args, "margin_tolerance", "stopping_bandwidth"),
        )
    except ValueError as exc:
        raise SystemExit(f"t2serve train: {exc}") from exc
    print(head_fit.report(trained))
