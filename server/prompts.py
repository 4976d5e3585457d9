"""Prompts as token ids: chat messages through the model's chat template, completion
prompts as text or token ids. Every problem is a 400 naming the field, found before the
request takes an admission slot (server.serving.OpenAIServing.prepare)."""

from __future__ import annotations

from typing import Any

from server.errors import APIError
from server.protocol import ChatMessage, CompletionRequest


def render_chat(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    *,
    add_special_tokens: bool = False,
    **template_kwargs: Any,
) -> list[int]:
    """Chat messages -> prompt token ids, exactly as the server renders them (labeling and
    evaluation use this too, so the estimator sees the states the server will see).
    `template_kwargs` reach the chat template (add_generation_prompt, enable_thinking, ...)."""
    template_kwargs.setdefault("add_generation_prompt", True)
    text = tokenizer.apply_chat_template(messages, tokenize=False, **template_kwargs)
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))


def chat_prompt(
    tokenizer: Any,
    messages: list[ChatMessage],
    *,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    add_special_tokens: bool = False,
) -> list[int]:
    """A request's messages (and tools) rendered by the chat template (chat completions,
    /tokenize); 400 naming `messages` when the template rejects them."""
    rendered = []
    for m in messages:
        # Everything a message carries reaches the template (name, tool_calls,
        # tool_call_id, ...), with its content as text.
        message = {**m.model_dump(exclude_none=True), "content": m.text()}
        if m.role == "developer":
            message["role"] = "system"
        rendered.append(message)
    try:
        return render_chat(
            tokenizer,
            rendered,
            add_special_tokens=add_special_tokens,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            **({"tools": tools} if tools else {}),
            **(chat_template_kwargs or {}),
        )
    except Exception as exc:  # a template may reject role orders it does not support
        raise APIError(400, f"chat template rejected the messages: {exc}", param="messages") from exc


def completion_prompts(tokenizer: Any, request: CompletionRequest) -> list[list[int]]:
    """Each prompt of a completion request as token ids (text is encoded; ids are checked
    against the vocabulary)."""
    vocab = len(tokenizer)
    token_lists = []
    for p in request.prompts():
        if isinstance(p, str):
            ids = list(tokenizer.encode(p))
        else:
            if not p:
                raise APIError(400, "prompt token list must not be empty", param="prompt")
            if any(t < 0 or t >= vocab for t in p):
                raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
            ids = list(p)
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        token_lists.append(ids)
    return token_lists
