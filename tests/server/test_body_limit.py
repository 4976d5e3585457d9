"""Request bodies (server/body_limit.py): over the limit is a 413, declared or streamed;
bytes that are not UTF-8 are a 400."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx

from tests.conftest import MODEL_NAME
from tests.server.helpers import QUESTION, assert_openai_error


async def test_body_over_the_limit_is_413_declared_or_streamed(server_url, server_settings):
    limit = server_settings.limits.max_body_bytes
    padding = {"model": MODEL_NAME, "messages": QUESTION, "user": "x" * limit}
    blob = json.dumps(padding).encode()

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked transfer
        for i in range(0, len(blob), 65536):
            yield blob[i : i + 65536]

    async with httpx.AsyncClient() as http:
        declared = await http.post(f"{server_url}/v1/chat/completions", content=blob)
        streamed = await http.post(f"{server_url}/v1/chat/completions", content=chunks())
        ok = await http.get(f"{server_url}/health")
    assert_openai_error(declared, 413, "body_too_large")
    assert_openai_error(streamed, 413, "body_too_large")
    assert ok.status_code == 200


async def test_non_utf8_body_is_400(server_url):
    body = json.dumps(
        {"model": MODEL_NAME, "messages": [{"role": "user", "content": "café"}]}, ensure_ascii=False
    )
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{server_url}/v1/chat/completions",
            content=body.encode("latin-1"),  # é as the single byte 0xE9: not UTF-8
            headers={"content-type": "application/json"},
        )
    assert_openai_error(response, 400, "invalid_encoding")
