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
  usc           Universal Self-Consistency: the model sees the N candidates and names the
                most consistent one (one extra greedy pass; its prompt/completion tokens
                are reported)

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

from benchmarks.common import RESULTS  # noqa: E402

CACHE = Path.home() / ".cache" / "t2serve" / "consensus_samples.json"
THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)


def questions(labels: Path, count: int) -> list[dict]:
    from estimator.offline.labeling import load_records

    held_out = [r for r in load_records(labels) if r["split"] in ("validation", "test")]
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
    params = SamplingParams(n=args.n, temperature=args.temperature, max_tokens=args.max_tokens, seed=0)
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
        from vllm import LLM

        from server.config import EngineSettings
        from server.engine import CPU_BLOCK_SIZE, apply_cpu_environment, on_cpu, resolve_dtype
        from server.model_store import prepare_embedded_model

        model_dir = prepare_embedded_model()
        cpu = on_cpu()
        if cpu:
            apply_cpu_environment(EngineSettings(model=str(model_dir), served_model_name="bench"))
        llm = LLM(
            model=str(model_dir),
            max_model_len=4096,
            enforce_eager=True,
            dtype=resolve_dtype("auto", cpu),
            enable_prefix_caching=True,
            block_size=CPU_BLOCK_SIZE if cpu else None,
            seed=0,
        )
        _ENGINE = (llm, AutoTokenizer.from_pretrained(str(model_dir)))
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


USC_PROMPT = (
    "I have generated the following responses to the question: {question}\n\n{responses}\n\n"
    "Evaluate these responses. Select the most consistent response based on majority consensus. "
    'Start your answer with "The most consistent response is Response X" (without quotes).'
)


def usc_picks(args, pool: list[dict], texts: list[list[str]]) -> tuple[list[int], dict]:
    import re

    from vllm import SamplingParams

    llm, tokenizer = engine(args)
    prompts = []
    for q, ts in zip(pool, texts, strict=True):
        responses = "\n\n".join(f"Response {k}: {t.strip()[:400]}" for k, t in enumerate(ts))
        prompts.append(chat(tokenizer, USC_PROMPT.format(question=q["question"], responses=responses)))
    prefix = "The most consistent response is Response "
    prompts = [p + prefix for p in prompts]  # the model completes the number
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=True)
    picks = []
    for o, ts in zip(outputs, texts, strict=True):
        m = re.match(r"\s*(\d+)", o.outputs[0].text)
        picks.append(int(m.group(1)) if m and int(m.group(1)) < len(ts) else 0)
    tokens = {
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
        "completion_tokens": sum(len(o.outputs[0].token_ids) for o in outputs),
    }
    return picks, tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--labels", default="labels/smollm2", help="label folder (questions + gold answers)")
    parser.add_argument("--questions", type=int, default=120)
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

    rows: dict[str, float] = {}
    rows["single"] = sum(correct(q, i) for q in range(len(pool)) for i in range(args.n)) / (
        len(pool) * args.n
    )
    majority = [majority_vote([extract_answer(t) for t in ts]).winner_index for ts in texts]
    rows["majority"] = sum(correct(q, i) for q, i in enumerate(majority)) / len(pool)
    rows["medoid"] = sum(correct(q, medoid_of(ts, chrf)) for q, ts in enumerate(texts)) / len(pool)
    pick_seconds: dict[str, float] = {}
    for name, similarity in (("chrF", chrf), ("rougeL", rouge_l)):
        for t in THRESHOLDS:
            started = time.monotonic()
            picks = [consensus_pick(ts, similarity, t) for ts in texts]
            pick_seconds[f"{name}@{t}"] = (time.monotonic() - started) / len(pool)
            rows[f"{name}@{t}"] = sum(correct(q, i) for q, i in enumerate(picks)) / len(pool)
    usc_tokens = None
    if not args.no_usc:
        picks, usc_tokens = usc_picks(args, pool, texts)
        rows["usc"] = sum(correct(q, i) for q, i in enumerate(picks)) / len(pool)

    gain = rows["majority"] - rows["single"]
    recovery = {k: (v - rows["single"]) / gain if gain > 0 else None for k, v in rows.items()}
    result = {
        "benchmark": "consensus_quality",
        "config": vars(args),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "questions": len(pool),
        "generation_seconds": seconds,
        "accuracy": rows,
        "recovery": recovery,
        "pick_ms_per_question": {k: v * 1000 for k, v in pick_seconds.items()},
        "usc_tokens": usc_tokens,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "consensus_quality.json").write_text(json.dumps(result, indent=2))
    print(
        f"\n{len(pool)} held-out questions x N={args.n} (T={args.temperature}, <= {args.max_tokens} tokens)"
    )
    print(f"{'aggregator':12} {'accuracy':>9} {'recovery':>9} {'pick ms':>8}")
    for k, v in rows.items():
        r = recovery[k]
        ms = pick_seconds.get(k)
        print(
            f"{k:12} {v:9.3f} {'' if r is None else f'{r * 100:8.0f}%':>9} {'' if ms is None else f'{ms * 1000:8.2f}':>8}"
        )
    if usc_tokens:
        print(
            f"usc extra tokens: {usc_tokens['prompt_tokens'] / len(pool):.0f} prompt + "
            f"{usc_tokens['completion_tokens'] / len(pool):.1f} completion per question"
        )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.4))
    names = list(rows)
    colors = [
        "#999999" if n in ("single", "majority") else "#3b7dd8" if n.startswith("chrF") else "#e07b39"
        for n in names
    ]
    ax.bar(names, [rows[n] for n in names], color=colors)
    ax.axhline(rows["single"] + 0.7 * gain, color="k", lw=0.8, ls="--", label="70% of majority's gain")
    ax.set_ylabel("accuracy")
    ax.tick_params(axis="x", rotation=60, labelsize=7)
    ax.legend(fontsize=8)
    ax.set_title(f"Consensus without answer extraction: {len(pool)} questions x N={args.n}", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "consensus_quality.png", dpi=120)
    print(f"wrote {RESULTS / 'consensus_quality.json'} and .png")


if __name__ == "__main__":
    main()
