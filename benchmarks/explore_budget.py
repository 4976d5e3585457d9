"""What exploration costs through a real server, with and without `--explore-budget`
(issue 29's "exploration at p = 0.05 costs <= 5 % extra samples").

An explored request runs N_max samples where `auto` would have run a few, so a share p of
explored requests costs p x (N_max - auto's samples) / auto's samples: at N_max 16 and about
2 samples for `auto`, 7p. `--explore-budget B` bounds the extra samples by B x the samples
launched, whatever the share. Each setup starts its own `t2serve serve` (embedded model,
shipped head, `--cpu-kvcache-space 1`, `--record-dir` a temporary folder) and gets the same
`auto` requests (benchmarks/loadtest.py's problems and client, T = 0.3, 48 tokens, not
streamed). The cost is measured from the replies: the samples explored requests launched
beyond the mean of the unexplored ones', over all the unexplored-equivalent samples; beside
it, the server's own account (`t2serve_explore_extra_samples_total`, charged at the live
gauge's `auto` row).

    .venv/bin/python benchmarks/explore_budget.py --requests 300 --concurrency 4
Writes benchmarks/results/explore_budget.{json,png} (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, ServerProcess, metric_value  # noqa: E402
from benchmarks.loadtest import Load, load_problems, run_load  # noqa: E402
from server.engine.model_store import prepare_embedded_model  # noqa: E402

SETUPS = {
    "share 0.05": "--explore-share 0.05",
    "share 0.05 + budget 0.05": "--explore-share 0.05 --explore-budget 0.05",
    "share 1 + budget 0.05": "--explore-share 1 --explore-budget 0.05",
}
ADMIN_KEY = "bench-admin"


async def one_setup(name: str, flags: str, args: argparse.Namespace, store: Path) -> dict:
    import httpx

    server_args = f"--cpu-kvcache-space 1 --record-dir {store} --admin-key {ADMIN_KEY} {flags}"
    server = ServerProcess(
        SimpleNamespace(n=16, server_args=server_args), prepare_embedded_model(), "explore_budget"
    )
    try:
        await server.wait_ready()
        problems = load_problems(args.prompts, args.seed, "builtin")
        async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(600)) as http:
            records, wall = await run_load(
                http,
                "bench",
                problems,
                {"parallelism": "auto"},
                Load("concurrency", float(args.concurrency)),
                requests=args.requests,
                duration_s=args.duration,
                temperature=0.3,
                max_tokens=48,
                stream=False,
                desc=name,
            )
            text = (await http.get("/metrics")).text
    finally:
        server.stop()
    ok = [r for r in records if r.status == "200"]
    explored = [r for r in ok if r.explored]
    plain = [r for r in ok if not r.explored]
    auto_mean = sum(r.samples for r in plain) / max(1, len(plain))
    extra = sum(r.samples - auto_mean for r in explored)
    would = auto_mean * len(ok)
    return {
        "setup": name,
        "flags": flags,
        "requests": len(records),
        "failed": len(records) - len(ok),
        "explored": len(explored),
        "auto_mean_samples": auto_mean,
        "samples_launched": sum(r.samples for r in ok),
        "extra_samples": extra,
        "cost": extra / would if would else None,
        # what --explore-budget bounds: extra samples per sample launched
        "extra_per_launched": extra / max(1, sum(r.samples for r in ok)),
        "server": {
            "extra_samples_charged": metric_value(text, "t2serve_explore_extra_samples_total"),
            "budget_credit": metric_value(text, "t2serve_explore_budget_credit"),
            "budget_skipped": metric_value(text, "t2serve_explored_requests_total", reason="budget_skipped"),
        },
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=120, help="distinct built-in test-split problems")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--duration", type=float, default=1800)
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated names of SETUPS")
    parser.add_argument("--out", type=Path, default=RESULTS / "explore_budget")
    args = parser.parse_args()
    rows = []
    for name in args.setups.split(","):
        with tempfile.TemporaryDirectory() as store:
            rows.append(asyncio.run(one_setup(name, SETUPS[name], args, Path(store))))
        row = rows[-1]
        print(
            f"{name:<26} explored {row['explored']:3d}/{row['requests']}  auto {row['auto_mean_samples']:.2f} "
            f"samples  extra {row['extra_samples']:.0f}  cost {100 * (row['cost'] or 0):.1f} %  "
            f"(server charged {row['server']['extra_samples_charged']:.0f}, budget-skipped "
            f"{row['server']['budget_skipped']:.0f})",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(
        json.dumps({"setups": rows, "args": vars(args)}, default=str, indent=1)
    )
    plot(rows, args.out.with_suffix(".png"))
    print(f"wrote {args.out}.json and {args.out}.png")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    names = [r["setup"] for r in rows]
    per_launched = [100 * r["extra_samples"] / max(1, r["samples_launched"]) for r in rows]
    ax.barh(
        names, per_launched, color="#4c72b0", label="extra samples per sample launched (the budget's unit)"
    )
    ax.plot([100 * (r["cost"] or 0) for r in rows], names, "kD", label="extra samples over auto's own")
    ax.axvline(5, color="#c44e52", linestyle=":", label="5 % (the target; the budget's B)")
    ax.invert_yaxis()
    ax.set(xlabel="%", title="What exploration costs, measured through the server")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
