import pytest

from estimator.stopping import choose_parallelism, load_scaled_cap


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


@pytest.mark.parametrize(
    ("in_flight", "expected"),
    [(0, 16), (50, 16), (60, 12), (75, 8), (90, 3), (99, 1), (100, 1), (500, 1)],
)
def test_load_scaled_cap_curve(in_flight, expected):
    # limit 100: full cap up to half load, then a linear ramp to 1 at the limit.
    assert load_scaled_cap(16, in_flight, 100) == expected


def test_load_scaled_cap_keeps_the_total_under_the_limit():
    # 8 choices at 40/100 in flight: the curve allows 16, the room only (100 - 40) // 8 = 7.
    assert load_scaled_cap(16, 40, 100, choices=8) == 7
    for in_flight in range(0, 100):
        for choices in (1, 3, 8):
            n = load_scaled_cap(64, in_flight, 100, choices=choices)
            assert n >= 1 and (n == 1 or in_flight + n * choices <= 100)


def test_load_scaled_cap_never_raises_the_cap():
    assert all(load_scaled_cap(5, k, 1000) <= 5 for k in range(0, 1200, 7))
    with pytest.raises(ValueError):
        load_scaled_cap(4, 0, 0)
