"""T2 head latency on CPU: one request's `[L, d]` states -> N*/N_max, as the server calls it.

    .venv/bin/python benchmarks/head_latency.py [--head estimator/heads/smollm2-135m-instruct]
Writes benchmarks/results/head_latency.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS  # noqa: E402
from estimator.head import DEFAULT_HEAD, T2Head  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--head", type=Path, default=DEFAULT_HEAD)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()

    import torch

    head = T2Head.load(args.head)
    rng = np.random.default_rng(0)
    states = rng.normal(size=(64, head.meta.num_layers, head.meta.hidden_size)).astype(np.float32)
    for i in range(50):  # warm-up
        head.predict(states[i % 64])

    direct = []
    for i in range(args.calls):
        t0 = time.perf_counter()
        head.predict(states[i % 64])
        direct.append((time.perf_counter() - t0) * 1e3)

    async def threaded() -> list[float]:
        out = []
        for i in range(args.calls // 4):
            t0 = time.perf_counter()
            await asyncio.to_thread(head.predict, states[i % 64])
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    via_thread = asyncio.run(threaded())

    def stats(xs: list[float]) -> dict:
        s = sorted(xs)
        return {
            "p50_ms": statistics.median(s),
            "p99_ms": s[int(0.99 * len(s))],
            "mean_ms": statistics.fmean(s),
        }

    result = {
        "head": head.identity,
        "torch_threads": torch.get_num_threads(),
        "predict": stats(direct),
        "predict_via_to_thread": stats(via_thread),
        "target": "well under 1 ms",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "head_latency.json").write_text(json.dumps(result, indent=2))
    print(f"{'':22} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name in ("predict", "predict_via_to_thread"):
        r = result[name]
        print(f"{name:22} {r['p50_ms']:8.3f} {r['p99_ms']:8.3f} {r['mean_ms']:8.3f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist(direct, bins=60, alpha=0.7, label="predict()")
    ax.hist(via_thread, bins=60, alpha=0.7, label="await asyncio.to_thread(predict)")
    ax.set_xlabel("ms per request")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "head_latency.png", dpi=120)
    print(f"wrote {RESULTS / 'head_latency.json'} and .png")


if __name__ == "__main__":
    main()
