"""Agent frameworks drive the server as their users point them at it, on the default set-up:
the embedded model with its tool-aware template and the `hermes` parser (tool_choice auto).

The 135M model rarely decides to call a tool by itself, so each tool loop forces the first
call (`required`, as an agent that must look something up does) and leaves the next turn on
the default `auto`, where the model answers from the tool's result."""

from __future__ import annotations

import pytest

from tests.conftest import MODEL_NAME

WEATHER_QUESTION = "What is the weather in Paris? Use the get_weather tool."


def get_weather(city: str) -> str:
    """Current weather in a city."""
    return f"sunny, 21 C in {city}"


async def test_langchain_bind_tools_with_the_default_tool_choice_answers(server_url):
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(model=MODEL_NAME, base_url=f"{server_url}/v1", api_key="none", max_tokens=48)
    # bind_tools sends no tool_choice: the server's default, auto (was a 400 without a parser).
    reply = await model.bind_tools([get_weather]).ainvoke(WEATHER_QUESTION)
    assert reply.tool_calls or reply.content
    for call in reply.tool_calls:
        assert call["name"] == "get_weather" and isinstance(call["args"], dict)


async def test_a_langchain_tool_loop_finishes(server_url):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(model=MODEL_NAME, base_url=f"{server_url}/v1", api_key="none", max_tokens=48)
    messages = [HumanMessage(WEATHER_QUESTION)]
    call_reply = await model.bind_tools([get_weather], tool_choice="required").ainvoke(messages)
    (call,) = call_reply.tool_calls  # parallel_tool_calls defaults to true; one call is voted
    assert call["name"] == "get_weather" and set(call["args"]) == {"city"}
    messages += [call_reply, ToolMessage(get_weather(**call["args"]), tool_call_id=call["id"])]
    # The call and its result render through the template; auto may answer or call again.
    final = await model.bind_tools([get_weather]).ainvoke(messages)
    assert final.content or final.tool_calls


async def test_openai_agents_runs_a_tool_round_trip_on_chat_completions(server_url):
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)  # else the SDK exports traces to api.openai.com
    calls: list[str] = []

    @function_tool
    def get_weather_tool(city: str) -> str:
        """Current weather in a city."""
        calls.append(city)
        return get_weather(city)

    client = AsyncOpenAI(base_url=f"{server_url}/v1", api_key="none")
    agent = Agent(
        name="weather",
        instructions="You answer questions about the weather.",
        tools=[get_weather_tool],
        model=OpenAIChatCompletionsModel(model=MODEL_NAME, openai_client=client),
        # reset_tool_choice (the default) puts the turn after the call back on auto.
        model_settings=ModelSettings(tool_choice="required", max_tokens=48),
    )
    result = await Runner.run(agent, WEATHER_QUESTION, max_turns=6)
    assert calls and all(isinstance(city, str) for city in calls)
    assert isinstance(result.final_output, str)


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
async def test_langchain_structured_output_returns_the_schemas_object(server_url, method):
    """function_calling is a named tool_choice: under the default parser it runs through
    hermes' structural tag, with the tool's parameters pinned (--tool-strict-level parameter)."""
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel

    class City(BaseModel):
        """A city and its country."""

        name: str
        country: str

    model = ChatOpenAI(model=MODEL_NAME, base_url=f"{server_url}/v1", api_key="none", max_tokens=200, seed=0)
    city = await model.with_structured_output(City, method=method).ainvoke("Name a city in France.")
    assert isinstance(city, City)
