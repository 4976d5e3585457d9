"""The real command: `t2serve serve` as a subprocess, on the embedded model, over HTTP."""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import sys

import httpx
import pytest

from estimator.head import DEFAULT_HEAD, T2Head
from estimator.offline.inputs.problems import PROMPT_SUFFIX
from server.cli import build_parser
from server.cli.serve import STARTUP_FAILED_EXIT_CODE, report_self_test, serve_settings
from tests.conftest import ROOT, free_port, poll_until, start_server, wait_healthy


def test_parser_defaults_and_engine_args(model_dir):
    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            str(model_dir),
            "--max-model-len",
            "1024",
            "--tensor-parallel-size",
            "1",
            "--gpu-memory-utilization",
            "0.5",
            "--enforce-eager",
            "--default-parallelism",
            "6",
        ]
    )
    settings = serve_settings(args)
    assert settings.engine.model == str(model_dir)
    assert settings.engine.served_model_name == model_dir.name
    assert settings.engine.max_model_len == 1024 and settings.engine.gpu_memory_utilization == 0.5
    assert settings.engine.enforce_eager is True and settings.engine.enable_prefix_caching is True
    assert build_parser().parse_args(["serve"]).enforce_eager is False  # compiled by default
    assert settings.parallelism.default_parallelism == 6


def test_prepare_model_command(model_dir):
    out = subprocess.run(
        [sys.executable, "-m", "server.cli", "prepare-model"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "verified" in out.stdout and str(model_dir) in out.stdout


@pytest.mark.slow
def test_serve_command_end_to_end(model_dir):
    port = free_port()
    proc = start_server(port, "--default-parallelism", "2", "--estimator-temperature-tolerance", "0.2")
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
        models = httpx.get(f"{url}/v1/models").json()
        name = models["data"][0]["id"]
        assert name == model_dir.name  # no --model: the embedded model, named after its folder
        # A question of the kind the shipped head was trained on (its gate: answerable).
        question = "What is 6 + 6?" + PROMPT_SUFFIX
        body = {"model": name, "messages": [{"role": "user", "content": question}], "max_tokens": 5}
        # At the head's own temperature (0.3, what its labels were sampled at).
        reply = httpx.post(f"{url}/v1/chat/completions", json={**body, "temperature": 0.3}, timeout=None)
        assert reply.status_code == 200, reply.text
        t2 = reply.json()["t2"]
        # No --estimator-head: the head shipped for the embedded model is loaded and picks N.
        assert t2["estimator"] == "t2" and t2["prediction"] is not None and t2["gate"] == "answerable"
        assert t2["estimator_fallback"] is None
        # No --estimator-margin: the shipped head's own, times the gate's multiple.
        margin = T2Head.load(DEFAULT_HEAD).meta.margin
        assert margin is not None and t2["policy"] == f"t2:margin={margin:g}"
        n_wanted = round(t2["n_max"] * t2["prediction"] * margin * t2["margin_scale"])
        assert t2["n_used"] == max(1, min(n_wanted, t2["max_parallelism"]))
        # No temperature: vLLM's default 1.0, farther than the tolerance asked for: the default N, and why.
        t2 = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=None).json()["t2"]
        assert t2["estimator_fallback"] == "temperature" and t2["prediction"] is None
        assert t2["n_used"] == 2  # --default-parallelism
        fixed = httpx.post(
            f"{url}/v1/chat/completions",
            json={
                "model": name,
                "messages": [{"role": "user", "content": "Say hi"}],
                "max_tokens": 3,
                "parallelism": 2,
            },
            timeout=None,
        )
        assert fixed.json()["t2"]["n_used"] == 2 and fixed.json()["t2"]["mode"] == "fixed"
        # "Say hi" has nothing to vote on: the gate sends it to --open-ended-parallelism (1).
        hello = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": name, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 5},
            timeout=None,
        ).json()["t2"]
        assert hello["gate"] == "open_ended" and hello["launched"] == 1

        # Graceful shutdown: a request in flight when SIGTERM arrives still gets its answer.
        pool = concurrent.futures.ThreadPoolExecutor(1)
        draining = pool.submit(
            httpx.post,
            f"{url}/v1/chat/completions",
            json={
                "model": name,
                "messages": [{"role": "user", "content": "Say hi"}],
                "max_tokens": 40,
                "ignore_eos": True,
                "parallelism": 2,
            },
            timeout=None,
        )
        started = poll_until(lambda: "t2serve_samples_in_flight 2.0" in httpx.get(f"{url}/metrics").text)
        assert started, "the request did not start"
        proc.terminate()
        drained = draining.result()
        pool.shutdown()
        assert drained.status_code == 200, drained.text
        assert drained.json()["usage"]["completion_tokens"] == 80  # both samples ran to the end
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # SIGTERM shuts the server down by itself, in time (uvicorn drains, the lifespan stops the
    # engine, then uvicorn re-raises the signal, hence -SIGTERM rather than 0); -9 would mean
    # it hung and had to be killed.
    assert proc.returncode in (0, -signal.SIGTERM)


async def test_self_test_command_reports_and_sets_the_exit_status(engine, capsys):
    """What `t2serve serve --self-test` prints and returns (on the session's engine: every
    subprocess server in these tests also runs the same check at start-up)."""
    import json

    from server.engine.engine import CaptureSelfTestError

    assert await report_self_test(engine) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["self_test"] == "ok" and report["mode"] == "compiled" and report["shape"] == [30, 576]

    class Broken:
        async def self_test(self):
            raise CaptureSelfTestError("no states arrived")

    assert await report_self_test(Broken()) == STARTUP_FAILED_EXIT_CODE == 3
    assert "no states arrived" in capsys.readouterr().err


def test_serve_parser_has_the_self_test_and_capture_flags(model_dir):
    args = build_parser().parse_args(["serve", "--self-test", "--no-capture"])
    assert args.self_test is True and serve_settings(args).engine.capture is False
