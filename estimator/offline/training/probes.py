"""`t2serve train`: fit the per-layer probes on labeled states, pick the combined layer set."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from estimator.head import HeadMeta, LayerProbes, T2Head


@dataclass(frozen=True)
class TrainConfig:
    ratio: float = 1 / 8
    epochs: int = 200
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 64
    seed: int = 0


def in_split(records: list[dict], states: np.ndarray, split: str) -> tuple[list[dict], np.ndarray]:
    """The labeled questions of one split ("train", "validation", "test") and their states."""
    index = np.array([r["split"] == split for r in records])
    return [r for r, keep in zip(records, index, strict=True) if keep], states[index]


def targets(records: list[dict]) -> np.ndarray:
    """y = N*_x / N_max: of the record's training target (`target_n_star`,
    estimator.offline.labels.gold_free.with_targets) where it has one, else of its label."""
    return np.array(
        [
            r["target_n_star"] / len(r["target_accuracy"])
            if "target_n_star" in r
            else r["n_star"] / len(r["accuracy"])
            for r in records
        ],
        dtype=np.float32,
    )


def choose_combination(
    val_pred: np.ndarray, val_y: np.ndarray, layer_mse: np.ndarray
) -> tuple[list[int], list[float], float]:
    """Inverse-variance weights over the k best layers, k minimising validation MSE
    (smallest k on ties). val_pred: [B, L]."""
    order = np.argsort(layer_mse, kind="stable")
    best: tuple[list[int], list[float], float] | None = None
    for k in range(1, len(order) + 1):
        layers = order[:k]
        w = 1.0 / np.maximum(layer_mse[layers], 1e-12)
        w = w / w.sum()
        mse = float(np.mean((val_pred[:, layers] @ w - val_y) ** 2))
        if best is None or mse < best[2] - 1e-12:
            best = ([int(i) for i in layers], [float(x) for x in w], mse)
    assert best is not None
    return best


def fit(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    model_name: str,
    n_max: int,
    config: TrainConfig = TrainConfig(),
    labels_info: dict | None = None,
    progress: bool = True,
) -> T2Head:
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    _, num_layers, hidden = train_x.shape
    probes = LayerProbes(num_layers, hidden, config.ratio)
    x = torch.as_tensor(train_x, dtype=torch.float32)
    y = torch.as_tensor(train_y, dtype=torch.float32)
    vx = torch.as_tensor(val_x, dtype=torch.float32)
    vy = torch.as_tensor(val_y, dtype=torch.float32)
    probes.mean.copy_(x.mean(0))
    probes.std.copy_(x.std(0).clamp_min(1e-3))
    optimizer = torch.optim.AdamW(probes.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    # Layers are independent; each keeps the parameters of its own best validation epoch.
    best_mse = torch.full((num_layers,), float("inf"))
    best = {k: v.detach().clone() for k, v in probes.named_parameters()}
    generator = torch.Generator().manual_seed(config.seed)
    bar = tqdm(range(config.epochs), desc="train", unit="epoch", disable=not progress)
    for _ in bar:
        probes.train()
        for batch in torch.randperm(len(x), generator=generator).split(config.batch_size):
            loss = ((probes(x[batch]) - y[batch, None]) ** 2).mean(0).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        probes.eval()
        with torch.no_grad():
            val_mse = ((probes(vx) - vy[:, None]) ** 2).mean(0)
            improved = val_mse < best_mse
            best_mse = torch.where(improved, val_mse, best_mse)
            for name, param in probes.named_parameters():
                best[name][improved] = param.detach()[improved]
        bar.set_postfix(best_layer_mse=f"{best_mse.min().item():.4f}")
    with torch.no_grad():
        for name, param in probes.named_parameters():
            param.copy_(best[name])
        val_pred = probes(vx).numpy()
    layer_mse = best_mse.numpy()
    layers, weights, combined = choose_combination(val_pred, val_y, layer_mse)
    meta = HeadMeta(
        model_name=model_name,
        num_layers=num_layers,
        hidden_size=hidden,
        n_max=n_max,
        ratio=config.ratio,
        layer_val_mse=[float(m) for m in layer_mse],
        layers=layers,
        weights=weights,
        combined_val_mse=combined,
        train_config=asdict(config),
        labels=labels_info or {},
    )
    return T2Head(probes, meta)


def cross_fitted_predictions(
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    *,
    folds: int,
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
) -> np.ndarray:
    """Out-of-sample predictions for every train question: each fold is predicted by a head
    fitted on the other folds (same config, same validation split for epoch selection).
    What the learned stopping table is fitted on: the shipped head predicts its own train
    questions too well (its train MSE is well below its validation MSE)."""
    from tqdm import tqdm

    order = np.random.default_rng(config.seed).permutation(len(train_x))
    out = np.zeros(len(train_x), dtype=np.float64)
    for held_out in tqdm(np.array_split(order, folds), desc="cross-fit", unit="fold", disable=not progress):
        rest = np.setdiff1d(order, held_out)
        head = fit(
            train_x[rest], train_y[rest], val_x, val_y, model_name="", n_max=1, config=config, progress=False
        )
        out[held_out] = head.predict_batch(train_x[held_out])
    return out
