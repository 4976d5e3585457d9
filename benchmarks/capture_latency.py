"""Hidden-state capture latency, and what waiting for it costs a request.

For each concurrency level C, sends C requests at once to a `t2serve serve` subprocess:
  - `parallelism: "auto"`: sample 0 starts, the server waits for the pushed `[L, d]` states
    (reported per request as `t2.capture_ms`), then launches the other N-1 samples;
  - `parallelism: N` (fixed, same N as auto's default): all samples start at once.
The difference in request latency is what the capture wait costs end to end.

    .venv/bin/python benchmarks/capture_latency.py
Writes benchmarks/results/capture_latency.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, ServerProcess, prompts  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--concurrency", default="1,8,32", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=32, help="requests per level and mode")
    parser.add_argument("--n", type=int, default=8, help="N (auto's default and the fixed N)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--model", help="model folder (default: the embedded model)")
    parser.add_argument("--server-args", default="")
    args = parser.parse_args()
    args.server_args = f"--default-parallelism {args.n} {args.server_args}"

    from server.engine.model_store import prepare_embedded_model

    model_dir = Path(args.model) if args.model else prepare_embedded_model()
    RESULTS.mkdir(exist_ok=True)
    levels = [int(c) for c in args.concurrency.split(",")]
    questions = prompts(args.requests)
    server = ServerProcess(args, model_dir, "capture_latency")
    loop = asyncio.new_event_loop()
    rows = []
    try:
        loop.run_until_complete(server.wait_ready())
        loop.run_until_complete(server.run(questions[:2], "warm-up", "auto"))
        for level in levels:
            row: dict = {"concurrency": level}
            for mode in ("auto", "fixed"):
                latencies, captures = [], []
                for start in range(0, len(questions), level):
                    batch = questions[start : start + level]
                    out = loop.run_until_complete(
                        server.run(batch, f"C={level} {mode}", "auto" if mode == "auto" else args.n)
                    )
                    latencies += out["latencies_s"]
                    captures += [t["capture_ms"] for t in out["t2"] if t["capture_ms"] is not None]
                row[mode] = {
                    "latency_p50_s": statistics.median(latencies),
                    "latency_p90_s": pct(latencies, 0.9),
                    "requests": len(latencies),
                }
                if mode == "auto":
                    row["capture_ms_p50"] = statistics.median(captures)
                    row["capture_ms_p90"] = pct(captures, 0.9)
                    row["captured"] = len(captures)
            row["auto_minus_fixed_p50_s"] = row["auto"]["latency_p50_s"] - row["fixed"]["latency_p50_s"]
            rows.append(row)
    finally:
        server.stop()
        loop.close()

    (RESULTS / "capture_latency.json").write_text(
        json.dumps({"config": vars(args), "levels": rows}, indent=2)
    )
    print()
    print(
        f"{'C':>4} {'capture p50 ms':>15} {'p90 ms':>8} {'auto p50 s':>11} {'fixed p50 s':>12} {'auto-fixed s':>13}"
    )
    for r in rows:
        print(
            f"{r['concurrency']:>4} {r['capture_ms_p50']:>15.1f} {r['capture_ms_p90']:>8.1f} "
            f"{r['auto']['latency_p50_s']:>11.2f} {r['fixed']['latency_p50_s']:>12.2f} {r['auto_minus_fixed_p50_s']:>13.2f}"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.4))
    cs = [r["concurrency"] for r in rows]
    ax[0].plot(cs, [r["capture_ms_p50"] for r in rows], "o-", label="p50")
    ax[0].plot(cs, [r["capture_ms_p90"] for r in rows], "o--", label="p90")
    ax[0].set_xlabel("concurrent requests")
    ax[0].set_ylabel("capture latency (ms)")
    ax[0].set_xscale("log", base=2)
    ax[0].legend()
    ax[1].plot(cs, [r["auto"]["latency_p50_s"] for r in rows], "o-", label="auto (waits for capture)")
    ax[1].plot(cs, [r["fixed"]["latency_p50_s"] for r in rows], "s-", label=f"fixed N={args.n}")
    ax[1].set_xlabel("concurrent requests")
    ax[1].set_ylabel("request latency p50 (s)")
    ax[1].set_xscale("log", base=2)
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "capture_latency.png", dpi=120)
    print(f"wrote {RESULTS / 'capture_latency.json'} and .png")


if __name__ == "__main__":
    main()
