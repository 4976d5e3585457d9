"""Pieces the benchmark scripts share: prompts, a `t2serve serve` subprocess, result paths."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def prompts(count: int) -> list[str]:
    out = []
    for i in range(count):
        a, b = 3 + (7 * i) % 17, 2 + (5 * i) % 11
        sym = "+-*"[i % 3]
        out.append(f"Question {i}: what is {a} {sym} {b}? Think step by step, then give the answer.")
    return out


def metric_value(text: str, name: str, **labels: str) -> float:
    """One sample's value on a /metrics page (Prometheus text): the sample `name` with exactly
    `labels`; 0 where the server has not exported it yet."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`t2serve serve` in a subprocess, plus an async client for it."""

    def __init__(
        self, args, model_dir: Path, log_name: str, command: list[str] | None = None, name: str = "t2serve"
    ):
        """`command`: another OpenAI server to run instead (vLLM's own, for comparisons), with
        `--port PORT` appended."""
        self.args = args
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        cmd = (
            [*command, "--port", str(self.port)]
            if command is not None
            else [
                sys.executable,
                "-m",
                "server.cli",
                "serve",
                "--model",
                str(model_dir),
                "--port",
                str(self.port),
                "--served-model-name",
                "bench",
                "--max-model-len",
                "2048",
                "--log-level",
                "warning",
                "--max-parallelism",
                str(max(args.n, 64)),
                *args.server_args.split(),
            ]
        )
        self.log = open(RESULTS / f"{log_name}_server.log", "w")  # noqa: SIM115 - outlives __init__
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    async def wait_ready(self) -> None:
        import httpx

        started = time.monotonic()
        async with httpx.AsyncClient() as http:
            while True:
                try:
                    if (await http.get(f"{self.url}/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if self.proc.poll() is not None or time.monotonic() - started > 600:
                    raise RuntimeError(f"{self.name} did not start; see {self.log.name}")
                await asyncio.sleep(1)
        print(f"{self.name} up in {time.monotonic() - started:.0f} s", flush=True)

    async def run(
        self,
        questions: list[str],
        label: str,
        parallelism: int | str | list[int] | None = None,
        concurrency: int | None = None,
    ) -> dict:
        """Send every question; `parallelism`: one value for all, or one per question
        (default: args.n); `concurrency`: clients sending one request at a time each
        (default: all at once). Results are in question order."""
        import httpx
        from tqdm import tqdm

        per_question = (
            parallelism if isinstance(parallelism, list) else [parallelism or self.args.n] * len(questions)
        )

        def body(k: int) -> dict:
            return {
                "model": "bench",
                "messages": [{"role": "user", "content": questions[k]}],
                "max_tokens": self.args.max_tokens,
                "temperature": 0.8,
                "ignore_eos": True,
                "parallelism": per_question[k],
            }

        tokens = 0
        latencies: list[float] = [0.0] * len(questions)
        t2s: list[dict] = [{}] * len(questions)
        gate = asyncio.Semaphore(concurrency or len(questions))
        async with httpx.AsyncClient(timeout=httpx.Timeout(1800)) as http:
            bar = tqdm(total=len(questions), desc=label, unit="req")

            async def one(k: int) -> None:
                nonlocal tokens
                async with gate:
                    sent = time.monotonic()
                    r = await http.post(f"{self.url}/v1/chat/completions", json=body(k))
                    r.raise_for_status()
                    latencies[k] = time.monotonic() - sent
                reply = r.json()
                tokens += reply["usage"]["completion_tokens"]
                t2s[k] = reply["t2"]
                bar.update()

            t0 = time.monotonic()
            await asyncio.gather(*(one(k) for k in range(len(questions))))
            wall = time.monotonic() - t0
            bar.close()
        return {
            "wall_s": wall,
            "generated_tokens": tokens,
            "requests": len(questions),
            "latencies_s": latencies,
            "t2": t2s,
        }

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def offline_llm(model_dir: Path, max_model_len: int = 2048):
    """vLLM's offline `LLM` with the engine settings t2serve runs (eager, the dtype
    `--dtype auto` picks here, prefix caching, t2serve's CPU knobs and block size), so a
    comparison is of front ends or aggregators, not of kernels."""
    from vllm import LLM

    from server.config import EngineSettings
    from server.engine.platform import CPU_BLOCK_SIZE, apply_cpu_environment, on_cpu, resolve_dtype

    cpu = on_cpu()
    if cpu:
        apply_cpu_environment(EngineSettings(model=str(model_dir), served_model_name="bench"))
    return LLM(
        model=str(model_dir),
        max_model_len=max_model_len,
        enforce_eager=True,
        dtype=resolve_dtype("auto", cpu),
        enable_prefix_caching=True,
        block_size=CPU_BLOCK_SIZE if cpu else None,
        seed=0,
    )
