"""`/tokenize` and `/detokenize`, with vLLM's request and response shapes: a prompt's token
ids exactly as the engine gets them (chat through the same template and tools as chat
completions, server.prompts), and text back from ids. No samples, no admission slot."""

from __future__ import annotations

from typing import Any

from server import prompts
from server.errors import APIError, check_model
from server.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)

# Fields of vLLM's tokenize request that would change the result and that t2serve does not
# honour (it renders with the model's own template, text only): refused, never dropped.
REFUSED_FIELDS = ("chat_template", "media_io_kwargs", "mm_processor_kwargs")


class Tokens:
    def __init__(self, tokenizer: Any, model_name: str, max_model_len: int):
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len

    def tokenize(self, request: TokenizeChatRequest | TokenizeCompletionRequest) -> TokenizeResponse:
        self._check(request)
        if isinstance(request, TokenizeChatRequest):
            if request.continue_final_message and request.add_generation_prompt:
                raise APIError(
                    400,
                    "continue_final_message and add_generation_prompt cannot both be true",
                    param="continue_final_message",
                    code="invalid_value",
                )
            ids = prompts.chat_prompt(
                self.tokenizer,
                request.messages,
                tools=request.tools,
                add_generation_prompt=request.add_generation_prompt,
                continue_final_message=request.continue_final_message,
                chat_template_kwargs=request.chat_template_kwargs,
                add_special_tokens=request.add_special_tokens,
            )
        else:
            ids = list(self.tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens))
        return TokenizeResponse(
            count=len(ids),
            max_model_len=self.max_model_len,
            tokens=ids,
            token_strs=self.tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None,
        )

    def detokenize(self, request: DetokenizeRequest) -> DetokenizeResponse:
        self._check(request)
        vocab = len(self.tokenizer)
        if any(t < 0 or t >= vocab for t in request.tokens):
            raise APIError(400, f"token ids must lie in [0, {vocab})", param="tokens", code="invalid_value")
        return DetokenizeResponse(prompt=self.tokenizer.decode(request.tokens))

    def _check(self, request: Any) -> None:
        check_model(request.model, self.model_name)
        for name in REFUSED_FIELDS:
            if (request.model_extra or {}).get(name) is not None:
                raise APIError(
                    400, f"`{name}` is not supported by t2serve", param=name, code="unsupported_parameter"
                )
