"""The engine tests' shared reference: the embedded model in transformers, float32."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def reference_model(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.eval()
    return model
