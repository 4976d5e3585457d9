"""`t2serve` console entry point: `serve` and `prepare-model` (server/cli/serve.py), and the
research commands `label` and `evaluate` (server/cli/research.py), `train`
(server/cli/train.py), `tune` (server/cli/tune.py) and `store prune` (server/cli/store.py)."""

from __future__ import annotations

import argparse

from server.cli import research, serve, store, train, tune


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve.add_parsers(sub)
    research.add_parsers(sub)
    train.add_parsers(sub)
    tune.add_parsers(sub)
    store.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)  # each subcommand's parser names its handler
