"""Stage 2 (windows): features, chronological split (K11), train-only scaling (K10), window views."""

from __future__ import annotations

import math
import statistics

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.errors import InputError
from pipeline.ingest import IngestConfig, load_prices
from pipeline.windows import SPLITS, WindowConfig, make_features, make_windows, part_bounds

# --- helpers ------------------------------------------------------------------------------------

K10_CFG = WindowConfig(window=5)  # default 70/15/15 fractions; 99 feature rows -> parts of 69, 15, 15


def ramp_prices(n: int = 100, close_only: bool = False) -> pd.DataFrame:
    """Close = 1..n on business days; Open/High/Low/Volume derived from it (all positive)."""
    close = np.arange(1, n + 1, dtype=np.float64)
    idx = pd.bdate_range("2020-01-01", periods=n, name="Date")
    if close_only:
        return pd.DataFrame({"Close": close}, index=idx)
    return pd.DataFrame(
        {
            "Open": close - 0.5,
            "High": close + 1.0,
            "Low": close - 0.75,
            "Close": close,
            "Volume": 1000.0 * (1 + np.arange(n) % 7),
        },
        index=idx,
    )


def hand_features(prices: pd.DataFrame) -> list[list[float]]:
    """Features computed row by row with `math`, in the order close, open, high, low, volume."""
    rows = []
    c, o, h, lo, v = (prices[k].tolist() for k in ("Close", "Open", "High", "Low", "Volume"))
    for t in range(1, len(prices)):
        rows.append(
            [
                math.log(c[t] / c[t - 1]),
                math.log(o[t] / c[t - 1]),
                math.log(h[t] / c[t - 1]),
                math.log(lo[t] / c[t - 1]),
                math.log1p(v[t]) - math.log1p(v[t - 1]),
            ]
        )
    return rows


@pytest.fixture(scope="module")
def gspc() -> pd.DataFrame:
    return load_prices(IngestConfig(ticker="^GSPC"))


@pytest.fixture(scope="module")
def gspc_windows(gspc):
    return make_windows(gspc, WindowConfig())


# --- make_features ------------------------------------------------------------------------------


def test_make_features_exact_log_returns():
    idx = pd.DatetimeIndex(["2024-01-02", "2024-01-03", "2024-01-04"], name="Date")
    prices = pd.DataFrame(
        {
            "Open": [99.0, 101.0, 103.0],
            "High": [101.0, 104.0, 103.5],
            "Low": [98.0, 100.5, 98.0],
            "Close": [100.0, 102.0, 99.0],
            "Volume": [1000.0, 0.0, 2500.0],
        },
        index=idx,
    )
    feats = make_features(prices)
    assert list(feats.columns) == ["close", "open", "high", "low", "volume"]
    assert feats.shape == (2, 5)
    assert feats.index.tolist() == [pd.Timestamp("2024-01-03"), pd.Timestamp("2024-01-04")]  # first day dropped
    expected = [
        [math.log(102 / 100), math.log(101 / 100), math.log(104 / 100), math.log(100.5 / 100), -math.log(1001)],
        [math.log(99 / 102), math.log(103 / 102), math.log(103.5 / 102), math.log(98 / 102), math.log(2501)],
    ]
    np.testing.assert_allclose(feats.to_numpy(), expected, rtol=1e-13, atol=0)
    assert np.isfinite(feats.to_numpy()).all()  # zero volume stays finite


def test_make_features_close_only():
    idx = pd.DatetimeIndex(["2024-01-02", "2024-01-03", "2024-01-04"], name="Date")
    feats = make_features(pd.DataFrame({"Close": [50.0, 55.0, 44.0]}, index=idx))
    assert list(feats.columns) == ["close"]
    np.testing.assert_allclose(feats["close"].to_numpy(), [math.log(1.1), math.log(0.8)], rtol=1e-13, atol=0)
    assert feats.index[0] == pd.Timestamp("2024-01-03")


def test_make_features_matches_hand_computation_on_ramp():
    prices = ramp_prices(20)
    feats = make_features(prices)
    np.testing.assert_allclose(feats.to_numpy(), hand_features(prices), rtol=1e-12, atol=1e-15)


# --- split and boundaries (K11) -----------------------------------------------------------------


def test_part_bounds_by_hand():
    assert part_bounds(5030, WindowConfig()) == {"train": (0, 3521), "val": (3521, 4275), "test": (4275, 5030)}
    assert part_bounds(99, WindowConfig()) == {"train": (0, 69), "val": (69, 84), "test": (84, 99)}
    assert part_bounds(49, WindowConfig()) == {"train": (0, 34), "val": (34, 41), "test": (41, 49)}


def test_gspc_samples_stay_inside_their_part(gspc, gspc_windows):
    w = gspc_windows
    n = len(gspc) - 1
    assert w.features.shape == (n, 5) == (5030, 5)
    assert w.features.dtype == torch.float32
    assert w.feature_names == ["close", "open", "high", "low", "volume"]
    bounds = part_bounds(n, WindowConfig())
    for name in SPLITS:
        lo, hi = bounds[name]
        starts = w.starts[name]
        assert starts.dtype == torch.int64
        assert torch.equal(starts, torch.arange(lo, hi - 30))  # every admissible sample, in order
        # Window rows s..s+29 and target row s+30 lie in [lo, hi).
        assert int(starts.min()) >= lo
        assert int(starts.max()) + 30 <= hi - 1
        assert len(starts) == hi - lo - 30
    assert {k: len(v) for k, v in w.starts.items()} == {"train": 3491, "val": 724, "test": 725}


def test_gspc_target_dates_are_chronological(gspc_windows):
    w = gspc_windows
    train, val, test = (w.target_dates(name) for name in SPLITS)
    assert train.max() < val.min()
    assert val.max() < test.min()
    assert train.is_monotonic_increasing and val.is_monotonic_increasing and test.is_monotonic_increasing
    # Window rows of the first val sample start after the last train target.
    assert w.dates[int(w.starts["val"][0])] > train.max()
    assert w.dates[int(w.starts["test"][0])] > val.max()
    assert test.max() == pd.Timestamp("2018-12-31")


def test_split_is_identical_whatever_the_seed(gspc, gspc_windows):
    torch.manual_seed(1)
    np.random.seed(1)
    a = make_windows(gspc, WindowConfig())
    torch.manual_seed(12345)
    np.random.seed(999)
    b = make_windows(gspc, WindowConfig())
    for name in SPLITS:
        assert torch.equal(a.starts[name], b.starts[name])
        assert torch.equal(a.starts[name], gspc_windows.starts[name])
    assert torch.equal(a.features, b.features)
    assert a.dates.equals(b.dates)


def test_smallest_part_that_fits_the_window():
    prices = ramp_prices(50)  # 49 feature rows: train 34, val 7, test 8
    w = make_windows(prices, WindowConfig(window=6))
    assert w.starts["train"].tolist() == list(range(0, 28))
    assert w.starts["val"].tolist() == [34]
    assert w.starts["test"].tolist() == [41, 42]


# --- scaling sees only the train part (K10) ------------------------------------------------------


def test_k10_scaler_fitted_on_train_rows_only():
    prices = ramp_prices(100)
    w = make_windows(prices, K10_CFG)
    train = hand_features(prices)[:69]  # part_bounds(99) -> train rows 0..68
    columns = list(zip(*train, strict=True))
    np.testing.assert_allclose(w.scaler.mean_, [statistics.fmean(c) for c in columns], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(w.scaler.scale_, [statistics.pstdev(c) for c in columns], rtol=1e-12)
    # Close = 1..100: the train close returns telescope to log(70) / 69, not log(100) / 99 (whole series).
    assert w.scaler.mean_[0] == pytest.approx(math.log(70) / 69, rel=1e-13)
    assert w.scaler.mean_[0] != pytest.approx(math.log(100) / 99, rel=1e-3)
    assert w.scaler.n_samples_seen_ == 69


def test_k10_train_part_ends_at_close_70_minmax_example():
    """CASES.md K10: a min-max scaler fitted on the train prices has max 70, so 100 maps to 99/69."""
    prices = ramp_prices(100, close_only=True)
    w = make_windows(prices, K10_CFG)
    last_train_date = w.dates[part_bounds(len(w.dates), K10_CFG)["train"][1] - 1]
    train_close = prices.loc[:last_train_date, "Close"]
    assert (train_close.min(), train_close.max()) == (1.0, 70.0)
    scaled_100 = (100.0 - train_close.min()) / (train_close.max() - train_close.min())
    assert scaled_100 == pytest.approx(99 / 69)
    assert scaled_100 == pytest.approx(1.4348, abs=5e-5)


def test_k10_scaled_values_use_train_statistics():
    prices = ramp_prices(100, close_only=True)
    w = make_windows(prices, K10_CFG)
    train = [math.log((t + 1) / t) for t in range(1, 70)]
    mean, std = statistics.fmean(train), statistics.pstdev(train)
    # Last row: log(100 / 99), scaled with the train mean/std.
    assert float(w.features[-1, 0]) == pytest.approx((math.log(100 / 99) - mean) / std, rel=1e-6)
    assert float(w.features[:69, 0].double().mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(w.features[:69, 0].double().std(unbiased=False)) == pytest.approx(1.0, rel=1e-5)


def test_k10_no_look_ahead_after_the_train_boundary():
    prices = ramp_prices(100)
    base = make_windows(prices, K10_CFG)
    # Train feature rows 0..68 use price rows 0..69; change every price from row 70 on.
    rng = np.random.default_rng(0)
    changed = prices.copy()
    changed.iloc[70:] = changed.iloc[70:].to_numpy() * rng.uniform(0.5, 3.0, size=changed.iloc[70:].shape)
    other = make_windows(changed, K10_CFG)
    np.testing.assert_array_equal(other.scaler.mean_, base.scaler.mean_)
    np.testing.assert_array_equal(other.scaler.scale_, base.scaler.scale_)
    x0, y0 = base.split("train")
    x1, y1 = other.split("train")
    assert torch.equal(x0, x1)
    assert torch.equal(y0, y1)
    assert torch.equal(base.starts["train"], other.starts["train"])
    # The change is visible where it should be: later splits differ.
    assert not torch.equal(base.split("val")[1], other.split("val")[1])
    assert not torch.equal(base.split("test")[0], other.split("test")[0])


def test_k10_changing_the_last_train_price_does_change_the_scaler():
    """Control for the test above: row 69 is the last price the train part uses."""
    prices = ramp_prices(100)
    base = make_windows(prices, K10_CFG)
    changed = prices.copy()
    changed.iloc[69] = changed.iloc[69] * 1.5
    other = make_windows(changed, K10_CFG)
    assert not np.array_equal(other.scaler.mean_, base.scaler.mean_)


# --- views ----------------------------------------------------------------------------------------


def test_inputs_are_gathered_from_a_view(gspc_windows):
    w = gspc_windows
    n, f = w.features.shape
    assert w._view.shape == (n - 30 + 1, f, 30)
    assert w._view.untyped_storage().data_ptr() == w.features.untyped_storage().data_ptr()
    assert w._view.untyped_storage().nbytes() == n * f * 4  # no (N, window, F) copy behind it
    starts = w.starts["train"]
    x = w.inputs(starts)
    assert x.shape == (3491, 30, 5)
    assert x.dtype == torch.float32
    rows = starts[:, None] + torch.arange(30)[None, :]
    assert torch.equal(x, w.features[rows])
    for i, j in [(0, 0), (0, 29), (17, 5), (3490, 29)]:
        s = int(starts[i])
        assert torch.equal(x[i, j], w.features[s + j])


def test_targets_are_next_day_scaled_close(gspc_windows):
    w = gspc_windows
    for name in SPLITS:
        starts = w.starts[name]
        y = w.targets(starts)
        assert y.shape == (len(starts),)
        assert y.dtype == torch.float32
        assert torch.equal(y, w.features[starts + 30, 0])
    x, y = w.split("val")
    assert x.shape == (724, 30, 5)
    assert y.shape == (724,)


def test_target_value_by_hand():
    prices = ramp_prices(100, close_only=True)
    w = make_windows(prices, WindowConfig(window=5))
    train = [math.log((t + 1) / t) for t in range(1, 70)]
    mean, std = statistics.fmean(train), statistics.pstdev(train)
    # Sample 0: window rows 0..4 (closes 2..6 over their previous day), target row 5 = log(7 / 6).
    y = w.targets(torch.tensor([0, 10]))
    assert float(y[0]) == pytest.approx((math.log(7 / 6) - mean) / std, rel=1e-6)
    assert float(y[1]) == pytest.approx((math.log(17 / 16) - mean) / std, rel=1e-6)
    x = w.inputs(torch.tensor([0]))
    assert x.shape == (1, 5, 1)
    assert float(x[0, 4, 0]) == pytest.approx((math.log(6 / 5) - mean) / std, rel=1e-6)
    assert w.target_dates("train")[0] == prices.index[6]


def test_naive_target_is_scaled_zero_return():
    prices = ramp_prices(100)
    w = make_windows(prices, K10_CFG)
    train = [math.log((t + 1) / t) for t in range(1, 70)]
    assert w.naive_target() == pytest.approx(-statistics.fmean(train) / statistics.pstdev(train), rel=1e-12)
    assert w.naive_target() < 0  # prices only rise here


def test_naive_target_on_gspc(gspc, gspc_windows):
    close = np.log(gspc["Close"].to_numpy())
    returns = np.diff(close)[:3521]
    assert gspc_windows.naive_target() == pytest.approx(-returns.mean() / returns.std(ddof=0), rel=1e-9)


# --- refused configurations -----------------------------------------------------------------------


def test_window_too_long_names_both_numbers():
    prices = ramp_prices(50)  # 49 feature rows: train 34, val 7, test 8
    with pytest.raises(InputError) as err:
        make_windows(prices, WindowConfig(window=10))
    message = str(err.value)
    assert "window 10 is too long" in message
    assert "val part has 7 rows" in message
    assert "needs at least 11" in message
    assert "50 days in all" in message


def test_window_too_long_for_train_part():
    with pytest.raises(InputError, match=r"window 40 is too long for the series: its train part has 34 rows"):
        make_windows(ramp_prices(50), WindowConfig(window=40))


def test_window_one_short_of_fitting_is_refused():
    with pytest.raises(InputError, match=r"window 7 .* val part has 7 rows .* needs at least 8"):
        make_windows(ramp_prices(50), WindowConfig(window=7))


@pytest.mark.parametrize("window", [0, -3])
def test_window_below_one_refused(window):
    with pytest.raises(InputError, match=f"window must be at least 1, got {window}"):
        make_windows(ramp_prices(50), WindowConfig(window=window))


@pytest.mark.parametrize(
    ("train_frac", "val_frac"),
    [(0.0, 0.15), (1.0, 0.1), (-0.1, 0.5), (0.7, 0.0), (0.7, 1.0), (0.85, 0.15), (0.9, 0.2), (0.5, 0.5)],
)
def test_invalid_fractions_refused(train_frac, val_frac):
    with pytest.raises(InputError, match="train_frac and val_frac must be in \\(0, 1\\) and leave a test part") as err:
        make_windows(ramp_prices(200), WindowConfig(train_frac=train_frac, val_frac=val_frac))
    assert f"got {train_frac} and {val_frac}" in str(err.value)


def test_naive_loss_is_the_mse_of_the_zero_return_forecast(gspc_windows):
    _, targets = gspc_windows.split("test")
    constant = -gspc_windows.scaler.mean_[0] / gspc_windows.scaler.scale_[0]
    expected = float(((targets.double() - constant) ** 2).mean())
    assert gspc_windows.naive_loss("test") == pytest.approx(expected, rel=1e-6)
