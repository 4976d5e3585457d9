"""API keys (server/auth.py): 401 without a listed key, on /metrics too when asked, and
before the body is read; health stays open."""

from __future__ import annotations

import httpx

from tests.conftest import MODEL_NAME
from tests.server.helpers import QUESTION, assert_openai_error, metric, serve, settings_with


async def test_api_keys(engine, server_settings):
    settings = settings_with(server_settings, api_keys=["key-one", "key-two"], metrics_auth=True)
    async with serve(engine, settings) as (url, _), httpx.AsyncClient() as http:
        anonymous = await http.get(f"{url}/v1/models")
        wrong = await http.get(f"{url}/v1/models", headers={"authorization": "Bearer key-three"})
        basic = await http.get(f"{url}/v1/models", headers={"authorization": "Basic key-one"})
        first = await http.get(f"{url}/v1/models", headers={"authorization": "Bearer key-one"})
        second = await http.post(
            f"{url}/v1/chat/completions",
            json={"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 2, "parallelism": 1},
            headers={"authorization": "Bearer key-two"},
        )
        health = await http.get(f"{url}/health")
        metrics_anonymous = await http.get(f"{url}/metrics")
        metrics_with_key = await http.get(f"{url}/metrics", headers={"authorization": "Bearer key-one"})
    for response in (anonymous, wrong, basic, metrics_anonymous):
        assert_openai_error(response, 401, "invalid_api_key")
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"
    assert first.status_code == 200 and second.status_code == 200
    assert health.status_code == 200 and metrics_with_key.status_code == 200


async def test_without_a_key_the_body_is_never_looked_at(engine, server_settings):
    # FastAPI parses the body before the router's key check, so bad bodies used to get 400.
    settings = settings_with(server_settings, api_keys=["key-one"])
    key = {"authorization": "Bearer key-one"}
    json_type = {"content-type": "application/json"}
    chat = "/v1/chat/completions"
    bad_bodies = {
        "not JSON": b'{"model": ',
        "nested too deep": b"[" * 100_000,
        "not UTF-8": b'{"model": "caf\xe9"}',
        "too large": b"{" + b" " * (settings.limits.max_body_bytes + 1) + b"}",
    }
    unauthorized_before = metric("t2serve_requests_rejected_total", reason="unauthorized")
    async with serve(engine, settings) as (url, _), httpx.AsyncClient() as http:
        anonymous = {
            name: await http.post(f"{url}{chat}", content=body, headers=json_type)
            for name, body in bad_bodies.items()
        }
        invalid = await http.post(f"{url}{chat}", json={"model": MODEL_NAME, "messages": "hi"})
        with_key = await http.post(f"{url}{chat}", content=bad_bodies["not JSON"], headers=json_type | key)
    for name, response in [*anonymous.items(), ("invalid", invalid)]:
        assert response.status_code == 401, name
        assert_openai_error(response, 401, "invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer"
    assert_openai_error(with_key, 400, "invalid_json")
    unauthorized = metric("t2serve_requests_rejected_total", reason="unauthorized") - unauthorized_before
    assert unauthorized == len(bad_bodies) + 1


def test_key_comparison_checks_every_key():
    from server.auth import key_matches

    assert key_matches("b", ["a", "b", "c"]) and not key_matches("", ["a"]) and not key_matches("ab", ["a"])
