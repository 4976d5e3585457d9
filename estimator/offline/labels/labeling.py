"""`t2serve label`: sample N_max answers per question through the server's own engine path,
and store per question the answers, A_x(N), N*_x, its type and the `[L, d]` hidden states
captured during the prompt's prefill.

Output folder layout (resumable: a killed run continues with the first missing shard):
    labels.json            run config + model identity; a run with another config refuses
    shard-00000.npz/.json  the label store's shards (estimator.label_store, which the
                           server's traffic records share): states, and per-question records
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from estimator.label_store import discard_shard, load_labels, load_records, shard_complete, write_shard
from estimator.offline.engine_runs import EngineRuns, consensus, extract_answer, model_identity
from estimator.offline.inputs.grading import Grader
from estimator.offline.inputs.problems import DEFAULT_TEMPLATE, Problem
from estimator.offline.labels.targets import (
    TYPES,
    expected_accuracy,
    expected_accuracy_mc,
    sample_optimal_n,
    sample_type,
)

LABELS_FILE = "labels.json"


@dataclass(frozen=True)
class LabelConfig:
    n_max: int = 16
    temperature: float = 0.3
    max_tokens: int = 48
    tau: int = 0  # 0: exact A_x(N); > 0: Monte Carlo with tau orderings
    eps: float = 0.0
    shard_size: int = 32
    seed: int = 0
    # How the questions were put to the model (estimator.offline.inputs.problems): recorded so the
    # head knows the prompt format its labels saw.
    prompt_template: str = DEFAULT_TEMPLATE
    # What the samples vote with (server.aggregation): "answer" (what the shipped head is
    # trained on), "consensus" or "auto" to label and compare policies on other keys.
    aggregate: str = "answer"


def correct_keys(
    answers: list[str | None],
    texts: list[str],
    gold: str,
    grader: Grader | None = None,
    aliases: tuple[str, ...] = (),
) -> list[str]:
    """The distinct vote keys that are right. An answer key is right when it is the gold
    answer, one of its aliases (a right option's value) or (with a grader) equivalent to
    the gold answer; a similarity group's key (consensus, auto) when the answer its medoid
    states - the sample the server would return - is."""
    right = []
    for key in dict.fromkeys(a for a in answers if a is not None):
        stated: str | None = key
        if consensus.is_group_key(key):
            members = [t for a, t in zip(answers, texts, strict=True) if a == key]
            stated = extract_answer(members[consensus.medoid(members)])
        if stated is None:
            continue
        if stated == gold or stated in aliases or (grader is not None and grader.equivalent(stated, gold)):
            right.append(key)
    return right


def label_record(
    problem: Problem,
    answers: list[str | None],
    tokens: list[int],
    config: LabelConfig,
    grader: Grader | None = None,
    texts: list[str] | None = None,
) -> dict:
    """One question's label: the samples' vote keys, the keys that are right (`gold_keys`,
    correct_keys) and the A_x(N) curve they give."""
    gold = correct_keys(answers, texts or [""] * len(answers), problem.answer, grader, tuple(problem.aliases))
    if config.tau > 0:
        accuracy = expected_accuracy_mc(answers, gold, tau=config.tau, seed=config.seed)
    else:
        accuracy = expected_accuracy(answers, gold)
    return {
        **problem.to_json(),
        "answers": answers,
        "gold_keys": gold,
        "tokens": tokens,
        "accuracy": [round(float(a), 6) for a in accuracy],
        "n_star": sample_optimal_n(accuracy, config.eps),
        "type": sample_type(accuracy),
    }


async def label_shard(
    runs: EngineRuns, problems: list[Problem], config: LabelConfig, grader: Grader | None = None
) -> tuple[list[dict], np.ndarray]:
    """Sample every problem of a shard concurrently; returns records and states [Q, L, d].
    Grading runs after the shard's samples are in (it may wait on math-verify's worker)."""
    runs_out = await asyncio.gather(
        *(
            runs.sample(
                problem.question,
                temperature=config.temperature,
                max_tokens=config.max_tokens,
                seed=config.seed * 1_000_003 + k,
            )
            for k, problem in enumerate(problems)
        )
    )
    records = [
        label_record(
            problem,
            [s.answer for s in run.samples],
            [s.num_tokens for s in run.samples],
            config,
            grader,
            texts=[s.text for s in run.samples],
        )
        for problem, run in zip(problems, runs_out, strict=True)
    ]
    return records, np.stack([run.states for run in runs_out])


def prepare_output(out: Path, config: LabelConfig, model: dict, problems: list[Problem]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    ids_digest = hashlib.sha256("\n".join(p.id for p in problems).encode()).hexdigest()
    header = {
        "config": asdict(config),
        "model": model,
        "problems": len(problems),
        "problems_sha256": ids_digest,
    }
    path = out / LABELS_FILE
    if path.is_file():
        existing = json.loads(path.read_text())
        if existing != header:
            raise SystemExit(
                f"{out} holds labels from another run (config, model or problem list differ); "
                "use a new --out folder"
            )
    else:
        path.write_text(json.dumps(header, indent=2))


async def run_labeling(engine, problems: list[Problem], out: Path, config: LabelConfig) -> list[dict]:
    from tqdm import tqdm

    prepare_output(out, config, model_identity(engine), problems)
    runs = EngineRuns(engine, n=config.n_max, aggregate=config.aggregate)
    shards = [problems[i : i + config.shard_size] for i in range(0, len(problems), config.shard_size)]
    todo = [i for i in range(len(shards)) if not shard_complete(out, i)]
    bar = tqdm(
        total=len(problems),
        desc="label",
        unit="q",
        initial=sum(len(shards[i]) for i in range(len(shards)) if i not in todo),
    )
    started = time.monotonic()
    with Grader() as grader:
        for index in todo:
            records, states = await label_shard(runs, shards[index], config, grader)
            discard_shard(out, index)  # what a killed run left of it
            write_shard(out, index, records, states)
            bar.update(len(records))
    bar.close()
    records = load_records(out)
    print(summary_table(records, time.monotonic() - started))
    return records


def summary_table(records: list[dict], seconds: float | None = None) -> str:
    from collections import Counter

    n_max = len(records[0]["accuracy"])
    acc = np.array([r["accuracy"] for r in records])
    types = Counter(sample_type(np.array(r["accuracy"])) for r in records)
    lines = [
        f"questions {len(records)}   N_max {n_max}"
        + (f"   time {seconds:.0f} s" if seconds is not None else ""),
        f"mean accuracy  N=1: {acc[:, 0].mean():.3f}   N=N_max: {acc[:, -1].mean():.3f}",
        f"mean N*: {np.mean([r['n_star'] for r in records]):.2f}",
        "type            share",
    ]
    for t, name in TYPES.items():
        lines.append(f"  {t} {name:<13} {types.get(t, 0) / len(records):6.1%}")
    for field in ("source", "family"):
        groups = sorted({r.get(field, "builtin") for r in records})
        if field == "source" and len(groups) < 2:
            continue
        lines.append(f"{field:<15} questions  acc@1  acc@N_max  unsolved  solved")
        for group in groups:
            mask = [r.get(field, "builtin") == group for r in records]
            rows = acc[mask]
            kinds = Counter(sample_type(a) for a in rows)
            lines.append(
                f"  {group[:14]:<14} {len(rows):9d}  {rows[:, 0].mean():.3f}  {rows[:, -1].mean():9.3f}"
                f"  {kinds.get(2, 0) / len(rows):8.0%}  {kinds.get(1, 0) / len(rows):6.0%}"
            )
    return "\n".join(lines)


def load_label_sets(folders: list[Path]) -> tuple[list[dict], np.ndarray, dict]:
    """Records and states of one or more label folders that share model and sampling config.

    Questions that appear in several folders are kept once (the first); since splits are a
    hash of the question text, a repeated question always falls in the same split."""
    headers = [json.loads((Path(f) / LABELS_FILE).read_text()) for f in folders]
    for header in headers:  # labels written before these were recorded used the defaults
        header["config"].setdefault("prompt_template", DEFAULT_TEMPLATE)
        header["config"].setdefault("aggregate", "answer")
    first = headers[0]
    # Runs may differ in shard size and in seed (a second seed is how a pool grows); the
    # sampling itself (N_max, temperature, max tokens, A_x(N) method) must be the same.
    free = {"shard_size", "seed"}
    for folder, header in zip(folders, headers, strict=True):
        same_config = {k: v for k, v in header["config"].items() if k not in free} == {
            k: v for k, v in first["config"].items() if k not in free
        }
        if header["model"] != first["model"] or not same_config:
            raise ValueError(f"{folder}: labels from another model or sampling config than {folders[0]}")
    records: list[dict] = []
    states: list[np.ndarray] = []
    seen: set[str] = set()
    for folder in folders:
        recs, st = load_labels(Path(folder))
        keep = [i for i, r in enumerate(recs) if r["question"] not in seen]
        seen.update(recs[i]["question"] for i in keep)
        records += [recs[i] for i in keep]
        states.append(st[keep])
    return (
        records,
        np.concatenate(states),
        {**first, "folders": [str(f) for f in folders], "problems": len(records)},
    )
