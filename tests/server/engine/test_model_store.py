"""The embedded model's preparation: real conversion output, checksums, idempotence, and its
tool-aware chat template (byte-identical to the GGUF's own without tools)."""

from __future__ import annotations

import json
import shutil

import pytest

from server.engine.model_store import (
    EMBEDDED_CHAT_TEMPLATE,
    MANIFEST,
    find_embedded_gguf,
    prepare_embedded_model,
    sha256_file,
    tool_call_parser_of,
    verify_model_dir,
)
from server.prompts import render_chat


def test_prepared_folder_is_complete_and_verified(model_dir):
    assert verify_model_dir(model_dir)
    manifest = json.loads((model_dir / MANIFEST).read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["source"]["sha256"] == sha256_file(find_embedded_gguf())
    config = json.loads((model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576


def test_prepare_is_idempotent(model_dir):
    written = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    assert prepare_embedded_model(model_dir) == model_dir
    # A verified folder is reused, not rebuilt: no file in it was written again.
    assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == written


def test_corruption_is_detected(model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    assert verify_model_dir(copy)
    config = copy / "config.json"
    config.write_text(config.read_text().replace('"hidden_size": 576', '"hidden_size": 577'))
    assert not verify_model_dir(copy)
    (copy / MANIFEST).unlink()
    assert not verify_model_dir(copy)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "x"}],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ],
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


@pytest.fixture(scope="module")
def gguf_tokenizer():
    """The tokenizer, and the chat template, as the GGUF file itself carries them."""
    from transformers import AutoTokenizer

    gguf = find_embedded_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_the_shipped_template_renders_tool_less_chats_as_the_ggufs_own(
    model_dir, gguf_tokenizer, conversation, add_generation_prompt
):
    """So the estimator head, trained on prompts rendered by the GGUF's template, reads the
    same states: the prompt's token ids are equal, not only its text."""
    from transformers import AutoTokenizer

    served = AutoTokenizer.from_pretrained(str(model_dir))
    assert served.chat_template == EMBEDDED_CHAT_TEMPLATE.read_text()
    assert gguf_tokenizer.chat_template != served.chat_template
    kwargs = {"add_generation_prompt": add_generation_prompt}
    assert render_chat(served, conversation, **kwargs) == render_chat(gguf_tokenizer, conversation, **kwargs)


def test_the_shipped_template_lists_tools_and_renders_calls_and_results_as_hermes_does(model_dir):
    from transformers import AutoTokenizer

    assert tool_call_parser_of(model_dir) == "hermes" and tool_call_parser_of(model_dir.parent) is None
    served = AutoTokenizer.from_pretrained(str(model_dir))
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    text = served.apply_chat_template(messages, tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    system, rest = text.split("<|im_end|>\n", 1)
    assert '<tools>\n{"name": "get_weather", "parameters":' in system
    assert rest == (
        "<|im_start|>user\nWeather in Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call><|im_end|>\n"
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
