"""Property tests of the protocol against the real server: whatever a client sends, the
answer is a success or a well-formed OpenAI error with a 4xx (or the documented 503/504),
never a 500 or a traceback.

Two generators: hypothesis strategies that mix valid, out-of-range and wrongly typed values
per field (plus raw bytes), and schemathesis cases drawn from the app's own OpenAPI schema.
Generation cost is bounded (max_tokens <= 4, small n and N), the example counts are fixed
and derandomized so CI runs are repeatable. The sync HTTP clients run in a thread: the
server under test shares this event loop.
"""

from __future__ import annotations

import asyncio
import collections
import json
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import MODEL_NAME, wait_until

ALLOWED = {200, 400, 403, 404, 413, 503, 504}  # 403: an admin-only field (t2_explore) without the key
FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.floats(),  # NaN and infinities included: Python's json writes and reads them
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
NOTHING = st.nothing()
JSON = {"content-type": "application/json"}

message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"])},
    optional={"content": st.text(max_size=40), "name": st.text(max_size=8)},
)
token_ids = st.lists(st.integers(0, 49_151), min_size=1, max_size=6)
# field: (valid values, out-of-range values). Valid requests decode at most 4 tokens per
# sample with n <= 2 and N <= 4, so generation stays cheap.
SAMPLING = {
    "n": (st.integers(1, 2), st.integers(max_value=0) | st.integers(min_value=129)),
    "max_tokens": (st.integers(1, 4), st.integers(max_value=0) | st.integers(min_value=3000)),
    "temperature": (st.floats(0, 2), st.floats(min_value=2.0001) | st.floats(max_value=-0.0001)),
    "top_p": (st.floats(0.01, 1), st.floats(min_value=1.0001) | st.floats(max_value=0)),
    "top_k": (st.integers(-1, 50), st.integers(max_value=-2) | st.integers(min_value=2**31)),
    "seed": (st.integers(0, 2**62), st.integers(max_value=-1) | st.integers(min_value=2**62 + 1)),
    "stop": (
        st.lists(st.text(min_size=1, max_size=4), max_size=3) | st.text(min_size=1, max_size=4),
        st.just([""]),
    ),
    "stream": (st.booleans(), NOTHING),
    "ignore_eos": (st.booleans(), NOTHING),
    "parallelism": (st.integers(1, 3) | st.just("auto"), st.integers(max_value=0) | st.integers(17)),
    "max_parallelism": (st.integers(1, 4), st.integers(max_value=0)),
    "timeout": (st.floats(0.05, 30), st.floats(max_value=0) | st.floats(min_value=86_401)),
    "presence_penalty": (st.floats(-2, 2), st.floats(min_value=2.01)),
    "model": (st.just(MODEL_NAME), st.just("no-such-model")),
}
CHAT = {
    **SAMPLING,
    "messages": (
        st.lists(message, min_size=1, max_size=3),
        st.just([]) | st.lists(st.just({"role": "wizard"})),
    ),
    "logprobs": (st.booleans(), st.just([1])),
    "top_logprobs": (st.integers(0, 5), st.integers(21, 30)),
    "max_completion_tokens": SAMPLING["max_tokens"],
    "tools": (st.just([]), st.just([{"type": "function", "function": {"name": "f"}}])),
    "response_format": (
        st.just({"type": "text"}) | st.just({"type": "json_object"}),
        st.just({"type": "json_schema"}) | st.just({"type": "yaml"}),
    ),
    "tool_choice": (
        st.sampled_from(["none", "required", {"type": "function", "function": {"name": "f"}}]),
        st.just("sometimes") | st.just({"type": "function", "function": {"name": "g"}}),
    ),
    "parallel_tool_calls": (st.booleans(), st.just("both")),
    "include_reasoning": (st.booleans(), st.just([True])),
    "structured_outputs": (
        st.just({"regex": "[0-9]{1,3}"}) | st.just({"choice": ["yes", "no"]}),
        st.just({"regex": "(["}) | st.just({"json": {"type": "no-such-type"}}),
    ),
}
COMPLETION = {
    **SAMPLING,
    "prompt": (
        st.text(min_size=1, max_size=40)
        | st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=2)
        | token_ids
        | st.lists(token_ids, min_size=1, max_size=2),
        st.just([]) | st.just([[]]) | st.lists(st.integers(49_152, 10**6), min_size=1, max_size=2),
    ),
    "echo": (st.just(False), st.just(True)),
    "logprobs": (st.integers(0, 5), st.integers(21, 40)),
}
# /v1/responses: its own fields, and the extension fields it shares with chat.
FUNCTION_TOOL = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}
text_part = st.fixed_dictionaries(
    {"type": st.sampled_from(["input_text", "output_text"]), "text": st.text(max_size=20)}
)
input_item = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer", "user", "assistant"])},
        optional={"content": st.text(max_size=40), "type": st.just("message")},
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("message"),
            "role": st.just("user"),
            "content": st.lists(text_part, min_size=1, max_size=2),
        }
    ),
    st.just({"type": "function_call", "call_id": "call_1", "name": "f", "arguments": "{}"}),
    st.just({"type": "function_call_output", "call_id": "call_1", "output": "42"}),
    st.just({"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]}),
)
RESPONSES = {
    **{
        key: SAMPLING[key]
        for key in ("temperature", "top_p", "seed", "parallelism", "max_parallelism", "timeout")
    },
    "model": SAMPLING["model"],
    "input": (
        st.text(min_size=1, max_size=40) | st.lists(input_item, min_size=1, max_size=3),
        st.just([])
        | st.just([{"type": "item_reference", "id": "x"}])
        | st.just([{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}])
        | st.just(
            [{"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]}]
        )
        | st.just([{"type": "message", "role": "assistant", "content": []}]),
    ),
    "instructions": (st.text(max_size=20), st.just(["x"])),
    "max_output_tokens": (st.integers(1, 4), st.integers(max_value=0) | st.integers(min_value=3000)),
    "stream": (st.booleans(), NOTHING),
    "tools": (st.just([FUNCTION_TOOL]), st.just([{"type": "web_search"}]) | st.just([{"type": "function"}])),
    "tool_choice": (
        st.sampled_from(["none", "required", {"type": "function", "name": "f"}]),
        st.just("sometimes") | st.just({"type": "function", "name": "g"}) | st.just({"type": "mcp"}),
    ),
    "text": (
        st.just({"format": {"type": "text"}}) | st.just({"format": {"type": "json_object"}}),
        st.just({"format": {"type": "json_schema"}}) | st.just({"format": {"type": "yaml"}}),
    ),
    "reasoning": (st.just({"effort": "low"}), st.just({"effort": "galaxy"})),
    "store": (st.booleans(), st.just("maybe")),
    "previous_response_id": (st.none(), st.just("resp_unknown")),
    "metadata": (st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2), st.just({"k": 1})),
    "background": (st.just(False), st.just(True)),
    "include": (st.just([]), st.just(["message.output_text.logprobs"])),
}
REQUIRED = ("model", "max_tokens")


@st.composite
def bodies(draw: Any, fields: dict, required: tuple[str, ...]) -> dict:
    """A valid body, then 0-2 fields made out of range, wrongly typed or removed."""
    body = {key: draw(fields[key][0]) for key in required}
    for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=4, unique=True)):
        body[key] = draw(fields[key][0])
    for key in draw(st.lists(st.sampled_from(sorted(fields)), max_size=2, unique=True)):
        body[key] = draw(st.one_of(fields[key][1], JUNK))
    if draw(st.booleans()) and draw(st.booleans()):
        body.pop(draw(st.sampled_from(sorted(body))))
    return body


chat_bodies = bodies(CHAT, (*REQUIRED, "messages"))
completion_bodies = bodies(COMPLETION, (*REQUIRED, "prompt"))
responses_bodies = bodies(RESPONSES, ("model", "max_output_tokens", "input"))
# How a Responses stream ends (it sends no [DONE]).
RESPONSES_ENDS = {"response.completed", "response.failed"}
STATUSES: collections.Counter[int] = collections.Counter()
RESPONSE_REPLY = frozenset({"output", "t2"})


def check(
    response: Any, whole_stream: bool = True, reply: frozenset[str] = frozenset({"choices", "t2"})
) -> None:
    """A success (its JSON carrying the `reply` keys), or a well-formed OpenAI error with an
    allowed status. (schemathesis stops reading a stream after a few events:
    `whole_stream=False`.)"""
    status = response.status_code
    STATUSES[status] += 1
    assert status in ALLOWED, (status, response.text[:500])
    content_type = response.headers.get("content-type", "")
    if isinstance(content_type, list):  # schemathesis' responses list each header's values
        content_type = content_type[0]
    if status == 200:
        if content_type.startswith("text/event-stream"):
            # SSE lines end at \n only; a sample's text may hold other line breaks (U+2028, ...).
            events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
            if "output" in reply:  # /v1/responses
                assert json.loads(events[-1])["type"] in RESPONSES_ENDS or not whole_stream
                events.append("[DONE]")
            assert events[-1] == "[DONE]" or not whole_stream
            for event in events[:-1]:
                payload = json.loads(event)
                assert "error" not in payload or set(payload["error"]) == {"message", "type", "param", "code"}
        else:
            body = response.json()
            assert reply <= set(body) and body.get("choices", True)
        return
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and isinstance(error["type"], str)


@pytest.mark.slow
async def test_fuzz_fields_and_raw_bodies(server_url, engine):
    def run() -> None:
        with httpx.Client(base_url=server_url, timeout=120) as http:

            @FUZZ
            @given(body=chat_bodies)
            def chat(body: dict) -> None:
                check(http.post("/v1/chat/completions", content=json.dumps(body), headers=JSON))

            @FUZZ
            @given(body=completion_bodies)
            def completion(body: dict) -> None:
                check(http.post("/v1/completions", content=json.dumps(body), headers=JSON))

            @FUZZ
            @given(body=responses_bodies)
            def responses(body: dict) -> None:
                check(
                    http.post("/v1/responses", content=json.dumps(body), headers=JSON), reply=RESPONSE_REPLY
                )

            @settings(FUZZ, max_examples=40)
            @given(
                raw=st.binary(max_size=300),
                path=st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/responses"]),
                content_type=st.sampled_from(
                    ["application/json", "text/plain", "application/x-www-form-urlencoded"]
                ),
            )
            def raw_bytes(raw: bytes, path: str, content_type: str) -> None:
                check(http.post(path, content=raw, headers={"content-type": content_type}))

            chat()
            completion()
            responses()
            raw_bytes()

    STATUSES.clear()
    await asyncio.wait_for(asyncio.to_thread(run), 600)
    print(f"\nfuzz statuses: {dict(STATUSES)}")
    assert STATUSES[200] >= 20 and STATUSES[400] >= 20  # both paths were exercised
    assert await wait_until(lambda: engine.num_unfinished_requests() == 0)


def bounded(body: Any, length: str = "max_tokens") -> Any:
    """Keep schema-valid bodies cheap: at most 4 tokens, 2 choices, N <= 3 (pydantic also
    takes 19.0 or "19" for an int, so any number-like value is capped). `length`: the
    path's name for max_tokens."""
    if not isinstance(body, dict):
        return body
    body["model"] = MODEL_NAME  # otherwise nearly every case stops at 404
    lengths = (("max_tokens", 4), ("max_completion_tokens", 4), ("max_output_tokens", 4))
    for key, top in (*lengths, ("n", 2), ("parallelism", 3)):
        if (number_like(body.get(key)) or 0) > top:
            body[key] = top
    body.setdefault(length, 4)
    return body


def number_like(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


@pytest.mark.slow
async def test_schemathesis_against_the_openapi_schema(server_url, server_settings, engine):
    import schemathesis

    from server.app import create_app

    schema = schemathesis.openapi.from_dict(create_app(server_settings).openapi())

    # What a success carries, per path: the completions' choices and `t2`, vLLM's tokenize shapes.
    replies = {
        "/v1/chat/completions": frozenset({"choices", "t2"}),
        "/v1/completions": frozenset({"choices", "t2"}),
        "/tokenize": frozenset({"count", "tokens", "max_model_len"}),
        "/detokenize": frozenset({"prompt"}),
        "/v1/responses": RESPONSE_REPLY,
    }

    def fuzz(path: str, reply: frozenset[str]) -> None:
        @settings(FUZZ, max_examples=40 if path.startswith("/v1/") else 20)
        @given(case=schema[path]["POST"].as_strategy())
        def call(case: Any) -> None:
            case.body = bounded(case.body, "max_output_tokens" if path == "/v1/responses" else "max_tokens")
            check(case.call(base_url=server_url, timeout=120), whole_stream=False, reply=reply)

        call()

    def run() -> None:
        for path, reply in replies.items():
            fuzz(path, reply)

    STATUSES.clear()
    await asyncio.wait_for(asyncio.to_thread(run), 600)
    print(f"\nschemathesis statuses: {dict(STATUSES)}")
    assert STATUSES[200] >= 5  # schema-valid cases reach the engine
    assert await wait_until(lambda: engine.num_unfinished_requests() == 0)
