"""Front-end overhead: t2serve at fixed N vs vLLM's own batch generation with n=N.

Both sides use the same model, the same engine settings (eager, prefix caching, the dtype
and the CPU defaults t2serve applies) and the same prompts; samples run to a fixed length
(`ignore_eos`) so both generate exactly the same number of tokens.

  1. t2serve: `t2serve serve` in a subprocess; all prompts sent at once over HTTP
     (`parallelism: N`), wall time from first send to last response.
  2. vLLM: `vllm.LLM(...).generate(prompts, SamplingParams(n=N))` in this process.
Both engines stay up; rounds alternate between them and the median round is reported,
because single runs on a small shared CPU vary by +-15%.

Prints a table and writes benchmarks/results/frontend_overhead.{json,png}.

    .venv/bin/python benchmarks/frontend_overhead.py            # defaults below
    .venv/bin/python benchmarks/frontend_overhead.py --prompts 16 --n 4 --max-tokens 32
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

from benchmarks.common import RESULTS, ServerProcess, offline_llm, prompts  # noqa: E402


class VLLMBatch:
    """vLLM's own offline batch generation with the same engine settings."""

    def __init__(self, args, model_dir: Path):
        from transformers import AutoTokenizer
        from vllm import SamplingParams

        self.llm = offline_llm(model_dir)
        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        self.params = SamplingParams(n=args.n, max_tokens=args.max_tokens, temperature=0.8, ignore_eos=True)

    def run(self, questions: list[str], label: str) -> dict:
        texts = [
            self.tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            for q in questions
        ]
        t0 = time.monotonic()
        outputs = self.llm.generate(texts, self.params, use_tqdm=False)
        wall = time.monotonic() - t0
        print(f"{label}: {wall:.1f} s", flush=True)
        tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
        return {"wall_s": wall, "generated_tokens": tokens, "requests": len(questions)}


def summarize(runs: list[dict]) -> dict:
    for r in runs:
        r["requests_per_s"] = r["requests"] / r["wall_s"]
        r["tokens_per_s"] = r["generated_tokens"] / r["wall_s"]
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    median = ordered[len(ordered) // 2]
    return {**median, "rounds": runs}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=8, help="samples per prompt (fixed N)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", help="model folder (default: the embedded model)")
    parser.add_argument(
        "--server-args", default="", help="extra `t2serve serve` arguments, e.g. '--tie-break order'"
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved measurement rounds (median reported)"
    )
    parser.add_argument(
        "--only-server", action="store_true", help="skip the vLLM phase (quick A/B of server settings)"
    )
    args = parser.parse_args()

    from server.engine.model_store import prepare_embedded_model

    model_dir = Path(args.model) if args.model else prepare_embedded_model()
    RESULTS.mkdir(exist_ok=True)
    questions = prompts(args.prompts)

    server_proc = ServerProcess(args, model_dir, "frontend_overhead")
    server_runs: list[dict] = []
    raw_runs: list[dict] = []
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(server_proc.wait_ready())
        loop.run_until_complete(server_proc.run(questions[:2], "warm-up"))
        raw = None if args.only_server else VLLMBatch(args, model_dir)
        if raw is not None:
            raw.run(questions[:2], "vLLM warm-up")
        # Interleaved rounds: both engines see the same machine state; medians are reported.
        for k in range(args.rounds):
            server_runs.append(loop.run_until_complete(server_proc.run(questions, f"t2serve round {k + 1}")))
            if raw is not None:
                raw_runs.append(raw.run(questions, f"vLLM round {k + 1}"))
    finally:
        server_proc.stop()
        loop.close()
    server = summarize(server_runs)
    if args.only_server:
        print(f"t2serve: {server['tokens_per_s']:.1f} tok/s (median of {args.rounds})")
        return
    raw_summary = summarize(raw_runs)
    overhead = 1 - server["tokens_per_s"] / raw_summary["tokens_per_s"]
    raw = raw_summary
    result = {
        "benchmark": "frontend_overhead",
        "config": {**vars(args), "model": str(model_dir)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "t2serve": server,
        "vllm": raw,
        "throughput_overhead": overhead,
        "target": "< 0.05",
    }
    (RESULTS / "frontend_overhead.json").write_text(json.dumps(result, indent=2))

    print()
    print(f"{'':10} {'wall s':>8} {'req/s':>8} {'tok/s':>8} {'tokens':>8}")
    for name, r in (("t2serve", server), ("vLLM", raw)):
        print(
            f"{name:10} {r['wall_s']:8.1f} {r['requests_per_s']:8.3f} {r['tokens_per_s']:8.1f} {r['generated_tokens']:8d}"
        )
    print(f"throughput overhead of t2serve vs vLLM: {overhead * 100:+.1f}% (target < 5%)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(8, 3.2))
    names = ["t2serve", "vLLM n=N"]
    ax[0].bar(names, [server["tokens_per_s"], raw["tokens_per_s"]], color=["#3b7dd8", "#999999"])
    ax[0].set_ylabel("generated tokens / s")
    ax[1].bar(names, [server["requests_per_s"], raw["requests_per_s"]], color=["#3b7dd8", "#999999"])
    ax[1].set_ylabel("requests / s")
    fig.suptitle(
        f"{args.prompts} prompts x N={args.n} x {args.max_tokens} tokens: overhead {overhead * 100:+.1f}%",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(RESULTS / "frontend_overhead.png", dpi=120)
    print(f"wrote {RESULTS / 'frontend_overhead.json'} and .png")


if __name__ == "__main__":
    main()
