"""Engine faults on the real command: kill vLLM's engine-core process under load and check
that t2serve answers 503 (in flight and new), turns /health to 503, exits with status 4,
and leaves no engine process behind."""

from __future__ import annotations

import concurrent.futures
import json

import httpx
import psutil
import pytest

from server.cli.serve import ENGINE_DEAD_EXIT_CODE
from tests.conftest import free_port, poll_until, start_server, wait_healthy

CHAT = {
    "messages": [{"role": "user", "content": "Count to a thousand."}],
    "max_tokens": 900,
    "ignore_eos": True,
}


def samples_in_flight(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=5).text):
        if family.name == "t2serve_samples_in_flight":
            return family.samples[0].value
    return 0.0


@pytest.mark.slow
def test_killing_the_engine_core_fails_requests_with_503_and_exits_non_zero():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    # Eager: this test is about the engine dying, not the mode (compiled runs in-process).
    proc = start_server(port, "--enforce-eager", "--estimator-head", "none", "--default-parallelism", "2")
    pool = concurrent.futures.ThreadPoolExecutor(8)
    engine_processes: list[psutil.Process] = []
    try:
        wait_healthy(proc, url)
        name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]

        def post(stream: bool = False) -> httpx.Response:
            return httpx.post(
                f"{url}/v1/chat/completions", json={"model": name, "stream": stream, **CHAT}, timeout=None
            )

        in_flight = [pool.submit(post) for _ in range(4)] + [pool.submit(post, True)]
        assert poll_until(lambda: samples_in_flight(url) >= 10), "requests did not start"  # 5 x N=2
        engine_processes = psutil.Process(proc.pid).children(recursive=True)
        (core,) = [p for p in engine_processes if "EngineCore" in " ".join(p.cmdline())]
        core.kill()

        # Health and new requests: 503 while the server winds down (it lingers a few
        # seconds so that health checks see it, then it is gone).
        assert poll_until(lambda: httpx.get(f"{url}/health").status_code != 200, interval=0.1)
        health = httpx.get(f"{url}/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
        fresh = post()
        assert fresh.status_code == 503 and fresh.json()["error"]["code"] == "engine_dead"

        # In flight: 503 engine_dead (the stream, whose status line went out already, ends
        # with the error as its last event).
        answers = [f.result() for f in in_flight]
        for response in answers[:4]:
            assert response.status_code == 503, response.text
            assert response.json()["error"]["code"] == "engine_dead"
        events = [line[6:] for line in answers[4].text.split("\n") if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == "engine_dead"

        assert proc.wait(300) == ENGINE_DEAD_EXIT_CODE
        gone, alive = psutil.wait_procs(engine_processes, timeout=300)
        assert not alive, [p.pid for p in alive]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for child in engine_processes:  # this server's engine only, never the session's
            if child.is_running():
                child.kill()
