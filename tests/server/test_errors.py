"""Errors in OpenAI's shape (server/errors.py): a body that fails validation, is not JSON,
or asks for an unknown route or method gets {message, type, param, code} and its status."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import MODEL_NAME
from tests.server.helpers import QUESTION, assert_openai_error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": QUESTION, "temperature": 5}, "temperature"),
        ({"messages": QUESTION, "n": 0}, "n"),
        ({"messages": QUESTION, "parallelism": 0}, "parallelism"),
        ({"messages": QUESTION, "parallelism": "many"}, "parallelism"),
        ({"messages": QUESTION, "max_tokens": 100_000}, "max_tokens"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ],
)
async def test_bad_requests_get_openai_errors(server_url, body, param):
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{server_url}/v1/chat/completions", json={"model": MODEL_NAME, **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param.split(".")[0])


async def test_invalid_json(server_url):
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{server_url}/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


async def test_unknown_route_and_method_are_openai_errors(server_url):
    async with httpx.AsyncClient() as http:
        missing = await http.get(f"{server_url}/v1/nothing")
        wrong_method = await http.get(f"{server_url}/v1/chat/completions")
    assert_openai_error(missing, 404)
    assert_openai_error(wrong_method, 405)
