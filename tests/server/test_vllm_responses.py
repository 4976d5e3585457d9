"""What t2serve takes from vLLM's Responses layer (server/vllm_responses.py), pinned: the
names it relies on, vLLM's request model with t2serve's refusals, vLLM's item converters and
its streaming state machine. (The reasoning item on the real engine: test_vllm_openai.py.)"""

from __future__ import annotations

import pytest

from server import vllm_responses
from server.errors import APIError
from server.vllm_openai import ParsedOutput


def test_the_responses_names_t2serve_relies_on_exist():
    from vllm.entrypoints.openai.responses import streaming_events, utils

    fields = set(vllm_responses.responses_request_model().model_fields)
    assert vllm_responses.responses_sampling_fields() == {
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "seed",
        "stop",
        "stop_token_ids",
        "include_stop_str_in_output",
        "ignore_eos",
        "skip_special_tokens",
        "logit_bias",
        "structured_outputs",
        "parallel_tool_calls",
        "include_reasoning",
    }
    assert fields >= vllm_responses.RESPONSES_OWN_FIELDS | vllm_responses.RESPONSES_INERT_FIELDS
    for name in ("construct_input_messages", "construct_tool_dicts", "build_response_output_items"):
        assert callable(getattr(utils, name))
    assert callable(streaming_events.SimpleStreamingEventProcessor)


def test_vllms_responses_request_coerces_items_and_t2serve_refuses_by_name(caplog):
    request = vllm_responses.responses_request(
        {
            "input": [
                {"type": "function_call", "call_id": "call_1", "name": "add", "arguments": "{}"},
                {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "hm"}]},
            ],
            "include": [],  # what openai-agents always sends
            "service_tier": "auto",
            "no_such_field": 1,
        }
    )
    call, reasoning = request.input
    assert type(call).__name__ == "ResponseFunctionToolCall" and reasoning.id.startswith("rs_")
    assert "no_such_field" in caplog.text
    with pytest.raises(APIError) as err:
        vllm_responses.responses_request({"input": "x", "background": True})
    assert err.value.param == "background"
    with pytest.raises(APIError) as err:
        vllm_responses.responses_request(
            {"input": [{"role": "user", "content": "a"}, {"role": "x", "content": "b"}]}
        )
    assert err.value.param == "input.1" and "\n" not in err.value.message


def test_vllms_converter_drops_previous_system_messages_and_keeps_list_content():
    """Trap 1: vLLM leaves list content (and the item's `type`) in a message; server.responses
    flattens it to text, because t2serve renders with apply_chat_template directly."""
    request = vllm_responses.responses_request(
        {
            "instructions": "New.",
            "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "b"}]}],
        }
    )
    previous = [{"role": "system", "content": "Old."}, {"role": "user", "content": "a"}]
    messages = vllm_responses.responses_messages(request, previous)
    assert messages[:2] == [{"role": "system", "content": "New."}, {"role": "user", "content": "a"}]
    assert (
        messages[2]["content"] == [{"type": "input_text", "text": "b"}] and messages[2]["type"] == "message"
    )


def test_vllms_converter_failures_are_400s_naming_input():
    """Trap 2: an output message with no content part makes vLLM's converter index past the end."""
    request = vllm_responses.responses_request({"input": "x"})
    request.input = [vllm_responses.responses_output(ParsedOutput(None, "hi", None), [])[0]]
    request.input[0].content = []
    with pytest.raises(APIError) as err:
        vllm_responses.responses_messages(request, None)
    assert (err.value.status, err.value.param) == (400, "input")


def test_reasoning_effort_and_a_partial_message_reach_the_template_as_in_vllm():
    request = vllm_responses.responses_request({"input": "x", "reasoning": {"effort": "high"}})
    assert vllm_responses.responses_template_kwargs(request) == {
        "add_generation_prompt": True,
        "continue_final_message": False,
        "reasoning_effort": "high",
        "enable_thinking": True,
    }
    partial = {
        "type": "message",
        "role": "assistant",
        "status": "in_progress",
        "content": [{"type": "output_text", "text": "The"}],
    }
    request = vllm_responses.responses_request({"input": [{"role": "user", "content": "x"}, partial]})
    kwargs = vllm_responses.responses_template_kwargs(request)
    assert (kwargs["add_generation_prompt"], kwargs["continue_final_message"]) == (False, True)


def test_output_items_and_stream_events_carry_the_calls_ids():
    call = {"id": "call_7", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    parsed = ParsedOutput("think", "Sure.", [call])
    items = vllm_responses.responses_output(parsed, [])
    assert [item.type for item in items] == ["reasoning", "message", "function_call"]
    assert (items[2].call_id, items[2].name, items[2].arguments) == ("call_7", "add", '{"a": 1}')
    events, streamed = vllm_responses.responses_events(parsed, [])
    assert [item.type for item in streamed] == ["reasoning", "message", "function_call"]
    assert streamed[2].call_id == "call_7"
    assert [e.item.id for e in events if e.type == "response.output_item.done"] == [i.id for i in streamed]
    assert {e.sequence_number for e in events} == {-1}  # numbered by server.response_events
    assert vllm_responses.responses_output(ParsedOutput(None, None, None), []) == []
