"""The Grafana dashboard against a real Prometheus scraping the real t2serve on loopback.

Prometheus (Debian package `prometheus`) is installed by this test's set-up when absent.
Every PromQL expression of deploy/grafana/t2serve-dashboard.json is evaluated through
Prometheus' HTTP API: each must parse, the savings panels must return data, and the data
must be consistent (dispatched <= baseline, saving ratio within [0, 1]).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

from tests.conftest import MODEL_NAME, free_port

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "t2serve-dashboard.json"
SCRAPE_INTERVAL_S = 1


def dashboard_expressions() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    # Grafana substitutes $__rate_interval; Prometheus needs a literal range.
    return [
        (panel["title"], target["expr"].replace("$__rate_interval", "30s"))
        for panel in dashboard["panels"]
        for target in panel["targets"]
    ]


def ensure_prometheus() -> str:
    binary = shutil.which("prometheus")
    if binary is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True, capture_output=True, timeout=600)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "prometheus"],
            check=True,
            capture_output=True,
            timeout=600,
            env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        binary = shutil.which("prometheus")
    assert binary, "prometheus could not be installed"
    return binary


@pytest_asyncio.fixture(scope="module")
async def prometheus(server_url, tmp_path_factory):
    binary = ensure_prometheus()
    folder = tmp_path_factory.mktemp("prometheus")
    target = server_url.removeprefix("http://")
    config = folder / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n  evaluation_interval: {SCRAPE_INTERVAL_S}s\n"
        f"scrape_configs:\n  - job_name: t2serve\n    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=None) as http:

        async def ready() -> bool:
            try:
                return (await http.get("/-/ready")).status_code == 200
            except httpx.TransportError:
                return False

        assert await eventually(ready), "prometheus did not start"
        yield http
    proc.terminate()
    proc.wait(30)


async def eventually(condition, limit_s: float = 300.0) -> bool:
    """Poll an async condition until it holds; the limit only stops a hang."""
    deadline = asyncio.get_running_loop().time() + limit_s
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.2)
    return True


async def _more_scrapes(scrapes, at_least: int) -> bool:
    return await scrapes() >= at_least


async def query(http: httpx.AsyncClient, expr: str) -> list:
    body = (await http.get("/api/v1/query", params={"query": expr})).json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.mark.slow
async def test_dashboard_queries_against_real_prometheus(prometheus, client, server_url):
    async def scraped_up() -> bool:
        result = await query(prometheus, 'up{job="t2serve"}')
        return bool(result) and result[0]["value"][1] == "1"

    async def scrapes() -> int:
        result = await query(prometheus, 'count_over_time(up{job="t2serve"}[1h])')
        return int(float(result[0]["value"][1])) if result else 0

    assert await eventually(scraped_up), "prometheus is not scraping t2serve"

    # Traffic: auto requests (default N) and fixed requests below the baseline N.
    question = [{"role": "user", "content": "What is 3 + 3?"}]
    await asyncio.gather(
        *(
            client.chat.completions.create(model=MODEL_NAME, messages=question, max_tokens=4)
            for _ in range(2)
        ),
        *(
            client.chat.completions.create(
                model=MODEL_NAME, messages=question, max_tokens=4, extra_body={"parallelism": p}
            )
            for p in (1, 2, 1)
        ),
    )
    # A few scrapes after the traffic (counted, not timed): rate() needs two points in its window.
    after_traffic = await scrapes()
    assert await eventually(lambda: _more_scrapes(scrapes, after_traffic + 3))

    # Every metric the dashboard names exists on t2serve's /metrics.
    async with httpx.AsyncClient() as http:
        exposed = (await http.get(f"{server_url}/metrics")).text
    for title, expr in dashboard_expressions():
        for name in re.findall(r"\b((?:t2serve_|vllm:)[a-z_:]+)", expr):
            assert re.search(rf"^{re.escape(name)}[{{ ]", exposed, re.M), f"{title}: {name} is not exported"

    results = {}
    for _title, expr in dashboard_expressions():
        results[expr] = await query(prometheus, expr)  # parses and evaluates, or fails

    def value(expr_start: str) -> float:
        matches = [r for e, r in results.items() if e.startswith(expr_start)]
        assert matches and matches[0], f"no data for {expr_start}"
        return float(matches[0][0]["value"][1])

    saved_total = value("sum(t2serve_samples_baseline_total) - sum(t2serve_samples_dispatched_total)")
    dispatched = float((await query(prometheus, "sum(t2serve_samples_dispatched_total)"))[0]["value"][1])
    baseline = float((await query(prometheus, "sum(t2serve_samples_baseline_total)"))[0]["value"][1])
    assert dispatched > 0 and dispatched <= baseline
    assert saved_total == baseline - dispatched > 0
    ratio = value("1 - sum(rate(t2serve_samples_dispatched_total")
    assert 0.0 <= ratio <= 1.0
    assert value("sum(rate(t2serve_samples_baseline_total[30s])) - sum(rate(") >= 0
