"""openai-agents on its default model, the Responses API (OpenAIResponsesModel), against the
real server: `Runner.run` and `Runner.run_streamed` with a `function_tool` complete a tool
round trip.

The embedded 135M model does not call tools on its own, so the first turn asks for a call
(`tool_choice="required"`); the agent's `reset_tool_choice` (on by default) sends the next turn
without it, i.e. `auto`, which needs a tool-call parser: the server here runs hermes. Greedy
sampling (temperature 0) keeps the run the same every time."""

from __future__ import annotations

from tests.conftest import MODEL_NAME
from tests.server.helpers import client_for, serve


async def test_runner_completes_a_tool_round_trip_over_the_responses_api(engine, server_settings):
    from agents import Agent, ModelSettings, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # traces would go to api.openai.com
    calls: list[tuple[int, int]] = []

    @function_tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        calls.append((a, b))
        return a + b

    parallelism = server_settings.parallelism.model_copy(update={"tool_call_parser": "hermes"})
    settings = server_settings.model_copy(update={"parallelism": parallelism})
    async with serve(engine, settings) as (url, _), client_for(url) as client:
        agent = Agent(
            name="calculator",
            instructions="Use the add tool to add numbers, then state the result.",
            tools=[add],
            model=OpenAIResponsesModel(model=MODEL_NAME, openai_client=client),
            model_settings=ModelSettings(tool_choice="required", temperature=0.0, max_tokens=60),
        )
        result = await Runner.run(agent, "What is 2 + 3?", max_turns=4)
        streamed = Runner.run_streamed(agent, "What is 2 + 3?", max_turns=4)  # over the SSE events
        events = [event.type async for event in streamed.stream_events()]
    assert len(calls) == 2  # each run's required first turn called the tool with valid arguments
    assert "raw_response_event" in events and streamed.final_output == result.final_output
    kinds = [item.type for item in result.new_items]
    assert kinds[:2] == ["tool_call_item", "tool_call_output_item"]
    assert kinds[-1] == "message_output_item" and isinstance(result.final_output, str)
    assert len(result.raw_responses) == 2  # the call, then the answer under `auto`
