"""A client's X-Request-Id (server/requests.py): checked, taken as the request's id and echoed
in the response header and the completion's id, JSON or streamed; engine ids stay unique when
two requests carry the same id."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from starlette.requests import Request

from server.errors import APIError
from server.requests import REQUEST_ID_HEADER, RequestContext, client_request_id
from tests.conftest import MODEL_NAME
from tests.server.helpers import QUESTION, assert_openai_error


def request_with(*headers: tuple[str, str]) -> Request:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers]
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": raw})


@pytest.mark.parametrize("value", ["abc", "label-0f3a", "A.b_c:d-9", "x" * 128])
def test_a_sane_request_id_is_taken(value):
    assert client_request_id(request_with((REQUEST_ID_HEADER, value))) == value
    ctx = RequestContext("chat", None)  # type: ignore[arg-type]
    generated = ctx.request_id
    ctx.named_by(request_with((REQUEST_ID_HEADER, value)))
    assert ctx.request_id == value and ctx.request_id != generated
    assert ctx.engine_id.startswith(f"{value}-") and ctx.engine_id != value
    ctx.done("ok")


def test_without_the_header_the_id_is_the_servers_own():
    assert client_request_id(request_with()) is None
    ctx = RequestContext("chat", None)  # type: ignore[arg-type]
    ctx.named_by(request_with(("Authorization", "Bearer k")))
    assert len(ctx.request_id) == 32 and ctx.engine_id == ctx.request_id
    ctx.done("ok")


@pytest.mark.parametrize(
    "value", ["", "x" * 129, "has space", "slash/y", "new\tline", "ünï", "a;b", "../etc"]
)
def test_a_malformed_request_id_is_a_400_naming_the_header(value):
    with pytest.raises(APIError) as err:
        client_request_id(request_with((REQUEST_ID_HEADER, value)))
    assert err.value.status == 400 and err.value.param == REQUEST_ID_HEADER
    assert err.value.code == "invalid_request_id"


def test_engine_ids_differ_when_two_requests_repeat_an_id():
    a, b = RequestContext("chat", None), RequestContext("chat", None)  # type: ignore[arg-type]
    for ctx in (a, b):
        ctx.named_by(request_with((REQUEST_ID_HEADER, "same")))
        ctx.done("ok")
    assert a.request_id == b.request_id == "same" and a.engine_id != b.engine_id


async def test_the_id_comes_back_in_the_header_and_the_completion_id(server_url):
    body = {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 4, "parallelism": 2}
    async with httpx.AsyncClient(base_url=server_url, timeout=None) as http:
        plain, repeated = await asyncio.gather(
            *(
                http.post("/v1/chat/completions", json=body, headers={REQUEST_ID_HEADER: "rid-1"})
                for _ in range(2)
            )
        )
        for reply in (plain, repeated):  # the same id twice at once: both run
            assert reply.status_code == 200, reply.text
            assert reply.headers[REQUEST_ID_HEADER] == "rid-1" and reply.json()["id"] == "chatcmpl-rid-1"
        async with http.stream(
            "POST",
            "/v1/chat/completions",
            json={**body, "stream": True},
            headers={REQUEST_ID_HEADER: "rid-2"},
        ) as streamed:
            assert streamed.status_code == 200 and streamed.headers[REQUEST_ID_HEADER] == "rid-2"
            chunks = [
                json.loads(line.removeprefix("data:"))
                async for line in streamed.aiter_lines()
                if line.startswith("data:") and line.strip() != "data: [DONE]"
            ]
        assert chunks and {c["id"] for c in chunks} == {"chatcmpl-rid-2"}
        completion = await http.post(
            "/v1/completions",
            json={"model": MODEL_NAME, "prompt": "2 + 3 =", "max_tokens": 2, "parallelism": 1},
            headers={REQUEST_ID_HEADER: "rid-3"},
        )
        assert completion.json()["id"] == "cmpl-rid-3" and completion.headers[REQUEST_ID_HEADER] == "rid-3"
        unnamed = await http.post("/v1/chat/completions", json=body)
        assert unnamed.json()["id"] == f"chatcmpl-{unnamed.headers[REQUEST_ID_HEADER]}"
        refused = await http.post("/v1/chat/completions", json=body, headers={REQUEST_ID_HEADER: "bad id"})
        assert assert_openai_error(refused, 400, "invalid_request_id")["param"] == REQUEST_ID_HEADER
