"""/tokenize, /detokenize and /version (server/tokens.py): vLLM's shapes, the ids the engine
gets, and their errors; on the session's real server."""

from __future__ import annotations

import httpx
import pytest

from server import protocol, vllm_openai
from tests.conftest import MODEL_NAME


@pytest.mark.parametrize("name", sorted(vllm_openai.vllm_tokenize_models()))
def test_the_shapes_are_vllms(name):
    ours, theirs = getattr(protocol, name), vllm_openai.vllm_tokenize_models()[name]
    assert set(ours.model_fields) <= set(theirs.model_fields)
    for field, info in ours.model_fields.items():
        if not info.is_required():
            assert info.get_default() == theirs.model_fields[field].get_default(), field


async def test_tokenize_chat_gives_the_ids_chat_completions_run_on(server_url, engine):
    from server.prompts import chat_prompt
    from server.protocol import ChatMessage

    messages = [{"role": "user", "content": "What is 7 + 5?"}]
    async with httpx.AsyncClient(base_url=server_url, timeout=60) as http:
        reply = (
            await http.post(
                "/tokenize", json={"model": MODEL_NAME, "messages": messages, "return_token_strs": True}
            )
        ).json()
        expected = chat_prompt(engine.tokenizer, [ChatMessage(**m) for m in messages])
        assert reply["tokens"] == expected and reply["count"] == len(expected)
        assert reply["max_model_len"] == engine.info.max_model_len
        assert reply["token_strs"] == engine.tokenizer.convert_ids_to_tokens(expected)
        # ... and back: /detokenize gives the rendered text.
        text = (await http.post("/detokenize", json={"model": MODEL_NAME, "tokens": reply["tokens"]})).json()
        assert "What is 7 + 5?" in text["prompt"] and text["prompt"] == engine.tokenizer.decode(expected)


async def test_tokenize_a_prompt_round_trips(server_url, engine):
    async with httpx.AsyncClient(base_url=server_url, timeout=60) as http:
        plain = (await http.post("/tokenize", json={"prompt": "The capital of France is"})).json()
        assert plain["token_strs"] is None and plain["count"] == len(plain["tokens"]) > 0
        back = (await http.post("/detokenize", json={"tokens": plain["tokens"]})).json()
        assert back["prompt"] == "The capital of France is"


@pytest.mark.parametrize(
    ("path", "body", "status", "param"),
    [
        ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
        ("/detokenize", {"tokens": [10**9]}, 400, "tokens"),
        ("/tokenize", {"model": "other", "prompt": "hi"}, 404, "model"),
        ("/tokenize", {"prompt": "hi", "chat_template": "{{ 1 }}"}, 400, "chat_template"),
        (
            "/tokenize",
            {"messages": [{"role": "user", "content": "hi"}], "continue_final_message": True},
            400,
            "continue_final_message",
        ),
    ],
)
async def test_bad_requests_are_openai_errors(server_url, path, body, status, param):
    async with httpx.AsyncClient(base_url=server_url, timeout=60) as http:
        response = await http.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


async def test_version_names_vllm_and_t2serve(server_url):
    import vllm

    async with httpx.AsyncClient(base_url=server_url, timeout=60) as http:
        reply = (await http.get("/version")).json()
    assert reply["version"] == vllm.__version__ and reply["t2serve"]


async def test_tokenize_takes_the_api_key_before_the_body():
    from server.app import create_app
    from server.config import EngineSettings, ServerSettings

    settings = ServerSettings(engine=EngineSettings(model="x", served_model_name="m"), api_keys=["k"])
    app = create_app(settings, engine=object())  # the key is checked before anything runs
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as http:
        for path in ("/tokenize", "/detokenize"):
            refused = await http.post(path, content=b"not even json")
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
