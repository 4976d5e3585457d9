"""The embedded model's preparation: real conversion output, checksums, idempotence."""

from __future__ import annotations

import json
import shutil

from server.engine.model_store import (
    MANIFEST,
    find_embedded_gguf,
    prepare_embedded_model,
    sha256_file,
    verify_model_dir,
)


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
