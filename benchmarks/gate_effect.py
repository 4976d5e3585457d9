"""What `aggregate: auto` and the gate cost on answerable questions: the default server
against the one before them, on the same seeded requests.

Two servers on the embedded model with the shipped head, one after the other:
  before    --aggregate answer (the lenient rule) and the head without its gate
  default   the defaults: --aggregate auto, the head with its gate
Each gets the same held-out math questions (the test split of the label folders given, or
by default the test split of the generator runs the shipped head was labelled from: 600
questions at seed 0 and 1200 at seed 1, as in the README; the head never trained on them) `--draws` times with `parallelism: "auto"` at the head's own
sampling setup (T = 0.3, <= 48 tokens), draw d of question q seeded q * 1000 + d on both
servers. Reported per server: accuracy (t2.answer against the gold answer), mean samples,
and how often the gate routed a question each way; the difference default - before is the
issue's target (<= 0.5 points of accuracy, <= 5 % of samples). Writes
benchmarks/results/gate_effect.{json,png}.

    .venv/bin/python benchmarks/gate_effect.py [--labels labels/smollm2 --labels labels/smollm2-s1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, ServerProcess  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--labels",
        type=Path,
        action="append",
        help="label folder(s), test split used (default: the generator's test split, no labels needed)",
    )
    p.add_argument("--draws", type=int, default=2, help="seeded requests per question and server")
    p.add_argument("--questions", type=int, default=0, help="at most this many test questions (0: all)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--out", type=Path, default=RESULTS / "gate_effect")
    args = p.parse_args(argv)
    args.n, args.max_tokens, args.server_args = 16, 48, ""
    return args


def head_without_gate(folder: Path) -> Path:
    """A copy of the shipped head without its gate file (what the server ran before it)."""
    from estimator.head import DEFAULT_HEAD

    head = Path(DEFAULT_HEAD)
    for suffix in (".json", ".safetensors", ".stopping.safetensors"):
        source = head.with_name(head.name + suffix)
        if source.is_file():
            shutil.copy(source, folder / source.name)
    return folder / head.name


def test_questions(labels: list[Path] | None) -> list[dict]:
    """{"question", "answer"} of each held-out test question, in a fixed order."""
    if labels:
        from estimator.offline.labels.labeling import load_label_sets

        records, _, _ = load_label_sets(labels)
        return [r for r in records if r["split"] == "test"]
    from estimator.offline.inputs.problems import generate

    seen: set[str] = set()
    questions = []
    for count, seed in ((600, 0), (1200, 1)):  # the README's label runs for the shipped head
        for problem in generate(count, seed=seed):
            if problem.split == "test" and problem.question not in seen:
                seen.add(problem.question)
                questions.append({"question": problem.question, "answer": problem.answer})
    return questions


async def replay(server: ServerProcess, questions: list[dict], draws: int, concurrency: int) -> list[dict]:
    import httpx
    from tqdm import tqdm

    gate = asyncio.Semaphore(concurrency)
    rows: list[dict] = []
    bar = tqdm(total=len(questions) * draws, desc=server.name, unit="req")
    async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(1800)) as http:

        async def one(q: int, d: int) -> None:
            record = questions[q]
            async with gate:
                reply = await http.post(
                    "/v1/chat/completions",
                    json={
                        "model": "bench",
                        "messages": [{"role": "user", "content": record["question"]}],
                        "temperature": 0.3,
                        "max_tokens": 48,
                        "seed": q * 1000 + d,
                        "parallelism": "auto",
                        "max_parallelism": 16,
                    },
                )
            reply.raise_for_status()
            t2 = reply.json()["t2"]
            rows.append(
                {
                    "question": q,
                    "draw": d,
                    "correct": t2["answer"] == record["answer"],
                    "samples": t2["samples"],
                    "gate": t2.get("gate"),
                    "aggregate": t2.get("aggregate"),
                }
            )
            bar.update()

        await asyncio.gather(*(one(q, d) for q in range(len(questions)) for d in range(draws)))
    bar.close()
    return sorted(rows, key=lambda r: (r["question"], r["draw"]))


def summary(rows: list[dict]) -> dict:
    import numpy as np

    return {
        "requests": len(rows),
        "accuracy": float(np.mean([r["correct"] for r in rows])),
        "mean_samples": float(np.mean([r["samples"] for r in rows])),
        "gate": dict(Counter(str(r["gate"]) for r in rows)),
        "aggregate": dict(Counter(str(r["aggregate"]) for r in rows)),
    }


async def main_async(args: argparse.Namespace) -> dict:
    from server.engine.model_store import prepare_embedded_model

    questions = test_questions(args.labels)
    if args.questions:
        questions = questions[: args.questions]
    model_dir = prepare_embedded_model()
    results: dict = {
        "questions": len(questions),
        "draws": args.draws,
        "labels": [str(f) for f in args.labels or []] or "builtin generator (600 @ seed 0, 1200 @ seed 1)",
    }
    with tempfile.TemporaryDirectory() as tmp:
        configs = {
            "before": ["--aggregate", "answer", "--estimator-head", str(head_without_gate(Path(tmp)))],
            "default": [],
        }
        for name, extra in configs.items():
            args.server_args = " ".join(["--enforce-eager", *extra])
            server = ServerProcess(args, model_dir, f"gate_effect_{name}", name=name)
            try:
                await server.wait_ready()
                rows = await replay(server, questions, args.draws, args.concurrency)
            finally:
                server.stop()
            results[name] = {**summary(rows), "rows": rows}
    before, default = results["before"], results["default"]
    results["difference"] = {
        "accuracy_points": 100 * (default["accuracy"] - before["accuracy"]),
        "samples_relative": default["mean_samples"] / before["mean_samples"] - 1,
        "same_answer_share": sum(
            a["correct"] == b["correct"] for a, b in zip(before["rows"], default["rows"], strict=True)
        )
        / len(before["rows"]),
    }
    return results


def report(results: dict) -> str:
    lines = [
        f"{results['questions']} test questions x {results['draws']} seeded draws, parallelism auto, T = 0.3",
        f"{'server':<9} {'accuracy':>9} {'samples':>8}  gate routes",
    ]
    for name in ("before", "default"):
        r = results[name]
        lines.append(f"{name:<9} {r['accuracy']:9.3f} {r['mean_samples']:8.2f}  {r['gate']}")
    d = results["difference"]
    lines.append(
        f"default - before: {d['accuracy_points']:+.1f} points, {100 * d['samples_relative']:+.1f} % samples "
        f"(target: within 0.5 points and 5 %); same verdict on {d['same_answer_share']:.0%} of requests"
    )
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(8, 3.4))
    names = ["before", "default"]
    colors = ["#999", "#3b7dd8"]
    ax[0].bar(names, [results[n]["accuracy"] for n in names], color=colors)
    ax[0].set_title("accuracy (held-out math)")
    ax[1].bar(names, [results[n]["mean_samples"] for n in names], color=colors)
    ax[1].set_title("mean samples per request")
    fig.suptitle("aggregate auto + gate vs aggregate answer, no gate (same seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = asyncio.run(main_async(args))
    print(report(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
    plot(results, args.out.with_suffix(".png"))
    print(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
