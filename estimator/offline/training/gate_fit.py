"""Fitting the answerable / open-ended gate (estimator.gate) on captured states.

The probe is an L2-regularised logistic regression on one layer's z-scored state, fitted
on the train parts (the head's labelled questions vs the built-in open-ended prompts) and
scored on the validation parts; the layer with the best validation log-loss among
`layers` is kept. The unfamiliarity radius is the 99th percentile of the train questions'
own z-distance."""

from __future__ import annotations

import numpy as np
import torch

from estimator.gate import Gate

RADIUS_QUANTILE = 0.99
# The T2 margin rises from FAR_FROM x radius to FAR_SCALE x at the radius (estimator.gate):
# chosen on leave-one-dataset-out folds (README "Bring your own model and data"), where it
# matched the best fixed margin's accuracy per sample and left familiar questions at x1.
FAR_FROM = 0.6
FAR_SCALE = 2.5


def _fit_logistic(
    x: np.ndarray, y: np.ndarray, weight_decay: float, steps: int = 200
) -> tuple[np.ndarray, float]:
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    # Balanced classes: each class weighs the same whatever the counts.
    sample_weight = torch.where(yt > 0.5, 0.5 / yt.mean(), 0.5 / (1 - yt.mean()))
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = xt @ w + b
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(logits, yt, reduction="none") * sample_weight
        ).mean()
        loss = loss + weight_decay * (w**2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach().numpy(), float(b.detach())


def _scores(gate: Gate, states: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    p = gate.open_ended_probability(states)
    predicted = p >= gate.threshold
    eps = 1e-7
    loss = -np.mean(labels * np.log(p + eps) + (1 - labels) * np.log(1 - p + eps))
    return {
        "log_loss": float(loss),
        "accuracy": float(np.mean(predicted == (labels > 0.5))),
        "open_ended_recall": float(predicted[labels > 0.5].mean()) if (labels > 0.5).any() else float("nan"),
        "answerable_kept": float((~predicted[labels < 0.5]).mean()) if (labels < 0.5).any() else float("nan"),
    }


def fit_gate(
    math_train: np.ndarray,
    open_train: np.ndarray,
    math_val: np.ndarray,
    open_val: np.ndarray,
    layers: list[int],
    weight_decay: float = 1e-3,
) -> Gate:
    """The gate for states [Q, L, d] of answerable questions and open-ended prompts."""
    best: tuple[float, Gate] | None = None
    x_val = np.concatenate([math_val, open_val]).astype(np.float32)
    y_val = np.concatenate([np.zeros(len(math_val)), np.ones(len(open_val))])
    for layer in layers:
        questions = math_train[:, layer].astype(np.float32)
        mean, std = questions.mean(axis=0), questions.std(axis=0) + 1e-4
        x = np.concatenate([math_train[:, layer], open_train[:, layer]]).astype(np.float32)
        y = np.concatenate([np.zeros(len(math_train)), np.ones(len(open_train))])
        weights, bias = _fit_logistic((x - mean) / std, y, weight_decay)
        distances = np.sqrt((((questions - mean) / std) ** 2).mean(axis=1))
        gate = Gate(
            layer=layer,
            mean=mean.tolist(),
            std=std.tolist(),
            weights=weights.tolist(),
            bias=bias,
            radius=float(np.quantile(distances, RADIUS_QUANTILE)),
            far_from=FAR_FROM,
            far_scale=FAR_SCALE,
        )
        val_loss = _scores(gate, x_val, y_val)["log_loss"]
        if best is None or val_loss < best[0]:
            best = (val_loss, gate)
    assert best is not None
    gate = best[1]
    gate.fitted = {
        "train": {"questions": len(math_train), "open_ended": len(open_train)},
        "validation": {
            "questions": len(math_val),
            "open_ended": len(open_val),
            **_scores(gate, x_val, y_val),
        },
        "layers_tried": list(layers),
    }
    return gate
