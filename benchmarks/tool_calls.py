"""How well samples call tools, by `--tool-strict-level`: the share of samples whose text
holds a call that parses and matches the tool's schema, a call that parses but breaks the
schema, a call envelope no call can be read from (malformed), or plain text.

One `t2serve serve` per strict level (the default set-up otherwise: the embedded model, its
tool-aware template, the hermes parser) answers the same tool questions under
`tool_choice: auto` and `required`; every sample's outcome is read from the response's vote
table (`t2.votes`) and the server's `t2serve_tool_call_samples` counter. Prints a table and
writes benchmarks/results/tool_calls.{json,png}.

    .venv/bin/python benchmarks/tool_calls.py                   # defaults below
    .venv/bin/python benchmarks/tool_calls.py --questions 2 --n 8 --levels auto parameter
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS, ServerProcess, metric_value  # noqa: E402

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
QUESTIONS = [
    "What is the weather in Paris? Use the get_weather tool.",
    "Is it raining in Tokyo right now?",
    "What is 17 + 25? Use the add tool.",
    "Add 3 and 4 for me.",
    "How warm is it in Berlin today?",
    "What is 120 plus 7?",
]
OUTCOMES = ("valid call", "call off schema", "malformed", "text")


def call_outcome(key: str) -> str:
    """A vote key's outcome: a canonical call list (server.aggregation.canonical_calls) that
    matches its tool's schema, one that does not, or text."""
    if not key.startswith("calls:"):
        return "text"
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
    for call in json.loads(key.removeprefix("calls:")):
        schema, arguments = schemas.get(call["name"]), call["arguments"]
        if schema is None or not isinstance(arguments, dict) or not _matches(arguments, schema):
            return "call off schema"
    return "valid call"


def _matches(arguments: dict, schema: dict) -> bool:
    types = {"string": str, "integer": int}
    properties = schema["properties"]
    return (
        set(schema["required"]) <= set(arguments)
        and set(arguments) <= set(properties)
        and all(isinstance(v, types[properties[k]["type"]]) for k, v in arguments.items())
        and not any(isinstance(v, bool) for v in arguments.values())
    )


async def scrape_malformed(http, url: str) -> float:
    text = (await http.get(f"{url}/metrics")).text
    return metric_value(text, "t2serve_tool_call_samples_total", outcome="malformed")


async def measure(url: str, args, tool_choice: str) -> dict[str, int]:
    """Every question once with N samples; samples counted by outcome."""
    import httpx

    counts = dict.fromkeys(OUTCOMES, 0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800)) as http:
        malformed_before = await scrape_malformed(http, url)

        async def one(question: str) -> dict:
            body = {
                "model": "bench",
                "messages": [{"role": "user", "content": question}],
                "tools": [WEATHER, ADD],
                "tool_choice": tool_choice,
                "max_tokens": args.max_tokens,
                "temperature": 0.8,
                "parallelism": args.n,
            }
            r = await http.post(f"{url}/v1/chat/completions", json=body)
            r.raise_for_status()
            return r.json()["t2"]

        for t2 in await asyncio.gather(*(one(q) for q in QUESTIONS[: args.questions])):
            for key, votes in t2["votes"].items():
                counts[call_outcome(key)] += votes
            counts["text"] += t2["samples"] - sum(t2["votes"].values())  # abstained: no content
        malformed = int(await scrape_malformed(http, url) - malformed_before)
    counts["text"] -= malformed  # a malformed sample votes with its text
    counts["malformed"] = malformed
    return counts


def plot(table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(level, choice) for level in table for choice in table[level]]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    left = [0.0] * len(rows)
    for outcome, colour in zip(OUTCOMES, ("#2a9d8f", "#e9c46a", "#e76f51", "#adb5bd"), strict=True):
        shares = [table[lv][ch][outcome] / max(1, sum(table[lv][ch].values())) for lv, ch in rows]
        ax.barh(range(len(rows)), shares, left=left, color=colour, label=outcome)
        left = [a + b for a, b in zip(left, shares, strict=True)]
    ax.set_yticks(range(len(rows)), [f"{lv} · {ch}" for lv, ch in rows])
    ax.set_xlabel("share of samples")
    ax.set_title("Tool calls by --tool-strict-level · tool_choice (embedded model, hermes)")
    ax.legend(ncol=4, loc="lower center", bbox_to_anchor=(0.5, 1.1), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=int, default=len(QUESTIONS))
    parser.add_argument("--n", type=int, default=16, help="samples per request")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--levels", nargs="+", default=["auto", "function", "parameter"])
    parser.add_argument("--choices", nargs="+", default=["auto", "required"])
    args = parser.parse_args()

    from server.engine.model_store import prepare_embedded_model

    model_dir = prepare_embedded_model()
    RESULTS.mkdir(exist_ok=True)
    table: dict[str, dict[str, dict[str, int]]] = {}
    for level in args.levels:
        args.server_args = f"--tool-strict-level {level} --default-parallelism {args.n}"
        server = ServerProcess(args, model_dir, f"tool_calls_{level}")
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(server.wait_ready())
            table[level] = {
                choice: loop.run_until_complete(measure(server.url, args, choice)) for choice in args.choices
            }
        finally:
            server.stop()
            loop.close()

    result = {
        "benchmark": "tool_calls",
        "config": {**vars(args), "model": str(model_dir)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "samples": table,
    }
    (RESULTS / "tool_calls.json").write_text(json.dumps(result, indent=2))
    plot(table, RESULTS / "tool_calls.png")
    print(f"\n{args.questions} questions x N={args.n}, max_tokens {args.max_tokens}")
    print(f"{'strict level':13} {'tool_choice':12}" + "".join(f"{o:>17}" for o in OUTCOMES))
    for level, by_choice in table.items():
        for choice, counts in by_choice.items():
            total = max(1, sum(counts.values()))
            shares = "".join(f"{counts[o]:>9} ({counts[o] / total:4.0%})" for o in OUTCOMES)
            print(f"{level:13} {choice:12}{shares}")
    print(f"wrote {RESULTS / 'tool_calls.json'} and .png")


if __name__ == "__main__":
    main()
