"""/v1/responses (server/responses.py, server/response_events.py): first the conversion of a
Responses request into the chat request the server runs, and of a winner into a Response,
without the engine; then end to end with the official SDK's `client.responses` on the real
engine: plain, streamed, a function tool round trip, text.format json_schema,
previous_response_id, the store's 400s, GET, DELETE and cancel.

The embedded 135M model never calls a tool on its own, so the round trip's first turn uses
tool_choice "required" (constrained); the final turn uses "none"."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from server import response_events, responses
from server.config import ResponsesSettings
from server.errors import APIError
from server.protocol import ChatMessageOut, ResponsesCreateRequest, Usage
from server.response_store import ResponseStore
from tests.conftest import MODEL_NAME, wait_until
from tests.server.helpers import assert_openai_error, client_for, metric, serve, settings_with

ADD = {
    "type": "function",
    "name": "add",
    "description": "Add two integers.",
    "parameters": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
}
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
SHORT = {"max_output_tokens": 6}


def begin(body: dict, store: ResponseStore | None = None) -> responses.ResponsesTurn:
    store = store or ResponseStore(ResponsesSettings())
    return responses.begin(ResponsesCreateRequest.model_validate(body), store, MODEL_NAME)


def refused(body: dict, store: ResponseStore | None = None) -> APIError:
    with pytest.raises(APIError) as err:
        begin(body, store)
    assert err.value.status == 400
    return err.value


# -- the conversion, without the engine ---------------------------------------------------


def test_a_string_input_with_instructions_and_extension_fields_becomes_a_chat_request():
    turn = begin(
        {
            "input": "hi",
            "instructions": "Be brief.",
            "max_output_tokens": 8,
            "temperature": 0.5,
            "metadata": {"k": "v"},
            "parallelism": 3,
            "policy": "esc",
            "max_total_tokens": 100,
        }
    )
    chat = turn.chat
    assert chat.model == MODEL_NAME
    assert [m.model_dump(exclude_none=True) for m in chat.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert (chat.max_completion_tokens, chat.temperature) == (8, 0.5)
    assert (chat.parallelism, chat.policy, chat.max_total_tokens) == (3, "esc", 100)
    assert turn.id.startswith("resp_") and turn.asked_store is None and not turn.stream


def test_items_become_chat_messages_with_calls_results_and_text_content():
    turn = begin(
        {
            "input": [
                {
                    "role": "user",
                    "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}],
                },
                {
                    "type": "function_call",
                    "call_id": "call_1",
                    "name": "add",
                    "arguments": '{"a": 2, "b": 3}',
                },
                {"type": "function_call_output", "call_id": "call_1", "output": "5"},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "It is 5."}],
                },
            ],
            "tools": [ADD],
            "tool_choice": {"type": "function", "name": "add"},
            "text": {"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}},
            "reasoning": {"effort": "low"},
        }
    )
    messages = [m.model_dump(exclude_none=True) for m in turn.chat.messages]
    assert messages == [
        {"role": "user", "content": "ab"},
        {
            "role": "assistant",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'},
                }
            ],
        },
        {"role": "tool", "content": "5", "tool_call_id": "call_1"},
        {"role": "assistant", "content": "It is 5."},
    ]
    extra = turn.chat.model_extra
    assert extra["tools"][0]["function"]["name"] == "add"
    assert extra["tool_choice"] == {"type": "function", "function": {"name": "add"}}
    assert extra["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    # reasoning.effort reaches the template as vLLM's build_chat_params passes it.
    assert turn.chat.chat_template_kwargs == {"reasoning_effort": "low", "enable_thinking": True}


def test_a_continuation_drops_the_previous_instructions_and_keeps_its_calls():
    store = ResponseStore(ResponsesSettings())
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    assert store.reserve("resp_a", None)
    store.put(
        "resp_a",
        {},
        [
            {"role": "system", "content": "Old."},
            {"role": "user", "content": "add"},
            {"role": "assistant", "tool_calls": [call]},
        ],
    )
    turn = begin(
        {
            "input": [{"type": "function_call_output", "call_id": "call_1", "output": "5"}],
            "instructions": "New.",
            "previous_response_id": "resp_a",
        },
        store,
    )
    assert [m.model_dump(exclude_none=True) for m in turn.chat.messages] == [
        {"role": "system", "content": "New."},
        {"role": "user", "content": "add"},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "content": "5", "tool_call_id": "call_1"},
    ]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0"),
        # vLLM's converter raises AttributeError / IndexError on these two (trap 2)
        (
            {
                "input": [
                    {"role": "user", "content": "hi"},
                    {
                        "type": "message",
                        "role": "assistant",
                        "content": [{"type": "refusal", "refusal": "no"}],
                    },
                ]
            },
            "input.1",
        ),
        ({"input": [{"type": "message", "role": "assistant", "content": []}]}, "input.0"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0"),
        ({"input": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]}, "input.1"),
        ({"input": [{"type": "reasoning", "summary": [], "encrypted_content": "zz"}]}, "input"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0"),
        ({"input": "x", "tools": [ADD], "tool_choice": {"type": "function", "name": "sub"}}, "tool_choice"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"input": "x", "text": {"format": {"type": "yaml"}}}, "text.format"),
        ({"input": "x", "reasoning": {"effort": "galaxy"}}, "reasoning.effort"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "include": ["message.output_text.logprobs"]}, "include"),
        ({"input": "x", "truncation": "auto"}, "truncation"),
        ({"input": "x", "max_tool_calls": 2}, "max_tool_calls"),
        ({"input": "x", "parallelism": 0}, "parallelism"),
        ({"input": "x", "previous_response_id": "resp_unknown"}, "previous_response_id"),
    ],
)
def test_every_malformed_input_is_a_400_naming_its_field(body, param):
    error = refused(body)
    assert error.param == param, error.message
    assert "\n" not in error.message and len(error.message) < 300


def test_chat_400s_are_renamed_to_the_responses_fields():
    error = APIError(
        400, "max_completion_tokens 5000 + prompt 10 tokens exceeds", param="max_completion_tokens"
    )
    responses.rename(error)
    assert error.param == "max_output_tokens" and error.message.startswith("max_output_tokens 5000")
    error = APIError(400, "bad", param="response_format")
    responses.rename(error)
    assert error.param == "text.format"
    error = APIError(400, "bad", param="parallelism")
    responses.rename(error)
    assert error.param == "parallelism"


def usage() -> Usage:
    return Usage(
        prompt_tokens=10,
        completion_tokens=40,
        total_tokens=50,
        prompt_tokens_details={"cached_tokens": 8},
        completion_tokens_details={"reasoning_tokens": 12},
    )


def t2() -> object:
    from server.protocol import T2Info

    return T2Info(
        mode="fixed",
        n_used=4,
        n_max=4,
        max_parallelism=4,
        samples=4,
        estimator="default",
        policy="fixed:n=4",
        launched=4,
        finished=4,
        aborted=0,
        answer="5",
        votes={"5": 4},
        agreement=1.0,
    )


def test_a_winner_becomes_a_response_with_items_usage_and_t2_and_is_stored():
    store = ResponseStore(ResponsesSettings())
    turn = begin({"input": "add", "tools": [ADD], "tool_choice": "required", "metadata": {"k": "v"}}, store)
    turn.stored = store.reserve(turn.id, None)
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    message = ChatMessageOut(content="Sure.", reasoning="think", tool_calls=[call])
    response, events = responses.finish(turn, message, "stop", usage(), t2(), store, streamed=False)
    assert events == []
    assert [item.type for item in response.output] == ["reasoning", "message", "function_call"]
    assert response.output[2].call_id == "call_1" and response.output_text == "Sure."
    assert (response.status, response.store, response.metadata) == ("completed", True, {"k": "v"})
    u = response.usage
    assert (u.input_tokens, u.output_tokens, u.total_tokens) == (10, 40, 50)
    assert (u.input_tokens_details.cached_tokens, u.output_tokens_details.reasoning_tokens) == (8, 12)
    dumped = response.model_dump(mode="json", by_alias=True)
    assert dumped["t2"]["n_used"] == 4 and dumped["tools"][0]["name"] == "add"
    assert store.response(turn.id) == dumped
    # the transcript keeps the winner's calls for a continuation
    assert store.transcript(turn.id)[-1] == {
        "role": "assistant",
        "content": "Sure.",
        "reasoning": "think",
        "tool_calls": [call],
    }


def test_a_winner_cut_at_max_output_tokens_is_incomplete():
    turn = begin({"input": "x", "text": {"format": {"type": "json_object"}}})
    message = ChatMessageOut(content="{")
    store = ResponseStore(ResponsesSettings())
    response, _ = responses.finish(turn, message, "length", usage(), t2(), store, streamed=False)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.text.format.type == "json_object"
    assert len(store) == 0  # it held no room


def events_of(frames: list[str]) -> list[dict]:
    parsed = []
    for piece in frames:
        event, data = piece.strip("\n").split("\n")
        body = json.loads(data.removeprefix("data: "))
        assert event == f"event: {body['type']}"
        parsed.append(body)
    return parsed


async def test_a_stream_announces_each_item_then_completes_with_the_same_ids():
    store = ResponseStore(ResponsesSettings())
    turn = begin({"input": "add", "tools": [ADD], "tool_choice": "required", "stream": True}, store)
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2}'}}
    message = ChatMessageOut(content="Sure.", tool_calls=[call])

    async def outcome():
        return responses.finish(turn, message, "stop", usage(), t2(), store, streamed=True)

    events = events_of([piece async for piece in response_events.stream(turn, outcome)])
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    announced = [e["item"]["id"] for e in events if e["type"] == "response.output_item.done"]
    assert [item["id"] for item in final["output"]] == announced
    assert final["output"][1]["call_id"] == "call_1" and final["t2"]["n_used"] == 4


async def test_a_failure_after_the_stream_opened_is_an_error_event_then_response_failed():
    turn = begin({"input": "x", "stream": True})

    async def outcome():
        raise APIError(504, "no sample finished before the deadline", code="timeout")

    events = events_of([piece async for piece in response_events.stream(turn, outcome)])
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "error",
        "response.failed",
    ]
    assert (events[2]["code"], events[2]["message"]) == ("timeout", "no sample finished before the deadline")
    assert events[3]["response"]["status"] == "failed"
    assert events[3]["response"]["error"]["code"] == "server_error"
    assert all("error" not in e for e in events)  # the SDK raises on a top-level `error` key


# -- end to end, the official SDK on the real engine ----------------------------------------


async def test_plain_response_with_parallel_thinking_then_get_and_delete(client, engine):
    requests_before = metric("t2serve_requests_total", endpoint="responses", mode="fixed", outcome="ok")
    response = await client.responses.create(
        model=MODEL_NAME,
        input="What is 2 + 3? Reply with just the number.",
        instructions="You are a calculator.",
        metadata={"suite": "responses"},
        extra_body={"parallelism": 3, **SHORT},
    )
    assert response.id.startswith("resp_") and response.object == "response"
    assert response.status in ("completed", "incomplete")
    assert response.output[0].type == "message" and isinstance(response.output_text, str)
    assert response.store is True and response.metadata == {"suite": "responses"}
    info = response.model_extra["t2"]
    assert info["n_used"] == 3 and info["samples"] == 3
    usage = response.usage
    assert usage.output_tokens >= info["samples"]  # every sample's tokens, not only the winner's
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert (
        metric("t2serve_requests_total", endpoint="responses", mode="fixed", outcome="ok")
        == requests_before + 1
    )

    fetched = await client.responses.retrieve(response.id)
    assert fetched.id == response.id and fetched.output_text == response.output_text
    await client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(response.id)
    assert await wait_until(lambda: engine.num_unfinished_requests() == 0)


async def test_a_response_cut_at_max_output_tokens_is_incomplete(client):
    response = await client.responses.create(
        model=MODEL_NAME, input="Count to twenty.", max_output_tokens=2, extra_body={"ignore_eos": True}
    )
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"


async def test_streamed_events_in_order_with_the_final_response(client):
    stream = await client.responses.create(
        model=MODEL_NAME,
        input="What is 2 + 3? Reply with just the number.",
        stream=True,
        extra_body={"parallelism": 2, "temperature": 0.7, **SHORT},
    )
    events = [event async for event in stream]
    types = [event.type for event in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert types[-1] == "response.completed"  # its status says whether the winner was cut
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [event.sequence_number for event in events] == list(range(len(events)))
    final = events[-1].response
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert final.output_text == deltas == events[-4].text
    assert final.output[0].id == events[2].item.id
    assert final.model_extra["t2"]["samples"] == 2


async def test_the_sdks_stream_helper_accumulates_the_events_into_the_response(client):
    """`client.responses.stream` rebuilds the response from the events and checks their order."""
    async with client.responses.stream(
        model=MODEL_NAME, input="Name a colour.", extra_body={"parallelism": 2, **SHORT}
    ) as stream:
        texts = [event.delta async for event in stream if event.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert final.output_text == "".join(texts) and final.model_extra["t2"]["samples"] == 2


async def test_a_stream_sends_keepalive_comments_while_the_vote_runs(engine, server_settings):
    """~1800 forced decode steps against a 50 ms keep-alive: the vote cannot end first."""
    async with serve(engine, settings_with(server_settings, sse_keepalive_s=0.05)) as (url, _):
        body = {
            "model": MODEL_NAME,
            "input": "Count to a thousand.",
            "max_output_tokens": 1800,
            "ignore_eos": True,
            "parallelism": 2,
            "stream": True,
        }
        lines: list[str] = []
        async with (
            httpx.AsyncClient(timeout=None) as http,
            http.stream("POST", f"{url}/v1/responses", json=body) as response,
        ):
            assert response.status_code == 200
            async for line in response.aiter_lines():
                lines.append(line)
                if line.startswith(":"):
                    break  # leave: the server must abort the samples
    assert lines[0] == "event: response.created"
    assert lines[-1].startswith(": ping")
    assert await wait_until(lambda: engine.num_unfinished_requests() == 0)


async def test_a_function_tool_round_trip(client):
    question = {"role": "user", "content": "What is 2 + 3? Use the add tool."}
    first = await client.responses.create(
        model=MODEL_NAME,
        input=[question],
        tools=[ADD],
        tool_choice="required",
        extra_body={"parallelism": 2, "max_output_tokens": 60},
    )
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls and calls[0].name == "add" and calls[0].call_id
    json.loads(calls[0].arguments)  # the parser read a JSON call (its fields are the model's)

    final = await client.responses.create(
        model=MODEL_NAME,
        input=[
            question,
            calls[0].model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "5"},
        ],
        tools=[ADD],
        tool_choice="none",
        extra_body=SHORT,
    )
    assert final.output[0].type == "message" and final.output_text
    assert not [item for item in final.output if item.type == "function_call"]


async def test_text_format_json_schema_votes_on_the_canonical_json(client):
    response = await client.responses.create(
        model=MODEL_NAME,
        input="Invent a person.",
        text={"format": {"type": "json_schema", "name": "person", "schema": PERSON, "strict": True}},
        extra_body={"parallelism": 3, "max_output_tokens": 40},
    )
    person = json.loads(response.output_text)
    assert set(person) == {"name", "age"}
    info = response.model_extra["t2"]
    assert info["aggregate"] == "json"
    assert json.loads(info["answer"]) == person


async def test_previous_response_id_continues_with_the_stored_calls(engine, server_settings):
    async with serve(engine, server_settings) as (url, app):
        store = app.state.serving.response_store
        async with client_for(url) as sdk:
            first = await sdk.responses.create(
                model=MODEL_NAME,
                input="What is 2 + 3? Use the add tool.",
                instructions="Use tools.",
                tools=[ADD],
                tool_choice="required",
                extra_body={"parallelism": 1, "max_output_tokens": 60},
            )
            calls = [item for item in first.output if item.type == "function_call"]
            assert calls, first.output
            call = calls[0]
            transcript = store.transcript(first.id)
            assert transcript[0] == {"role": "system", "content": "Use tools."}
            assert transcript[-1]["tool_calls"][0]["id"] == call.call_id  # kept, unlike vLLM's store
            second = await sdk.responses.create(
                model=MODEL_NAME,
                input=[{"type": "function_call_output", "call_id": call.call_id, "output": "5"}],
                previous_response_id=first.id,
                tools=[ADD],
                tool_choice="none",
                extra_body=SHORT,
            )
            assert second.previous_response_id == first.id and second.output_text
            # the second turn rendered the first one (question, call) and its result
            assert second.usage.input_tokens > first.usage.input_tokens
            messages = store.transcript(second.id)
            assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant"]


async def test_the_store_off_or_full_and_unknown_ids_are_precise_400s(engine, server_settings):
    off = server_settings.model_copy(update={"responses": ResponsesSettings(store=False)})
    async with serve(engine, off) as (url, _), httpx.AsyncClient(base_url=url, timeout=None) as http:
        body = {"model": MODEL_NAME, "input": "hi", **SHORT}
        error = assert_openai_error(await http.post("/v1/responses", json={**body, "store": True}), 400)
        assert error["param"] == "store" and "--no-store" in error["message"]
        reply = await http.post("/v1/responses", json=body)
        assert reply.status_code == 200 and reply.json()["store"] is False
        assert_openai_error(await http.get(f"/v1/responses/{reply.json()['id']}"), 404)

    full = server_settings.model_copy(update={"responses": ResponsesSettings(response_store_size=1)})
    async with serve(engine, full) as (url, _), httpx.AsyncClient(base_url=url, timeout=None) as http:
        kept = await http.post("/v1/responses", json={**body, "store": True})
        assert kept.status_code == 200 and kept.json()["store"] is True
        error = assert_openai_error(await http.post("/v1/responses", json={**body, "store": True}), 400)
        assert error["param"] == "store" and "full" in error["message"]
        skipped = await http.post("/v1/responses", json=body)
        assert skipped.status_code == 200 and skipped.json()["store"] is False
        error = assert_openai_error(
            await http.post("/v1/responses", json={**body, "previous_response_id": "resp_nope"}), 400
        )
        assert error["param"] == "previous_response_id" and "not found" in error["message"]
        deleted = await http.delete(f"/v1/responses/{kept.json()['id']}")
        assert deleted.json() == {"id": kept.json()["id"], "object": "response.deleted", "deleted": True}
        error = assert_openai_error(
            await http.post("/v1/responses", json={**body, "previous_response_id": kept.json()["id"]}), 400
        )
        assert "deleted" in error["message"]


async def test_routes_refuse_what_t2serve_does_not_run(server_url):
    async with httpx.AsyncClient(base_url=server_url, timeout=None) as http:
        body = {"model": MODEL_NAME, "input": "hi", **SHORT}
        error = assert_openai_error(await http.post("/v1/responses", json={**body, "background": True}), 400)
        assert error["param"] == "background"
        error = assert_openai_error(
            await http.post("/v1/responses", json={**body, "max_output_tokens": 100_000}), 400
        )
        assert error["param"] == "max_output_tokens" and "max_output_tokens" in error["message"]
        assert_openai_error(await http.post("/v1/responses", json={**body, "model": "nope"}), 404)
        stored = (await http.post("/v1/responses", json=body)).json()
        error = assert_openai_error(await http.post(f"/v1/responses/{stored['id']}/cancel"), 400)
        assert "background" in error["message"]
        assert_openai_error(await http.post("/v1/responses/resp_nope/cancel"), 404)
        assert_openai_error(await http.get("/v1/responses/resp_nope"), 404)
