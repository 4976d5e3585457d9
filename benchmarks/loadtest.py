"""Load test: throughput, latency, TTFT, goodput, samples and accuracy of request variants
under load, in the figures `vllm bench serve` and GuideLLM report.

Sends graded problems with gold answers (the `test` split of estimator/offline/inputs/problems.py, or your
own JSONL) to any OpenAI-compatible server as chat completions, and compares request
*variants* — extra body fields merged into every request — at each load level:

  - closed loop (`--concurrency 1,8`): C clients, each sends its next request when the
    previous one returns;
  - open loop (`--rate 0.5,1,2`, a request-rate sweep like vllm bench serve's
    --request-rate): requests arrive as a Poisson process (exponential gaps, fixed seed)
    whether or not earlier ones have finished.

Each run is bounded by `--requests` and `--duration` (no new request after that many
seconds; those in flight finish). At every load level each variant runs once, in an order
that rotates from level to level, so the variants share the machine's conditions.

Variants: `--modes auto,fixed` are shorthands for `parallelism: "auto"` and
`parallelism: N_max` (N_max from the server's first reply, `t2.n_max`, or `--n-max`);
`--variant NAME='{"parallelism": 4}'` adds any other body (a later stopping policy is one
more `--variant`, no code change). Without `--url` the harness starts `t2serve serve` on the
embedded model with the shipped T2 head, whose labels were sampled at temperature 0.3 with
48 tokens from these very prompts, hence the defaults below.

    .venv/bin/python benchmarks/loadtest.py --concurrency 1,8 --rate 1 --requests 32
    .venv/bin/python benchmarks/loadtest.py --rate 0.5,1,2 --goodput e2el:8000 --requests 16
    .venv/bin/python benchmarks/loadtest.py --url http://host:8000 --modes auto \\
        --variant fixed4='{"parallelism": 4}' --rate 0.5,1,2

Requests are streamed (`--no-stream`: one JSON reply each). Per run: requests/s, generated
tokens/s (usage.completion_tokens: every sample's tokens), end-to-end latency (E2EL)
p50/p90/p99; time to first token (TTFT: send to the first chunk carrying output; t2serve
streams the winner after the vote, so this is the vote's latency) and inter-token latency
(ITL: gaps between output chunks, pooled over requests; none when every reply arrives in
one chunk, as t2serve's do); request goodput under `--goodput` SLOs (vllm bench serve's
spelling: `e2el:MS`, `ttft:MS`; requests/s that succeeded within every SLO); errors by HTTP
status (transport errors, error events in a stream); samples dispatched per request
(`t2.launched`) vs the fixed-N baseline (`t2.n_max` per choice); vote accuracy against the
gold answers, and right answers per 1,000 generated tokens. Writes
benchmarks/results/loadtest.{json,png} (`--out`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS  # noqa: E402
from estimator.offline.inputs import datasets  # noqa: E402
from estimator.offline.inputs.problems import Problem, generate  # noqa: E402
from server.voting import extract_answer, normalize_answer  # noqa: E402

# ---- pure helpers ----


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def poisson_arrivals(rate: float, count: int, seed: int) -> list[float]:
    """Arrival times (s from the start) of `count` requests of a Poisson process at `rate`/s:
    cumulative sums of exponential gaps, deterministic by seed."""
    r = random.Random(seed)
    now, out = 0.0, []
    for _ in range(count):
        now += r.expovariate(rate)
        out.append(now)
    return out


@dataclass(frozen=True)
class Load:
    kind: str  # "concurrency" (closed loop) or "rate" (open loop, requests/s)
    value: float

    @property
    def label(self) -> str:
        return f"C={self.value:g}" if self.kind == "concurrency" else f"{self.value:g}/s"


@dataclass
class RequestRecord:
    # HTTP status ("200", "400", ...), "transport:<exception>", or "stream:<code>" for an
    # error event inside a 200 stream
    status: str
    latency_s: float  # end to end (E2EL): send to the last byte
    completion_tokens: int = 0
    samples: int = 0  # samples the server dispatched for this request
    baseline: int = 0  # samples a fixed-N_max deployment would have dispatched
    correct: bool | None = None  # voted answer == gold (None: no gold)
    ttft_s: float | None = None  # streamed: send to the first chunk carrying output
    itl_s: list[float] = field(default_factory=list)  # streamed: gaps between output chunks
    explored: bool = False  # t2.explored: run at N_max for the live gauge (--explore-share)


# --goodput keys (vllm bench serve's names) -> the record's time they bound
SLO_METRICS = {"e2el": "latency_s", "ttft": "ttft_s"}


def parse_goodput(specs: list[str]) -> dict[str, float]:
    """`["e2el:8000", "ttft:2000"]` (milliseconds, as vllm bench serve takes them) → SLOs in
    seconds by metric."""
    slo = {}
    for spec in specs:
        name, sep, ms = spec.partition(":")
        if not sep or name not in SLO_METRICS:
            raise argparse.ArgumentTypeError(
                f"--goodput wants METRIC:MS with METRIC one of {', '.join(SLO_METRICS)}, got {spec!r}"
            )
        try:
            slo[name] = float(ms) / 1000
        except ValueError:
            raise argparse.ArgumentTypeError(f"--goodput {name}: {ms!r} is not a number of ms") from None
        if slo[name] <= 0:
            raise argparse.ArgumentTypeError(f"--goodput {name}: the SLO must be > 0 ms")
    return slo


def meets_slo(record: RequestRecord, slo: dict[str, float]) -> bool:
    """A request counts toward goodput when it succeeded and met every SLO (a TTFT SLO is
    missed by a request without one: not streamed, or no output)."""
    if record.status != "200":
        return False
    for name, limit in slo.items():
        value = getattr(record, SLO_METRICS[name])
        if value is None or value > limit:
            return False
    return True


def inter_token_latencies(output_times: list[float]) -> list[float]:
    """Gaps between successive output chunks' arrival times (vllm bench serve's ITL)."""
    return [b - a for a, b in pairwise(output_times)]


def read_stream(events: list[tuple[float, str]]) -> tuple[dict, list[float], str | None]:
    """A streamed chat completion's SSE `data:` payloads, each with its arrival time (s after
    the send) → (the reply as the non-streamed one reads: each choice's content, `usage`,
    `t2`; the arrival times of the chunks carrying output: content, reasoning or tool calls;
    the error code or type when the stream carried an error event, else None)."""
    contents: dict[int, str] = {}
    reply: dict = {}
    output_times: list[float] = []
    for at, data in events:
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            error = chunk["error"] or {}
            return reply, output_times, str(error.get("code") or error.get("type") or "error")
        output = False
        for choice in chunk.get("choices") or []:
            delta = choice.get("delta") or {}
            text = delta.get("content") or ""
            contents[choice.get("index", 0)] = contents.get(choice.get("index", 0), "") + text
            output = output or bool(
                text or delta.get("reasoning") or delta.get("reasoning_content") or delta.get("tool_calls")
            )
        if output:
            output_times.append(at)
        for key in ("usage", "t2"):
            if chunk.get(key):
                reply[key] = chunk[key]
    reply["choices"] = [{"message": {"content": contents[i]}} for i in sorted(contents)]
    return reply, output_times, None


def parse_variant(spec: str) -> tuple[str, dict]:
    """`NAME={json object}` → (NAME, body fields)."""
    name, sep, body = spec.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--variant wants NAME='{{json}}', got {spec!r}")
    fields = json.loads(body)
    if not isinstance(fields, dict):
        raise argparse.ArgumentTypeError(f"--variant {name}: the body must be a JSON object")
    return name, fields


def record_from_reply(
    status: int, reply: dict, latency_s: float, gold: str | None, output_times: list[float] | None = None
) -> RequestRecord:
    """What one reply contributes (`output_times`: a streamed reply's output chunks' arrival
    times, read_stream). Servers without t2serve's `t2` object count one sample per choice
    and are scored on the answer extracted from the first choice's text."""
    if status != 200:
        return RequestRecord(str(status), latency_s)
    choices = reply.get("choices") or []
    t2 = reply.get("t2")
    if t2:
        # `launched` counts aborted samples too (stopping policies); older replies lack it.
        samples, baseline = t2.get("launched", t2["samples"]), t2["n_max"] * max(1, len(choices))
        answer = t2.get("answer")
    else:
        first = choices[0] if choices else {}
        text = (first.get("message") or {}).get("content") or first.get("text") or ""
        extracted = extract_answer(text)
        samples = baseline = len(choices)
        answer = normalize_answer(extracted) if extracted else None
    usage = reply.get("usage") or {}
    return RequestRecord(
        "200",
        latency_s,
        completion_tokens=usage.get("completion_tokens", 0),
        samples=samples,
        baseline=baseline,
        correct=None if gold is None else answer == gold,
        ttft_s=output_times[0] if output_times else None,
        itl_s=inter_token_latencies(output_times or []),
        explored=bool(t2 and t2.get("explored")),
    )


def summarize(records: list[RequestRecord], wall_s: float, slo: dict[str, float] | None = None) -> dict:
    """One run's figures; `slo` (parse_goodput) adds request goodput."""
    ok = [r for r in records if r.status == "200"]
    latencies = [r.latency_s for r in ok]
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    itls = [gap for r in ok for gap in r.itl_s]
    graded = [r.correct for r in ok if r.correct is not None]
    samples, baseline = sum(r.samples for r in ok), sum(r.baseline for r in ok)
    graded_tokens = sum(r.completion_tokens for r in ok if r.correct is not None)
    good = None if slo is None else sum(meets_slo(r, slo) for r in records)
    return {
        "sent": len(records),
        "ok": len(ok),
        "errors": dict(Counter(r.status for r in records if r.status != "200")),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "tokens_per_s": sum(r.completion_tokens for r in ok) / wall_s if wall_s > 0 else 0.0,
        "generated_tokens": sum(r.completion_tokens for r in ok),
        "latency_p50_s": percentile(latencies, 50),
        "latency_p90_s": percentile(latencies, 90),
        "latency_p99_s": percentile(latencies, 99),
        "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else None,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p90_s": percentile(ttfts, 90),
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_mean_s": sum(itls) / len(itls) if itls else None,
        "itl_p50_s": percentile(itls, 50),
        "itl_p99_s": percentile(itls, 99),
        "slo": slo,
        "good": good,
        "goodput_per_s": None if good is None or wall_s <= 0 else good / wall_s,
        "good_fraction": None if good is None or not records else good / len(records),
        "samples": samples,
        "baseline_samples": baseline,
        "samples_per_request": samples / len(ok) if ok else None,
        "samples_histogram": dict(sorted(Counter(r.samples for r in ok).items())),
        "baseline_per_request": baseline / len(ok) if ok else None,
        "saved_fraction": 1 - samples / baseline if baseline else None,
        "accuracy": sum(graded) / len(graded) if graded else None,
        "graded": len(graded),
        # right answers per 1,000 generated tokens (every sample's): accuracy for the compute
        "correct_per_1k_tokens": 1000 * sum(graded) / graded_tokens if graded_tokens else None,
    }


# ---- driving load ----


async def closed_loop(send: Callable[[int], Awaitable[None]], count: int, concurrency: int, deadline: float):
    """`concurrency` clients, each sending its next request when the previous one returned."""
    next_index = 0

    async def user() -> None:
        nonlocal next_index
        while next_index < count and time.monotonic() < deadline:
            index, next_index = next_index, next_index + 1
            await send(index)

    await asyncio.gather(*(user() for _ in range(concurrency)))


async def open_loop(send: Callable[[int], Awaitable[None]], arrivals: list[float], deadline: float):
    """One request per arrival time, regardless of how many are still in flight."""
    start = time.monotonic()
    in_flight = []
    for index, at in enumerate(arrivals):
        if start + at >= deadline:
            break
        await asyncio.sleep(max(0.0, start + at - time.monotonic()))
        in_flight.append(asyncio.create_task(send(index)))
    await asyncio.gather(*in_flight)


async def run_load(
    http,
    model: str,
    problems: list[Problem],
    body: dict,
    load: Load,
    *,
    requests: int,
    duration_s: float,
    temperature: float,
    max_tokens: int,
    seed: int = 0,
    stream: bool = True,
    progress: bool = True,
    desc: str = "",
) -> tuple[list[RequestRecord], float]:
    """One run: up to `requests` chat completions (cycling over `problems`) at `load`, each
    with `body` merged in, streamed unless `stream` is False. Returns every request's record
    and the wall time (first send → last reply)."""
    import httpx
    from tqdm import tqdm

    records: list[RequestRecord] = []
    bar = tqdm(total=requests, desc=desc or load.label, unit="req", disable=not progress, leave=False)

    async def send(index: int) -> None:
        problem = problems[index % len(problems)]
        payload = {
            "model": model,
            "messages": [{"role": "user", "content": problem.question}],
            "temperature": temperature,
            "max_tokens": max_tokens,
            **body,
        }
        if stream:
            payload.update(stream=True, stream_options={"include_usage": True})
        sent = time.monotonic()
        try:
            status, parsed, output_times, error = await (post_streamed if stream else post)(http, payload)
        except httpx.TransportError as exc:
            records.append(RequestRecord(f"transport:{type(exc).__name__}", time.monotonic() - sent))
        except ValueError:  # a 200 whose body is not JSON counts as an error, not a crash
            records.append(RequestRecord("200:not-json", time.monotonic() - sent))
        else:
            latency = time.monotonic() - sent
            if error is not None:
                records.append(RequestRecord(f"stream:{error}", latency))
            else:
                records.append(record_from_reply(status, parsed, latency, problem.answer, output_times))
        bar.update()

    started = time.monotonic()
    deadline = started + duration_s
    if load.kind == "concurrency":
        await closed_loop(send, requests, int(load.value), deadline)
    else:
        await open_loop(send, poisson_arrivals(load.value, requests, seed), deadline)
    wall = time.monotonic() - started
    bar.close()
    return records, wall


async def post(http, payload: dict) -> tuple[int, dict, list[float] | None, str | None]:
    """One non-streamed chat completion: (status, the reply (empty unless 200), no output
    times, no stream error)."""
    reply = await http.post("/v1/chat/completions", json=payload)
    return reply.status_code, reply.json() if reply.status_code == 200 else {}, None, None


async def post_streamed(http, payload: dict) -> tuple[int, dict, list[float] | None, str | None]:
    """One streamed chat completion: (status, the reply read from its chunks, the output
    chunks' arrival times in s after the send, the stream's error; read_stream)."""
    sent = time.monotonic()
    async with http.stream("POST", "/v1/chat/completions", json=payload) as reply:
        if reply.status_code != 200:
            await reply.aread()
            return reply.status_code, {}, None, None
        events = [
            (time.monotonic() - sent, line.removeprefix("data:").strip())
            async for line in reply.aiter_lines()
            if line.startswith("data:")
        ]
    return 200, *read_stream(events)


def load_problems(count: int, seed: int, data: str) -> list[Problem]:
    """`count` problems with gold answers: the built-in generator's test split (the shipped
    head never saw them), or the rows of a data file (estimator.offline.inputs.datasets)."""
    if data != "builtin":
        rows = datasets.read(data).problems
        return rows[:count] if count else rows
    pool = [p for p in generate(max(600, 10 * count), seed) if p.split == "test"]
    if len(pool) < count:
        raise SystemExit(f"only {len(pool)} test-split problems; ask for fewer --prompts")
    return pool[:count]


# ---- the command ----


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="base URL of an OpenAI-compatible server (default: start t2serve here)")
    p.add_argument("--api-key", help="sent as a Bearer token")
    p.add_argument("--model-name", help="model to ask for (default: the server's first /v1/models entry)")
    p.add_argument("--concurrency", default="", help="closed-loop levels, e.g. 1,8")
    p.add_argument("--rate", default="", help="open-loop Poisson arrival rates (requests/s), e.g. 0.5,1,2")
    p.add_argument(
        "--goodput",
        nargs="+",
        default=[],
        metavar="METRIC:MS",
        help="SLOs for request goodput, vllm bench serve's spelling: e2el:MS and/or ttft:MS",
    )
    p.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="stream the requests (TTFT, ITL); --no-stream: one JSON reply each",
    )
    p.add_argument("--requests", type=int, default=32, help="requests per run (at most)")
    p.add_argument("--duration", type=float, default=300, help="seconds per run (at most) to send requests")
    p.add_argument(
        "--modes", default="auto,fixed", help="built-in variants: auto, fixed (N_max); '' for none"
    )
    p.add_argument("--variant", action="append", default=[], type=parse_variant, help="NAME='{json body}'")
    p.add_argument("--n-max", type=int, help="N for the fixed mode (default: the server's t2.n_max)")
    p.add_argument("--prompts", type=int, default=32, help="distinct prompts (the runs cycle over them)")
    p.add_argument(
        "--data", default="builtin", help="'builtin' (test split) or a JSONL of {question, answer}"
    )
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--seed", type=int, default=0, help="problem set and arrival times")
    p.add_argument("--timeout", type=float, default=600, help="per-request timeout (s)")
    p.add_argument("--model", help="without --url: model folder (default: the embedded model)")
    p.add_argument("--server-args", default="", help="without --url: extra `t2serve serve` arguments")
    p.add_argument("--out", type=Path, default=RESULTS / "loadtest", help="report path (.json/.png)")
    args = p.parse_args(argv)
    try:
        args.slo = parse_goodput(args.goodput) or None
    except argparse.ArgumentTypeError as exc:
        p.error(str(exc))
    args.loads = [Load("concurrency", float(c)) for c in args.concurrency.split(",") if c] + [
        Load("rate", float(r)) for r in args.rate.split(",") if r
    ]
    if not args.loads:
        args.loads = [Load("concurrency", 1.0), Load("concurrency", 8.0)]
    return args


async def benchmark(args: argparse.Namespace, url: str) -> dict:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    problems = load_problems(args.prompts, args.seed, args.data)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    async with httpx.AsyncClient(
        base_url=url, headers=headers, timeout=httpx.Timeout(args.timeout), limits=limits
    ) as http:
        model = args.model_name or (await http.get("/v1/models")).json()["data"][0]["id"]
        # Warm-up (first request pays one-off costs) and N_max for the fixed mode.
        warm = await http.post(
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": problems[0].question}],
                "temperature": args.temperature,
                "max_tokens": args.max_tokens,
            },
        )
        warm.raise_for_status()
        n_max = args.n_max or (warm.json().get("t2") or {}).get("n_max")
        estimator = await estimator_info(http)
        variants: dict[str, dict] = {}
        for mode in filter(None, args.modes.split(",")):
            if mode == "auto":
                variants["auto"] = {"parallelism": "auto"}
            elif mode == "fixed":
                if not n_max:
                    raise SystemExit("the server reports no t2.n_max: pass --n-max for the fixed mode")
                variants[f"fixed N={n_max}"] = {"parallelism": n_max}
            else:
                raise SystemExit(f"unknown mode {mode!r} (auto, fixed; use --variant for others)")
        variants.update(dict(args.variant))
        if not variants:
            raise SystemExit("nothing to compare: give --modes and/or --variant")

        runs = []
        names = list(variants)
        for level, load in enumerate(args.loads):
            # Rotate the order per level so no variant always runs first (warmer caches).
            for name in names[level % len(names) :] + names[: level % len(names)]:
                records, wall = await run_load(
                    http,
                    model,
                    problems,
                    variants[name],
                    load,
                    requests=args.requests,
                    duration_s=args.duration,
                    temperature=args.temperature,
                    max_tokens=args.max_tokens,
                    seed=args.seed,
                    stream=args.stream,
                    desc=f"{load.label} {name}",
                )
                runs.append(
                    {
                        "variant": name,
                        "load": asdict(load),
                        "label": load.label,
                        **summarize(records, wall, args.slo),
                        "records": [asdict(r) for r in records],
                    }
                )
                print(f"  {load.label:>7} {name}: {format_row(runs[-1])}", flush=True)
    return {
        "url": url,
        "model": model,
        "n_max": n_max,
        "estimator": estimator,
        "variants": variants,
        "runs": runs,
    }


async def estimator_info(http) -> dict | None:
    """The head a t2serve server runs (`t2serve_estimator_info` on /metrics), so a result
    names the head it measured; None for other servers."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        reply = await http.get("/metrics")
    except Exception:  # noqa: BLE001 - optional: any failure just means "unknown"
        return None
    lines = [line for line in reply.text.splitlines() if line.startswith("t2serve_estimator_info{")]
    if reply.status_code != 200 or not lines:
        return None
    [family] = text_string_to_metric_families(lines[0] + "\n")
    return dict(family.samples[0].labels)


def _num(value, fmt: str, width: int = 0) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{fmt}}"


def format_row(run: dict) -> str:
    errors = ",".join(f"{k}:{v}" for k, v in run["errors"].items()) or "0"
    goodput = "" if run["slo"] is None else f"goodput {_num(run['goodput_per_s'], '.2f')} req/s, "
    return (
        f"{run['ok']}/{run['sent']} ok, err {errors}, {run['requests_per_s']:.2f} req/s, {goodput}"
        f"{run['tokens_per_s']:.0f} tok/s, TTFT p50/p99 {_num(run['ttft_p50_s'], '.2f')}/"
        f"{_num(run['ttft_p99_s'], '.2f')} s, E2EL p50/p90/p99 {_num(run['latency_p50_s'], '.2f')}/"
        f"{_num(run['latency_p90_s'], '.2f')}/{_num(run['latency_p99_s'], '.2f')} s, "
        f"samples {_num(run['samples_per_request'], '.2f')}/{_num(run['baseline_per_request'], '.0f')}, "
        f"acc {_num(run['accuracy'], '.3f')}"
    )


# (header, width, the run's field, format) of the printed table, in order
COLUMNS = (
    ("ok/sent", 8, None, ""),
    ("err", 4, None, ""),
    ("req/s", 6, "requests_per_s", ".2f"),
    ("goodput", 7, "goodput_per_s", ".2f"),
    ("tok/s", 6, "tokens_per_s", ".0f"),
    ("TTFT50", 6, "ttft_p50_s", ".2f"),
    ("TTFT99", 6, "ttft_p99_s", ".2f"),
    ("ITL50", 6, "itl_p50_s", ".3f"),
    ("E2E50", 6, "latency_p50_s", ".2f"),
    ("E2E90", 6, "latency_p90_s", ".2f"),
    ("E2E99", 6, "latency_p99_s", ".2f"),
    ("samples", 7, "samples_per_request", ".2f"),
    ("base", 4, "baseline_per_request", ".0f"),
    ("saved", 5, "saved_fraction", ".0%"),
    ("acc", 5, "accuracy", ".3f"),
    ("ok/1k", 5, "correct_per_1k_tokens", ".2f"),
)


def print_table(result: dict) -> None:
    slo = result["config"].get("slo")
    print()
    if slo:
        print(
            "goodput: requests/s that succeeded within "
            + ", ".join(f"{k} {v * 1000:g} ms" for k, v in slo.items())
        )
    print("times in s (TTFT, ITL, E2E: p50/p90/p99); ok/1k: right answers per 1,000 generated tokens")
    print(f"{'load':>7} {'variant':<14} " + " ".join(f"{h:>{w}}" for h, w, _, _ in COLUMNS))
    for r in result["runs"]:
        cells = []
        for header, width, key, fmt in COLUMNS:
            if header == "ok/sent":
                cells.append(f"{str(r['ok']) + '/' + str(r['sent']):>{width}}")
            elif header == "err":
                cells.append(f"{sum(r['errors'].values()):>{width}}")
            else:
                cells.append(_num(r[key], fmt, width))
        print(f"{r['label']:>7} {r['variant']:<14} " + " ".join(cells))


def plot(result: dict, path: Path) -> None:
    """Per load level, each variant side by side: TTFT and E2E latency, goodput (or
    completed requests/s without an SLO), samples per request, accuracy, and right answers
    per 1,000 generated tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r["label"] for r in result["runs"]))
    x = {label: i for i, label in enumerate(labels)}
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    (ttft, e2e, good), (samp, acc, per_token) = axes
    slo = result["config"].get("slo")
    variants = list(result["variants"])
    width = 0.8 / len(variants)
    for i, name in enumerate(variants):
        runs = [r for r in result["runs"] if r["variant"] == name]
        xs = [x[r["label"]] for r in runs]
        color = f"C{i}"
        for ax, low, high in ((ttft, "ttft_p50_s", "ttft_p99_s"), (e2e, "latency_p50_s", "latency_p99_s")):
            ax.plot(xs, [r[low] for r in runs], "o-", color=color, label=f"{name} p50")
            ax.plot(xs, [r[high] for r in runs], "o--", color=color, label=f"{name} p99")
        good.plot(
            xs, [r["goodput_per_s" if slo else "requests_per_s"] for r in runs], "o-", color=color, label=name
        )
        samp.plot(xs, [r["samples_per_request"] for r in runs], "o-", color=color, label=name)
        bars = [v + (i - (len(variants) - 1) / 2) * width for v in xs]
        acc.bar(bars, [r["accuracy"] or 0 for r in runs], width, color=color, label=name)
        per_token.bar(bars, [r["correct_per_1k_tokens"] or 0 for r in runs], width, color=color, label=name)
    rates = [(x[label], load["value"]) for label, load in {r["label"]: r["load"] for r in result["runs"]}.items()
             if load["kind"] == "rate"]  # fmt: skip
    if rates:
        good.plot(*zip(*rates, strict=True), "k:", label="offered rate")
    baseline = [r["baseline_per_request"] for r in result["runs"] if r["baseline_per_request"]]
    if baseline:
        samp.axhline(max(baseline), color="grey", ls=":", label="fixed-N baseline")
    goodput_label = (
        "goodput (req/s within " + ", ".join(f"{k} {v * 1000:g} ms" for k, v in slo.items()) + ")"
        if slo
        else "completed requests/s"
    )
    for ax, ylabel in (
        (ttft, "time to first token (s)"),
        (e2e, "end-to-end latency (s)"),
        (good, goodput_label),
        (samp, "samples per request"),
        (acc, "vote accuracy vs gold answers"),
        (per_token, "right answers per 1k generated tokens"),
    ):
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("load (C = clients in a closed loop, /s = Poisson arrivals)")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=7)
    acc.set_ylim(0, 1)
    fig.suptitle(
        f"load test: model {result['model']}, N_max {result['n_max']}, "
        f"{result['config']['requests']} requests per run"
        + ("" if result["config"].get("stream", True) else " (not streamed: no TTFT)")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    server = None
    loop = asyncio.new_event_loop()
    try:
        url = args.url
        if url is None:
            from benchmarks.common import ServerProcess
            from server.engine.model_store import prepare_embedded_model

            model_dir = Path(args.model) if args.model else prepare_embedded_model()
            RESULTS.mkdir(exist_ok=True)
            # The shipped head is the server's default estimator: `auto` uses T2.
            server = ServerProcess(
                SimpleNamespace(n=args.n_max or 16, server_args=args.server_args), model_dir, "loadtest"
            )
            loop.run_until_complete(server.wait_ready())
            url = server.url
        url = url.rstrip("/").removesuffix("/v1")
        result = loop.run_until_complete(benchmark(args, url))
    finally:
        if server is not None:
            server.stop()
        loop.close()

    config = {k: v for k, v in vars(args).items() if k not in ("loads", "variant", "out", "api_key")}
    result["config"] = {**config, "loads": [asdict(load) for load in args.loads], "out": str(args.out)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    print_table(result)
    plot(result, args.out.with_suffix(".png"))
    print(f"wrote {args.out.with_suffix('.json')} and .png")


if __name__ == "__main__":
    main()
