"""The T2 head: one MLP probe per decoder layer (d -> d*r -> 1) on the last prompt token's
residual stream, combined by inverse-variance weighting.

Each probe predicts y = N*_x / N_max in [0, 1] (a sigmoid output) from its layer's
standardised state and is trained with MSE. The combined prediction is the weighted mean of
the probes over a set S of layers, with weights proportional to 1 / (validation MSE):

    y_hat = sum_{l in S} y_l / MSE_l  /  sum_{l in S} 1 / MSE_l

S is the k layers with the lowest validation MSE, k chosen on validation among 1..L. k = 1
is the best single layer, so the combination is by construction no worse on validation than
the best single layer (plain inverse-variance weighting over all layers only guarantees the
harmonic mean of the layer MSEs).

Saved as `<name>.safetensors` (tensors) + `<name>.json` (model identity, N_max, layer MSEs,
chosen layers, training config, the T2 margin chosen on validation). `T2Head.load` refuses a
head whose model does not match.
A head may carry a learned stopping table, `<name>.stopping.safetensors`
(estimator.learned_stopping), fitted for it by `t2serve train`; saving a head removes a
table left beside an earlier head, since the table is only valid for the head it was fitted with.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from estimator.gate import Gate, gate_path
from estimator.learned_stopping import StoppingTable, table_path

# T2's margin for a head that carries none (heads trained before margins were fitted).
DEFAULT_MARGIN = 1.5


@dataclass
class HeadMeta:
    model_name: str
    num_layers: int
    hidden_size: int
    n_max: int
    ratio: float
    model_fingerprint: str = ""
    layer_val_mse: list[float] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)  # the combined set S
    weights: list[float] = field(default_factory=list)  # normalised 1/MSE over S
    combined_val_mse: float | None = None
    train_config: dict = field(default_factory=dict)
    labels: dict = field(default_factory=dict)
    # T2's margin for this head, chosen on its validation split (estimator.offline.training.margin_fit;
    # None: heads trained before, which get DEFAULT_MARGIN) and what it was chosen on.
    margin: float | None = None
    margin_fit: dict = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


class LayerProbes(nn.Module):
    """L independent MLPs evaluated together: x [B, L, d] -> y [B, L] in (0, 1)."""

    def __init__(self, num_layers: int, hidden_size: int, ratio: float = 1 / 8):
        super().__init__()
        width = max(1, round(hidden_size * ratio))
        self.w1 = nn.Parameter(torch.randn(num_layers, hidden_size, width) / hidden_size**0.5)
        self.b1 = nn.Parameter(torch.zeros(num_layers, width))
        self.w2 = nn.Parameter(torch.randn(num_layers, width) / width**0.5)
        self.b2 = nn.Parameter(torch.zeros(num_layers))
        self.register_buffer("mean", torch.zeros(num_layers, hidden_size))
        self.register_buffer("std", torch.ones(num_layers, hidden_size))

    def forward(self, x: torch.Tensor, layers: torch.Tensor | None = None) -> torch.Tensor:
        """Predictions of every probe, or only of `layers` (x then holds just those layers)."""
        p = [self.mean, self.std, self.w1, self.b1, self.w2, self.b2]
        mean, std, w1, b1, w2, b2 = p if layers is None else [t[layers] for t in p]
        x = (x - mean) / std
        h = torch.nn.functional.gelu(torch.einsum("bld,ldh->blh", x, w1) + b1)
        return torch.sigmoid(torch.einsum("blh,lh->bl", h, w2) + b2)


class T2Head:
    name = "t2"

    def __init__(self, probes: LayerProbes, meta: HeadMeta):
        self.probes = probes.eval()
        self.meta = meta
        self._layers = torch.tensor(meta.layers, dtype=torch.long)
        self._weights = torch.tensor(meta.weights, dtype=torch.float32)
        self.stopping: StoppingTable | None = None  # for the t2+learned policy
        self.gate: Gate | None = None  # answerable / open-ended / unfamiliar (estimator.gate)

    @property
    def sampling(self) -> dict:
        """The sampling setup its labels were made with (temperature, max_tokens,
        prompt_template; estimator.offline.labels.labeling.LabelConfig), {} where not recorded."""
        config = self.meta.labels.get("config", {})
        return {k: config[k] for k in ("temperature", "max_tokens", "prompt_template") if k in config}

    @property
    def margin(self) -> float:
        """T2's margin for this head: its own, chosen on validation, else DEFAULT_MARGIN."""
        return self.meta.margin if self.meta.margin is not None else DEFAULT_MARGIN

    @property
    def identity(self) -> str:
        return (
            f"t2:{self.meta.model_name}:L{self.meta.num_layers}:d{self.meta.hidden_size}:n{self.meta.n_max}"
        )

    @staticmethod
    def _batch(states: np.ndarray | torch.Tensor) -> torch.Tensor:
        """States as a float32 batch [B, L, d] (one request's [L, d] becomes B = 1)."""
        x = torch.as_tensor(states, dtype=torch.float32)
        return x.unsqueeze(0) if x.dim() == 2 else x

    @torch.inference_mode()
    def predict_layers(self, states: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Per-layer predictions [B, L] for states [B, L, d] (or [L, d])."""
        return self.probes(self._batch(states))

    @torch.inference_mode()
    def predict_batch(self, states: np.ndarray | torch.Tensor) -> np.ndarray:
        """Combined predictions [B]; only the layers in the combination are computed."""
        per_layer = self.probes(self._batch(states)[:, self._layers], self._layers)
        return (per_layer @ self._weights).numpy()

    def predict(self, states: np.ndarray) -> float:
        """N*/N_max estimate for one request's `[L, d]` states."""
        return float(self.predict_batch(states)[0])

    def check_model(self, name: str, num_layers: int, hidden_size: int, fingerprint: str = "") -> None:
        """Raise ValueError unless this head was trained on the served model's state space."""
        m = self.meta
        shape_differs = (m.num_layers, m.hidden_size) != (num_layers, hidden_size)
        model_differs = bool(m.model_fingerprint and fingerprint and m.model_fingerprint != fingerprint)
        if shape_differs or model_differs:
            raise ValueError(
                f"estimator head was trained on {m.model_name} ({m.num_layers} layers, hidden size "
                f"{m.hidden_size}, fingerprint {m.model_fingerprint or '?'}) but the served model {name} has "
                f"{num_layers} layers, hidden size {hidden_size}, fingerprint {fingerprint or '?'}; "
                "train a head for this model with `t2serve label` + `t2serve train`"
            )

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # float16 on disk keeps the shipped head small; it is computed in float32.
        tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in self.probes.state_dict().items()}
        save_file(tensors, str(path.with_suffix(".safetensors")))
        path.with_suffix(".json").write_text(json.dumps(asdict(self.meta), indent=2))
        table_path(path).unlink(missing_ok=True)  # a new head's table and gate are fitted anew
        gate_path(path).unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> T2Head:
        from safetensors.torch import load_file

        path = Path(path)
        meta = HeadMeta(**json.loads(path.with_suffix(".json").read_text()))
        probes = LayerProbes(meta.num_layers, meta.hidden_size, meta.ratio)
        tensors = load_file(str(path.with_suffix(".safetensors")))
        probes.load_state_dict({k: v.to(torch.float32) for k, v in tensors.items()})
        head = cls(probes, meta)
        head.stopping = StoppingTable.load(path)
        head.gate = Gate.load(path)
        if head.stopping is not None and head.stopping.n_max != meta.n_max:
            raise ValueError(
                f"{table_path(path)} is for N_max={head.stopping.n_max}, the head for {meta.n_max}"
            )
        return head


DEFAULT_HEAD = Path(__file__).resolve().parent / "heads" / "smollm2-135m-instruct"


def load_head(
    spec: str | None, *, name: str, num_layers: int, hidden_size: int, fingerprint: str
) -> T2Head | None:
    """The head a server should use.

    spec None: no estimator. spec "default": the head shipped for the embedded model, used
    only when it matches the served model (else None). A path: that head; a mismatch raises
    ValueError with the reason."""
    if spec is None:
        return None
    if spec == "default":
        if not DEFAULT_HEAD.with_suffix(".json").is_file():
            return None
        head = T2Head.load(DEFAULT_HEAD)
        try:
            head.check_model(name, num_layers, hidden_size, fingerprint)
        except ValueError:
            return None
        return head
    path = Path(spec)
    path = path.with_suffix("") if path.suffix in {".json", ".safetensors"} else path
    if not path.with_suffix(".json").is_file():
        raise ValueError(f"estimator head {path}.json not found")
    head = T2Head.load(path)
    head.check_model(name, num_layers, hidden_size, fingerprint)
    return head
