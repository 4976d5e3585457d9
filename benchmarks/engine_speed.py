"""Engine speed: t2serve's default configuration against raw vLLM at its fastest, in one run.

On the same prompts, one configuration after the other (a 2-core box cannot run two
engines side by side without each slowing the other):

  1. raw vLLM, fastest configuration here: `vllm.LLM` offline batch generation (no HTTP),
     torch.compile on, the dtype that is fast on this CPU (bf16 only with native kernels),
     prefix caching, block size 32. N samples per prompt as one `n=N` request.
  2. t2serve, default configuration (`t2serve serve`: compiled, `--dtype auto`, capture on),
     fixed N over HTTP, all prompts at once.
  3. t2serve `--enforce-eager` (same otherwise).
  4. (`--old-default`) t2serve as it shipped before: `--enforce-eager --dtype bfloat16`.

Throughput = generated tokens / wall time, samples run to a fixed length (`ignore_eos`) so
every configuration generates the same tokens; each configuration warms up, then runs
`--rounds` rounds (median reported). Then, on the default t2serve server, latency of `auto`
(capture + T2 head) against a fixed N equal to the N `auto` chose for each prompt, with 1
and 8 concurrent clients (p50 over `--latency-requests` requests each).

Prints tables and writes benchmarks/results/engine_speed.{json,png}.

    .venv/bin/python benchmarks/engine_speed.py                      # defaults below
    .venv/bin/python benchmarks/engine_speed.py --prompts 8 --rounds 1 --latency-requests 8

`--parallel` runs vLLM's parallel shapes (PP 2, TP 3, DP 2) against one rank instead, raw
vLLM and t2serve with capture on: throughput, capture correctness and overhead
(benchmarks/engine_speed_parallel.py; engine_speed_parallel.{json,png}):

    .venv/bin/python benchmarks/engine_speed.py --parallel --prompts 4 --n 4 --max-tokens 32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import engine_speed_parallel  # noqa: E402
from benchmarks.common import RESULTS, ServerProcess, prompts  # noqa: E402

RESULT_TAG = "ENGINE_SPEED_RAW_VLLM "


def raw_vllm(config: dict) -> dict:
    """Phase 1, run in a child process (`--raw-vllm CONFIG`) so its engine is gone after."""
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from server.config import EngineSettings
    from server.engine.platform import CPU_BLOCK_SIZE, apply_cpu_environment, on_cpu, resolve_dtype

    cpu = on_cpu()
    if cpu:
        apply_cpu_environment(EngineSettings(model=config["model"], served_model_name="bench"))
    dtype = resolve_dtype("auto", cpu)
    started = time.monotonic()
    llm = LLM(
        model=config["model"],
        max_model_len=2048,
        dtype=dtype,
        enforce_eager=False,
        enable_prefix_caching=True,
        block_size=CPU_BLOCK_SIZE if cpu else None,
        seed=0,
    )
    start_s = time.monotonic() - started
    tok = AutoTokenizer.from_pretrained(config["model"])
    texts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in config["questions"]
    ]
    params = SamplingParams(n=config["n"], max_tokens=config["max_tokens"], temperature=0.8, ignore_eos=True)
    llm.generate(texts[:2], params, use_tqdm=False)  # warm-up
    rounds = []
    for k in range(config["rounds"]):
        t0 = time.monotonic()
        outputs = llm.generate(texts, params, use_tqdm=False)
        wall = time.monotonic() - t0
        tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        rounds.append({"wall_s": wall, "generated_tokens": tokens, "tokens_per_s": tokens / wall})
        print(f"raw vLLM round {k + 1}: {tokens / wall:.1f} tok/s", file=sys.stderr, flush=True)
    return {"dtype": dtype, "start_s": start_s, "rounds": rounds}


def median_round(rounds: list[dict]) -> dict:
    ordered = sorted(rounds, key=lambda r: r["tokens_per_s"])
    return {**ordered[len(ordered) // 2], "rounds": rounds}


async def throughput(server: ServerProcess, questions: list[str], rounds: int, label: str) -> dict:
    await server.run(questions[:2], f"{label} warm-up")
    out = []
    for k in range(rounds):
        r = await server.run(questions, f"{label} round {k + 1}")
        out.append({"wall_s": r["wall_s"], "generated_tokens": r["generated_tokens"]})
        out[-1]["tokens_per_s"] = r["generated_tokens"] / r["wall_s"]
    return median_round(out)


async def latency(server: ServerProcess, questions: list[str], clients: int) -> dict:
    """`auto` first (its chosen N per prompt recorded), then fixed N at those N, each with
    `clients` concurrent clients; p50/p90 of per-request latency."""
    auto = await server.run(questions, f"auto, {clients} client(s)", concurrency=clients, parallelism="auto")
    chosen = [t["n_used"] for t in auto["t2"]]
    fixed = await server.run(
        questions, f"fixed, {clients} client(s)", concurrency=clients, parallelism=chosen
    )

    def stats(run: dict) -> dict:
        lat = sorted(run["latencies_s"])
        return {"p50_s": statistics.median(lat), "p90_s": lat[int(0.9 * (len(lat) - 1))], "latencies_s": lat}

    a, f = stats(auto), stats(fixed)
    capture_ms = [t["capture_ms"] for t in auto["t2"] if t.get("capture_ms") is not None]
    return {
        "clients": clients,
        "auto": a,
        "fixed_same_n": f,
        "p50_ratio": a["p50_s"] / f["p50_s"],
        "mean_n": statistics.mean(chosen),
        "predictions": sum(t.get("prediction") is not None for t in auto["t2"]),
        "capture_ms_p50": statistics.median(capture_ms) if capture_ms else None,
    }


def run_server(
    args, model_dir: Path, name: str, server_args: str, questions: list[str], measure_latency: bool
):
    ns = SimpleNamespace(n=args.n, max_tokens=args.max_tokens, server_args=server_args)
    server = ServerProcess(ns, model_dir, f"engine_speed_{name}")
    loop = asyncio.new_event_loop()
    try:
        started = time.monotonic()
        loop.run_until_complete(server.wait_ready())
        result = {"server_args": server_args, "start_s": time.monotonic() - started}
        result.update(loop.run_until_complete(throughput(server, questions, args.rounds, name)))
        if measure_latency:
            subset = questions[: args.latency_requests]
            result["latency"] = [loop.run_until_complete(latency(server, subset, c)) for c in (1, 8)]
        return result
    finally:
        server.stop()
        loop.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (fixed N)")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2, help="measurement rounds per configuration (median)")
    parser.add_argument("--latency-requests", type=int, default=16, help="requests per latency measurement")
    parser.add_argument(
        "--old-default", action="store_true", help="also t2serve --enforce-eager --dtype bfloat16"
    )
    parser.add_argument("--model", help="model folder (default: the embedded model)")
    parser.add_argument(
        "--parallel", action="store_true", help="parallel shapes against one rank (engine_speed_parallel.py)"
    )
    parser.add_argument(
        "--shapes",
        default=engine_speed_parallel.DEFAULT_SHAPES,
        help=f"--parallel: shapes to run, of {', '.join(engine_speed_parallel.SHAPES)}",
    )
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="--parallel: KV cache per rank (GiB)")
    parser.add_argument("--raw-vllm", help=argparse.SUPPRESS)  # child-process entry
    parser.add_argument("--parallel-child", help=argparse.SUPPRESS)  # child-process entry
    args = parser.parse_args()
    if args.parallel_child:
        engine_speed_parallel.child_main(args.parallel_child)
        return
    if args.raw_vllm:
        result = raw_vllm(json.loads(args.raw_vllm))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return

    from server.engine.model_store import prepare_embedded_model
    from server.engine.platform import cpu_has_native_bf16

    model_dir = Path(args.model) if args.model else prepare_embedded_model()
    RESULTS.mkdir(exist_ok=True)
    if args.parallel:
        engine_speed_parallel.main(args, model_dir)
        return
    questions = prompts(args.prompts)

    print("raw vLLM (compiled, fastest dtype) ...", flush=True)
    config = {**vars(args), "model": str(model_dir), "questions": questions}
    child = subprocess.run(
        [sys.executable, __file__, "--raw-vllm", json.dumps(config)],
        stdout=subprocess.PIPE,
        text=True,
        check=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    # vLLM logs to stdout too: the result is the line tagged by the child.
    (line,) = [line for line in child.stdout.splitlines() if line.startswith(RESULT_TAG)]
    raw = json.loads(line.removeprefix(RESULT_TAG))
    raw.update(median_round(raw.pop("rounds")))

    configs = {"t2serve default": "", "t2serve eager": "--enforce-eager"}
    if args.old_default:
        configs["t2serve old default (eager, bf16)"] = "--enforce-eager --dtype bfloat16"
    servers = {
        name: run_server(args, model_dir, name.replace(" ", "_"), extra, questions, name == "t2serve default")
        for name, extra in configs.items()
    }
    default = servers["t2serve default"]
    ratio = default["tokens_per_s"] / raw["tokens_per_s"]
    result = {
        "benchmark": "engine_speed",
        "config": {k: v for k, v in vars(args).items() if k != "raw_vllm"} | {"model": str(model_dir)},
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "native_bf16": cpu_has_native_bf16(),
        },
        "raw_vllm": raw,
        "t2serve": servers,
        "default_vs_raw": ratio,
        "targets": {"default_vs_raw": ">= 0.95", "auto_p50_ratio": "<= 1.02"},
    }
    (RESULTS / "engine_speed.json").write_text(json.dumps(result, indent=2))

    print()
    print(f"CPU native bf16: {cpu_has_native_bf16()}; raw vLLM dtype: {raw['dtype']}")
    print(f"{'configuration':36} {'tok/s':>8} {'vs raw':>7} {'start s':>8}")
    rows = [("raw vLLM (compiled, " + raw["dtype"] + ")", raw)] + list(servers.items())
    for name, r in rows:
        print(
            f"{name:36} {r['tokens_per_s']:8.1f} {r['tokens_per_s'] / raw['tokens_per_s']:7.2f} {r['start_s']:8.0f}"
        )
    print(f"t2serve default / raw vLLM best: {ratio:.3f} (target >= 0.95)")
    print()
    print(
        f"{'clients':>7} {'auto p50 s':>10} {'fixed p50 s':>11} {'ratio':>6} {'mean N':>7} {'capture ms':>10}"
    )
    for lat in default["latency"]:
        cap = lat["capture_ms_p50"]
        print(
            f"{lat['clients']:7d} {lat['auto']['p50_s']:10.3f} {lat['fixed_same_n']['p50_s']:11.3f} "
            f"{lat['p50_ratio']:6.3f} {lat['mean_n']:7.2f} {cap if cap is None else round(cap, 1)!s:>10}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    names = [name.replace("t2serve ", "t2serve\n") for name, _ in rows]
    ax[0].bar(names, [r["tokens_per_s"] for _, r in rows], color=["#999999"] + ["#3b7dd8"] * len(servers))
    ax[0].set_ylabel("generated tokens / s")
    ax[0].set_title(f"{args.prompts} prompts x N={args.n} x {args.max_tokens} tokens", fontsize=9)
    ax[0].tick_params(axis="x", labelsize=7)
    width = 0.35
    xs = range(len(default["latency"]))
    ax[1].bar(
        [x - width / 2 for x in xs], [lat["auto"]["p50_s"] for lat in default["latency"]], width, label="auto"
    )
    ax[1].bar(
        [x + width / 2 for x in xs],
        [lat["fixed_same_n"]["p50_s"] for lat in default["latency"]],
        width,
        label="fixed N",
    )
    ax[1].set_xticks(list(xs), [f"{lat['clients']} client(s)" for lat in default["latency"]])
    ax[1].set_ylabel("p50 latency (s)")
    ax[1].set_title("auto (capture + head) vs fixed at the same N", fontsize=9)
    ax[1].legend(fontsize=8)
    fig.suptitle(
        f"t2serve default / raw vLLM best: {ratio:.2f}x (native bf16: {cpu_has_native_bf16()})", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(RESULTS / "engine_speed.png", dpi=120)
    print(f"wrote {RESULTS / 'engine_speed.json'} and .png")


if __name__ == "__main__":
    main()
