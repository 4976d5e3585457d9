"""`t2serve store prune`: the label store's retention bound (estimator.label_store.prune_store).

The bound is applied by this command, not by the servers: one job (the retrain CronJob,
deploy/k8s/retrain-cronjob.yaml, or a cron line) prunes after it has retrained on the
store, so nothing is removed that the next head has not seen, and the replicas stay
append-only writers that never list or delete a shared folder on the request path.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

GIB = 1024**3
DAY_S = 86_400.0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    store = sub.add_parser("store", help="label store maintenance (retention)")
    actions = store.add_subparsers(dest="action", required=True)
    prune = actions.add_parser(
        "prune",
        help="remove whole shards, oldest first, beyond an age or size bound (safe beside servers "
        "writing and other pruners)",
    )
    prune.add_argument(
        "--labels", type=Path, action="append", required=True, help="a label store folder (repeatable)"
    )
    prune.add_argument("--max-age-days", type=float, help="remove shards committed longer ago than this")
    prune.add_argument(
        "--max-gb", type=float, help="remove the oldest shards until a folder holds at most this (GiB)"
    )
    prune.add_argument(
        "--include-labels",
        action="store_true",
        help="also prune `t2serve label` shards (shard-00000 ...; kept by default: a labelling run redoes a "
        "missing one)",
    )
    prune.set_defaults(run=prune_command, prune_parser=prune)


def prune_command(args: argparse.Namespace) -> None:
    """Prune each folder; one JSON line per folder: what was removed and kept."""
    from estimator.label_store import prune_store

    if args.max_age_days is None and args.max_gb is None:
        args.prune_parser.error("give a bound: --max-age-days and/or --max-gb")
    for folder in args.labels:
        if not folder.is_dir():
            raise SystemExit(f"t2serve store prune: {folder} is not a folder")
        pruned = prune_store(
            folder,
            max_age_s=None if args.max_age_days is None else args.max_age_days * DAY_S,
            max_bytes=None if args.max_gb is None else int(args.max_gb * GIB),
            include_labels=args.include_labels,
        )
        print(json.dumps({"store": str(folder), **asdict(pruned)}), flush=True)
