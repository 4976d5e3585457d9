"""Probe training and the inverse-variance combination, on synthetic states."""

from __future__ import annotations

import numpy as np
import pytest

from estimator.head import T2Head
from estimator.offline.training.probes import TrainConfig, choose_combination, fit


def synthetic(n: int, layers: int = 6, hidden: int = 32, seed: int = 0):
    """y depends on a direction that is clear in the deep layers and noisy in the early ones."""
    direction = np.random.default_rng(1234).normal(size=hidden)  # shared by train and validation
    rng = np.random.default_rng(seed)
    y = rng.uniform(0.05, 1.0, size=n).astype(np.float32)
    x = rng.normal(size=(n, layers, hidden)).astype(np.float32)
    for layer in range(layers):
        signal = (layer + 1) / layers
        x[:, layer] += signal * 3 * np.outer(y, direction).astype(np.float32)
    return x, y


@pytest.fixture(scope="module")
def trained():
    x, y = synthetic(600)
    vx, vy = synthetic(200, seed=1)
    head = fit(x, y, vx, vy, model_name="synthetic", n_max=16, config=TrainConfig(epochs=60), progress=False)
    return head, vx, vy


def test_probes_learn_and_deeper_layers_win(trained):
    head, vx, vy = trained
    mse = np.array(head.meta.layer_val_mse)
    assert mse.min() < 0.3 * np.var(vy)  # far better than predicting the mean
    assert mse[-1] < mse[0]


def test_combination_no_worse_than_best_layer(trained):
    head, vx, vy = trained
    per_layer = head.predict_layers(vx).numpy()
    layer_mse = ((per_layer - vy[:, None]) ** 2).mean(0)
    combined = float(np.mean((head.predict_batch(vx) - vy) ** 2))
    assert combined <= layer_mse.min() + 1e-6
    assert combined == pytest.approx(head.meta.combined_val_mse, rel=1e-4)
    assert sum(head.meta.weights) == pytest.approx(1.0)


def test_choose_combination_prefers_averaging_when_it_helps():
    rng = np.random.default_rng(0)
    y = rng.uniform(size=500)
    # Three layers with independent noise of equal size: averaging all beats any one.
    pred = y[:, None] + rng.normal(scale=0.1, size=(500, 3))
    mse = ((pred - y[:, None]) ** 2).mean(0)
    layers, weights, combined = choose_combination(pred, y, mse)
    assert len(layers) == 3 and combined < mse.min()


def test_save_load_roundtrip_and_model_check(trained, tmp_path):
    head, vx, _ = trained
    head.save(tmp_path / "head")
    loaded = T2Head.load(tmp_path / "head")
    # Weights are stored as float16 (small shipped head): predictions agree to ~1e-4.
    np.testing.assert_allclose(loaded.predict_batch(vx), head.predict_batch(vx), atol=1e-3)
    assert loaded.meta.n_max == 16 and loaded.meta.model_name == "synthetic"
    loaded.check_model("synthetic", 6, 32)
    with pytest.raises(ValueError, match="trained on synthetic"):
        loaded.check_model("other", 30, 576)


def test_single_prediction_in_range(trained):
    head, vx, _ = trained
    values = [head.predict(vx[i]) for i in range(20)]
    assert all(0.0 <= v <= 1.0 for v in values)
    np.testing.assert_allclose(values, head.predict_batch(vx[:20]), rtol=1e-5)


def test_cross_fitted_predictions_are_out_of_fold_and_track_the_target():
    from estimator.offline.training.probes import cross_fitted_predictions

    x, y = synthetic(300)
    vx, vy = synthetic(100, seed=1)
    config = TrainConfig(epochs=20)
    out = cross_fitted_predictions(x, y, vx, vy, folds=3, config=config, progress=False)
    assert out.shape == (300,) and np.all((out > 0) & (out < 1))
    assert np.corrcoef(out, y)[0, 1] > 0.8
    # Out of fold: changing one question's target does not change its own prediction.
    y2 = y.copy()
    y2[0] = 1.0 - y2[0]
    again = cross_fitted_predictions(x, y2, vx, vy, folds=3, config=config, progress=False)
    assert again[0] == pytest.approx(out[0], abs=1e-6)
    assert not np.allclose(again[1:], out[1:])  # the other folds' heads did see it
