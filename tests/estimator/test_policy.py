import pytest

from estimator.policy import choose_parallelism


def test_default_without_prediction():
    assert choose_parallelism(None, n_max=16, default=8, cap=16) == 8
    assert choose_parallelism(None, n_max=16, default=8, cap=4) == 4


@pytest.mark.parametrize(("prediction", "expected"), [(0.0, 1), (0.01, 1), (0.5, 8), (1.0, 16), (3.0, 16)])
def test_prediction_scaled_and_clamped(prediction, expected):
    assert choose_parallelism(prediction, n_max=16, default=8, cap=16) == expected


def test_margin():
    assert choose_parallelism(0.25, n_max=16, default=8, cap=16, margin=1.5) == 6


def test_bad_cap():
    with pytest.raises(ValueError):
        choose_parallelism(0.5, n_max=16, default=8, cap=0)
