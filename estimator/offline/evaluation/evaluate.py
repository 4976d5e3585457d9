"""`t2serve evaluate`: compare parallelism policies on the held-out test split.

Every policy is scored on the same labeled pools with the exact expected accuracy A_x(N)
(no sampling noise): a policy that gives question x N_x samples scores mean_x A_x(N_x).
Policies: fixed N_max (standard parallel thinking), fixed N_D (system-optimal N, chosen on
the train split), the T2 estimator, the estimator with safety margins, the server's default
`auto` (T2 at the head's margin behind the head's gate, with the gate's margin multiple,
when the head has one), and the oracle N*_x.
Costs: mean N, C_mem = mean N / N_max, C_time = expected generated tokens / those of N_max.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from estimator.gate import Gate, route_shares
from estimator.head import T2Head
from estimator.offline.labels.targets import TYPES, overscaling_index, sample_type, system_optimal_n
from estimator.offline.training.margin_fit import t2_parallelism
from estimator.offline.training.probes import in_split

MARGINS = (1.25, 1.5, 2.0)


def score(n_per_question: np.ndarray, accuracy: np.ndarray, mean_tokens: np.ndarray) -> dict:
    n = np.asarray(n_per_question, dtype=int)
    n_max = accuracy.shape[1]
    rows = np.arange(len(n))
    return {
        "accuracy": float(accuracy[rows, n - 1].mean()),
        "mean_n": float(n.mean()),
        "c_mem": float(n.mean() / n_max),
        "c_time_tokens": float((n * mean_tokens).sum() / (n_max * mean_tokens).sum()),
    }


def gated(
    n: np.ndarray, routes: list[str], *, default_parallelism: int, open_ended_parallelism: int
) -> np.ndarray:
    """The server's N behind the gate: unfamiliar -> its safe default, open-ended -> its
    open-ended N (server.config.ParallelismSettings)."""
    out = n.copy()
    out[np.array([r == "unfamiliar" for r in routes])] = default_parallelism
    out[np.array([r == "open_ended" for r in routes])] = open_ended_parallelism
    return out


def evaluate(
    head: T2Head,
    train: list[dict],
    test: list[dict],
    test_states: np.ndarray,
    gate: Gate | None = None,
    *,
    default_parallelism: int,
    open_ended_parallelism: int,
) -> dict:
    """Every policy on the test pools; behind `gate`, the server's default policy falls back to
    `default_parallelism` (unfamiliar) and `open_ended_parallelism` (open-ended) as it does."""
    n_max = len(test[0]["accuracy"])
    if head.meta.n_max != n_max:
        raise ValueError(f"head was trained for N_max={head.meta.n_max}, labels have N_max={n_max}")
    acc = np.array([r["accuracy"] for r in test])
    tokens = np.array([np.mean(r["tokens"]) for r in test])
    n_star = np.array([r["n_star"] for r in test])
    n_d = system_optimal_n(np.array([r["accuracy"] for r in train]))
    predictions = head.predict_batch(test_states)
    per_layer = head.predict_layers(test_states).numpy()

    def chosen(margin: float, scale: np.ndarray | None = None) -> np.ndarray:
        return t2_parallelism(predictions, n_max, margin, scale)

    policies = {
        f"fixed N_max={n_max}": score(np.full(len(test), n_max), acc, tokens),
        f"fixed N_D={n_d}": score(np.full(len(test), n_d), acc, tokens),
        "t2 estimator": score(chosen(1.0), acc, tokens),
        **{f"t2 x{m:g} margin": score(chosen(m), acc, tokens) for m in MARGINS},
    }
    routes = [gate.route(s) for s in test_states] if gate is not None else None
    if routes is not None:
        # As the server runs it: the head's margin, times the gate's multiple where it trusts the head.
        n = chosen(head.margin, gate.margin_scale(test_states))
        fallbacks = {
            "default_parallelism": default_parallelism,
            "open_ended_parallelism": open_ended_parallelism,
        }
        policies[f"t2 x{head.margin:g} + gate"] = score(gated(n, routes, **fallbacks), acc, tokens)
    policies["oracle N*"] = score(n_star, acc, tokens)
    curve = [score(np.full(len(test), n), acc, tokens) for n in range(1, n_max + 1)]
    margin_curve = [
        {"margin": float(m), **score(chosen(float(m)), acc, tokens)} for m in np.linspace(0.5, 4.0, 15)
    ]
    # Types from the curves (not the stored label) so the current definition always applies.
    types = Counter(sample_type(np.array(r["accuracy"])) for r in test)
    return {
        "n_max": n_max,
        "questions": len(test),
        "n_d_train": n_d,
        "overscaling_index_test": overscaling_index(n_star, n_d),
        "policies": policies,
        "fixed_curve": curve,
        "margin_curve": margin_curve,
        "mae_n": {
            "combined": float(np.abs(predictions * n_max - n_star).mean()),
            "per_layer": [
                float(np.abs(per_layer[:, i] * n_max - n_star).mean()) for i in range(per_layer.shape[1])
            ],
        },
        "type_shares": {TYPES[t]: types.get(t, 0) / len(test) for t in TYPES},
        "gate": None if routes is None else route_shares(routes),
        "estimator_mean_n_over_oracle": policies["t2 estimator"]["mean_n"] / float(n_star.mean()),
        "head": head.identity,
    }


def evaluate_labels(
    records: list[dict],
    states: np.ndarray,
    header: dict,
    head: T2Head,
    gate: Gate | None = None,
    *,
    server: str | None = None,
    concurrency: int,
    default_parallelism: int,
    open_ended_parallelism: int,
) -> dict:
    """`t2serve evaluate` on labels read by load_label_sets: `evaluate` on their test split
    (N_D chosen on their train split) and, given a `server` URL, the test split replayed
    through it (replay_through_server, `concurrency` requests in flight)."""
    train, _ = in_split(records, states, "train")
    test, test_states = in_split(records, states, "test")
    if not test:
        raise ValueError("no test-split questions in the labels")
    result = evaluate(
        head,
        train,
        test,
        test_states,
        gate=gate,
        default_parallelism=default_parallelism,
        open_ended_parallelism=open_ended_parallelism,
    )
    if server:
        import asyncio

        config = header["config"]
        result["server"] = asyncio.run(
            replay_through_server(
                server,
                test,
                n_max=config["n_max"],
                temperature=config["temperature"],
                max_tokens=config["max_tokens"],
                concurrency=concurrency,
            )
        )
    return result


def report_table(result: dict) -> str:
    lines = [
        f"test questions {result['questions']}   N_max {result['n_max']}   N_D (train) {result['n_d_train']}   "
        f"M_D (test) {result['overscaling_index_test']:.2f}",
        f"{'policy':<22} {'accuracy':>9} {'mean N':>8} {'C_mem':>7} {'C_time':>7}",
    ]
    for name, s in result["policies"].items():
        lines.append(
            f"{name:<22} {s['accuracy']:9.3f} {s['mean_n']:8.2f} {s['c_mem']:7.2f} {s['c_time_tokens']:7.2f}"
        )
    mae = result["mae_n"]
    best_layer = int(np.argmin(mae["per_layer"]))
    lines.append(
        f"MAE in N: combined {mae['combined']:.2f}; best layer {best_layer} {mae['per_layer'][best_layer]:.2f}; "
        f"estimator mean N / oracle mean N* = {result['estimator_mean_n_over_oracle']:.2f}"
    )
    lines.append("types: " + "  ".join(f"{k} {v:.1%}" for k, v in result["type_shares"].items()))
    if result.get("gate"):
        lines.append("gate routes: " + "  ".join(f"{k} {v:.1%}" for k, v in result["gate"].items()))
    if "server" in result:
        s = result["server"]
        lines.append(f"through the server ({s['url']}, {s['concurrency']} in flight):")
        for mode in ("auto", "fixed N_max"):
            m = s[mode]
            lines.append(
                f"  {mode:<12} wall {m['wall_s']:7.1f} s  accuracy {m['accuracy']:.3f}  "
                f"mean samples {m['mean_samples']:.2f}  tokens {m['tokens']}"
            )
        lines.append(f"  C_time wall {s['c_time_wall']:.2f}   C_time tokens {s['c_time_tokens']:.2f}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    curve = result["fixed_curve"]
    ax[0].plot(
        [c["mean_n"] for c in curve],
        [c["accuracy"] for c in curve],
        "-",
        color="#999",
        label="fixed N = 1..N_max",
    )
    mc = result["margin_curve"]
    ax[0].plot(
        [c["mean_n"] for c in mc],
        [c["accuracy"] for c in mc],
        "-",
        color="#3b7dd8",
        alpha=0.6,
        label="t2, margin sweep",
    )
    markers = {"fixed N_max": "s", "fixed N_D": "D", "t2 estimator": "o", "t2 x": "^", "oracle": "*"}
    for name, s in result["policies"].items():
        marker = next(m for prefix, m in markers.items() if name.startswith(prefix))
        ax[0].plot(s["mean_n"], s["accuracy"], marker, markersize=9 if marker != "*" else 14, label=name)
    ax[0].set_xlabel("mean samples per question")
    ax[0].set_ylabel("expected majority-vote accuracy")
    ax[0].set_title(f"test split, {result['questions']} questions")
    ax[0].legend(fontsize=7)
    per_layer = result["mae_n"]["per_layer"]
    ax[1].bar(range(len(per_layer)), per_layer, color="#bbb", label="single layer")
    ax[1].axhline(result["mae_n"]["combined"], color="#3b7dd8", label="combined (inverse-variance)")
    ax[1].set_xlabel("decoder layer")
    ax[1].set_ylabel("MAE of N vs N* (samples)")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_report(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    plot(result, out.with_suffix(".png"))


async def replay_through_server(
    url: str, test: list[dict], *, n_max: int, temperature: float, max_tokens: int, concurrency: int
) -> dict:
    """Wall-clock C_time: send the test questions through a running t2serve, once with
    `parallelism: "auto"` and once with fixed N_max, same sampling as the labels; report
    wall time, samples, tokens and the measured (single-draw) vote accuracy of each."""
    import asyncio
    import time

    import httpx
    from tqdm import tqdm

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600)) as http:
        model = (await http.get("/v1/models")).json()["data"][0]["id"]
        out: dict = {"url": url, "model": model, "concurrency": concurrency}
        for mode, parallelism in (("auto", "auto"), ("fixed N_max", n_max)):
            gate = asyncio.Semaphore(concurrency)
            bar = tqdm(total=len(test), desc=f"server {mode}", unit="q")
            rows: list[dict] = []

            async def one(record: dict, parallelism=parallelism, bar=bar, gate=gate, rows=rows) -> None:
                async with gate:
                    reply = await http.post(
                        "/v1/chat/completions",
                        json={
                            "model": model,
                            "messages": [{"role": "user", "content": record["question"]}],
                            "temperature": temperature,
                            "max_tokens": max_tokens,
                            "parallelism": parallelism,
                            "max_parallelism": n_max,
                        },
                    )
                    reply.raise_for_status()
                    body = reply.json()
                    rows.append(
                        {
                            "correct": body["t2"]["answer"] == record["answer"],
                            "samples": body["t2"]["samples"],
                            "tokens": body["usage"]["completion_tokens"],
                        }
                    )
                    bar.update()

            started = time.monotonic()
            await asyncio.gather(*(one(r) for r in test))
            bar.close()
            out[mode] = {
                "wall_s": time.monotonic() - started,
                "accuracy": float(np.mean([r["correct"] for r in rows])),
                "mean_samples": float(np.mean([r["samples"] for r in rows])),
                "tokens": int(sum(r["tokens"] for r in rows)),
            }
        out["c_time_wall"] = out["auto"]["wall_s"] / out["fixed N_max"]["wall_s"]
        out["c_time_tokens"] = out["auto"]["tokens"] / out["fixed N_max"]["tokens"]
    return out
