"""Does the shipped T2 head still hold when the engine runs in another dtype?

`--dtype auto` runs float32 on CPUs without native bf16 kernels, but the shipped head was
trained on states captured in bfloat16. This script captures the same prompts' states in
both dtypes (the server's own path: `ParallelThinker` with sample 0 carrying the capture),
predicts with the shipped head, and reports the drift: per-layer cosine of the states, MAE
of the prediction p = N*/N_max, and how often T2's N (default margin) changes.

Each dtype runs in its own subprocess (one engine per process). Prints a table and writes
benchmarks/results/dtype_drift.{json,png}.

    .venv/bin/python benchmarks/dtype_drift.py --count 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS  # noqa: E402

DTYPES = ("bfloat16", "float32")


def test_questions(count: int, seed: int) -> list[str]:
    from estimator.offline.inputs.problems import generate

    # The built-in generator's test split (the head never saw these questions).
    problems = [p for p in generate(count * 8, seed=seed) if p.split == "test"]
    return [p.question for p in problems[:count]]


async def capture(dtype: str, questions: list[str], out: Path) -> None:
    from tqdm import tqdm

    from estimator.offline.engine_runs import EngineRuns, started_engine
    from server.config import EngineSettings
    from server.engine.model_store import prepare_embedded_model

    model = prepare_embedded_model()
    settings = EngineSettings(model=str(model), served_model_name=model.name, dtype=dtype, max_model_len=1024)
    async with started_engine(settings) as engine:
        runs = EngineRuns(engine)
        bar = tqdm(total=len(questions), desc=f"capture {dtype}", unit="q")

        async def one(question: str) -> np.ndarray:
            states = await runs.states(question)
            bar.update()
            return states

        states = await asyncio.gather(*(one(q) for q in questions))
        bar.close()
        np.save(out, np.stack(states))
        print(json.dumps({"engine_dtype": engine.info.dtype}))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=300, help="test-split questions")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--capture", choices=DTYPES, help=argparse.SUPPRESS)  # the subprocess's role
    parser.add_argument("--states-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    questions = test_questions(args.count, args.seed)
    if args.capture:
        asyncio.run(capture(args.capture, questions, args.states_out))
        return

    from estimator.head import DEFAULT_HEAD, T2Head
    from estimator.policies import choose_parallelism
    from server.engine.platform import cpu_has_native_bf16

    head = T2Head.load(DEFAULT_HEAD)
    margin = head.margin  # what the server runs it at
    states: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in DTYPES:
            path = Path(tmp) / f"{dtype}.npy"
            started = time.monotonic()
            cmd = [sys.executable, __file__, "--count", str(args.count), "--seed", str(args.seed)]
            subprocess.run([*cmd, "--capture", dtype, "--states-out", str(path)], check=True)
            seconds[dtype] = time.monotonic() - started
            states[dtype] = np.load(path)
    bf16, fp32 = states["bfloat16"], states["float32"]  # [Q, L, d]
    cosine = (bf16 * fp32).sum(-1) / (np.linalg.norm(bf16, axis=-1) * np.linalg.norm(fp32, axis=-1))
    pred = {d: head.predict_batch(s) for d, s in states.items()}
    n = {
        d: np.array(
            [
                choose_parallelism(float(p), n_max=head.meta.n_max, default=8, cap=64, margin=margin)
                for p in ps
            ]
        )
        for d, ps in pred.items()
    }
    report = {
        "questions": len(questions),
        "cpu": platform.processor() or platform.machine(),
        "native_bf16": cpu_has_native_bf16(),
        "head": head.identity,
        "seconds_per_dtype": seconds,
        "cosine_per_layer_mean": cosine.mean(0).round(6).tolist(),
        "cosine_min": float(cosine.min()),
        "prediction_mean": {d: float(p.mean()) for d, p in pred.items()},
        "prediction_mae": float(np.abs(pred["bfloat16"] - pred["float32"]).mean()),
        "prediction_max_abs_diff": float(np.abs(pred["bfloat16"] - pred["float32"]).max()),
        "n_mean": {d: float(v.mean()) for d, v in n.items()},
        "n_mae": float(np.abs(n["bfloat16"] - n["float32"]).mean()),
        "n_changed_share": float((n["bfloat16"] != n["float32"]).mean()),
    }
    print(f"\n{'':<26}{'bfloat16':>10}{'float32':>10}")
    print(
        f"{'mean prediction p':<26}{report['prediction_mean']['bfloat16']:>10.4f}{report['prediction_mean']['float32']:>10.4f}"
    )
    print(
        f"{'mean T2 N (margin ' + format(margin, 'g') + ')':<26}{report['n_mean']['bfloat16']:>10.2f}{report['n_mean']['float32']:>10.2f}"
    )
    print(
        f"states cosine: min {report['cosine_min']:.5f}; prediction MAE {report['prediction_mae']:.4f} "
        f"(max {report['prediction_max_abs_diff']:.4f}); N MAE {report['n_mae']:.3f}, "
        f"N changed for {100 * report['n_changed_share']:.1f}% of {len(questions)} questions"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "dtype_drift.json").write_text(json.dumps(report, indent=2))
    plot(pred, cosine, report)


def plot(pred: dict[str, np.ndarray], cosine: np.ndarray, report: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    left.scatter(pred["bfloat16"], pred["float32"], s=8, alpha=0.6)
    lim = [0, max(pred["bfloat16"].max(), pred["float32"].max()) * 1.05]
    left.plot(lim, lim, color="grey", lw=1)
    left.set(xlabel="prediction from bf16 states", ylabel="prediction from fp32 states",
             title=f"T2 head, MAE {report['prediction_mae']:.4f}")  # fmt: skip
    right.plot(range(1, cosine.shape[1] + 1), cosine.mean(0), marker="o", label="mean")
    right.plot(range(1, cosine.shape[1] + 1), cosine.min(0), marker=".", label="min")
    right.set(xlabel="layer", ylabel="cosine(bf16, fp32)", title="captured states, per layer")
    right.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "dtype_drift.png", dpi=120)


if __name__ == "__main__":
    main()
