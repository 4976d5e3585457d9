"""`t2serve tune`: the operating point from a label store (estimator.offline.evaluation.tune),
its flags and what it prints. The work is imported inside the command, so serving never loads it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from server.cli.research import given
from server.config import ParallelismSettings


def add_parsers(sub: argparse._SubParsersAction) -> None:
    tune = sub.add_parser(
        "tune",
        help="pick the policy with the fewest samples that keeps agreement with the N_max vote on explored "
        "traffic (no gold), or accuracy against gold where the store has it; writes what `serve --policy @FILE` "
        "serves",
    )
    tune.add_argument(
        "--labels",
        type=Path,
        action="append",
        required=True,
        help="a label store folder: traffic records (serve --record-dir) or `t2serve label` output (repeatable)",
    )
    tune.add_argument(
        "--agreement",
        type=float,
        default=0.99,
        help="target share of pools whose vote is the N_max vote (default: %(default)s)",
    )
    tune.add_argument(
        "--objective",
        choices=("agreement", "accuracy"),
        default="agreement",
        help="agreement: with the N_max vote, at least --agreement (no gold needed); accuracy: against gold, "
        "on the pools that have it (`t2serve label` records, gold joined by `label --server`), within "
        "--tolerance of the best candidate: for sources where more samples lose accuracy (default: %(default)s)",
    )
    tune.add_argument(
        "--tolerance",
        type=float,
        help="with --objective accuracy: how far below the best candidate's tuning accuracy the cheapest "
        "choice may be (default: estimator/offline/evaluation/tune.py's TOLERANCE)",
    )
    tune.add_argument(
        "--held-out",
        type=float,
        help="share of requests held out to check the choice (default: estimator/offline/evaluation/tune.py's "
        "HELD_OUT)",
    )
    tune.add_argument("--seed", type=int, help="seed of the tuning/held-out split (default: 0)")
    tune.add_argument(
        "--head",
        type=Path,
        help="a head path: its stopping table adds t2+learned candidates (pools with a recorded prediction)",
    )
    tune.add_argument(
        "--default-parallelism",
        type=int,
        default=ParallelismSettings().default_parallelism,
        help="N of t2 on a pool without a prediction, as the server's (default: %(default)s)",
    )
    tune.add_argument(
        "--out", type=Path, help="the tuned policy's JSON (default: tuned.json in the first store)"
    )
    tune.set_defaults(run=tune_command)


def tune_command(args: argparse.Namespace) -> None:
    from estimator.learned_stopping import StoppingTable
    from estimator.offline.evaluation import tune

    if args.tolerance is not None and args.objective != "accuracy":
        raise SystemExit("t2serve tune: --tolerance is for --objective accuracy")
    stopping = None
    if args.head is not None:
        stopping = StoppingTable.load(args.head)
        if stopping is None:
            raise SystemExit(f"t2serve tune: {args.head} has no stopping table (`t2serve train` fits one)")
    try:
        result = tune.tune(
            tune.load_store(args.labels),
            store=args.labels,
            target=args.agreement,
            objective=args.objective,
            default=args.default_parallelism,
            stopping=stopping,
            **given(args, "held_out", "seed", "tolerance"),
        )
    except ValueError as exc:
        raise SystemExit(f"t2serve tune: {exc}") from exc
    print(tune.report_table(result))
    out = args.out or args.labels[0] / tune.OUTPUT_NAME
    tune.write_result(result, out)
    print(f"wrote {out}: serve it with `t2serve serve --policy @{out}`")
