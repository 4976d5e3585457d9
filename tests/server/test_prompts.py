"""Chat rendering (server/prompts.py): template variables and vLLM's template fields
change the prompt; tool turns render."""

from __future__ import annotations

from tests.conftest import MODEL_NAME
from tests.server.helpers import QUESTION


def test_chat_template_kwargs_reach_the_template(model_dir):
    """`chat_template_kwargs` (e.g. `enable_thinking`) are template variables, as in vLLM."""
    from transformers import AutoTokenizer

    from server.prompts import render_chat

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% if enable_thinking %} <think>{% endif %}{% endif %}"
    )
    messages = [{"role": "user", "content": "hi"}]
    thinking = tokenizer.decode(render_chat(tokenizer, messages, enable_thinking=True))
    plain = tokenizer.decode(render_chat(tokenizer, messages, enable_thinking=False))
    assert thinking.endswith("assistant: <think>") and plain.endswith("assistant:")
    assert not tokenizer.decode(render_chat(tokenizer, messages, add_generation_prompt=False)).endswith(
        "assistant:"
    )


async def test_template_fields_and_tool_messages_reach_the_chat_template(client):
    """`add_generation_prompt` / `continue_final_message` change the rendered prompt, and an
    assistant turn with `tool_calls` plus a `tool` reply render without error."""
    base = await client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=1)
    bare = await client.chat.completions.create(
        model=MODEL_NAME, messages=QUESTION, max_tokens=1, extra_body={"add_generation_prompt": False}
    )
    assert bare.usage.prompt_tokens < base.usage.prompt_tokens
    resumed = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[*QUESTION, {"role": "assistant", "content": "The answer is"}],
        max_tokens=1,
        extra_body={"add_generation_prompt": False, "continue_final_message": True},
    )
    assert resumed.usage.prompt_tokens > bare.usage.prompt_tokens
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    turn = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[
            *QUESTION,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        ],
        max_tokens=2,
    )
    assert turn.choices[0].message.content is not None
