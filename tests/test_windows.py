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
from pipeline.models import ModelConfig
from pipeline.train import TrainConfig, train_validation
from pipeline.windows import SPLITS, WindowConfig, fold_bounds, make_features, make_windows, part_bounds

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
    # The embargo (one window of rows by default) is left out at the start of val and of test.
    assert part_bounds(5030, WindowConfig()) == {"train": (0, 3521), "val": (3551, 4275), "test": (4305, 5030)}
    assert part_bounds(99, K10_CFG) == {"train": (0, 69), "val": (74, 84), "test": (89, 99)}
    assert part_bounds(99, WindowConfig(window=5, embargo=2)) == {"train": (0, 69), "val": (79, 84), "test": (94, 99)}
    assert part_bounds(49, WindowConfig(window=3)) == {"train": (0, 34), "val": (37, 41), "test": (44, 49)}
    # An embargo longer than a part leaves it empty (refused later, naming the numbers), never negative.
    assert part_bounds(49, WindowConfig(window=10)) == {"train": (0, 34), "val": (41, 41), "test": (49, 49)}


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
    assert {k: len(v) for k, v in w.starts.items()} == {"train": 3491, "val": 694, "test": 695}


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
    prices = ramp_prices(50)  # 49 feature rows: train 34, val 7 - 3 (embargo), test 8 - 3
    w = make_windows(prices, WindowConfig(window=3))
    assert w.starts["train"].tolist() == list(range(0, 31))
    assert w.starts["val"].tolist() == [37]
    assert w.starts["test"].tolist() == [44, 45]


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
    assert x.shape == (694, 30, 5)
    assert y.shape == (694,)


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


def test_naive_rows_are_the_scaled_zero_return():
    prices = ramp_prices(100)
    w = make_windows(prices, K10_CFG)
    train = [math.log((t + 1) / t) for t in range(1, 70)]
    expected = -statistics.fmean(train) / statistics.pstdev(train)
    assert w.naive_rows.shape == (99,)
    assert w.naive_rows.tolist() == pytest.approx([expected] * 99, rel=1e-6)  # float32
    assert expected < 0  # prices only rise here
    val_rows = w.starts["val"] + w.window
    assert w.naive_loss("val") == pytest.approx(float(((w.features[val_rows, 0] - expected) ** 2).mean()), rel=1e-5)


def test_naive_rows_on_gspc(gspc, gspc_windows):
    close = np.log(gspc["Close"].to_numpy())
    returns = np.diff(close)[:3521]
    assert float(gspc_windows.naive_rows[0]) == pytest.approx(-returns.mean() / returns.std(ddof=0), rel=1e-6)


# --- refused configurations -----------------------------------------------------------------------


def test_window_too_long_names_both_numbers():
    prices = ramp_prices(50)  # 49 feature rows: train 34, val 7 - 5 (embargo), test 8 - 5
    with pytest.raises(InputError) as err:
        make_windows(prices, WindowConfig(window=5))
    assert str(err.value) == (
        "window 5 is too long for the series: its val part has 2 rows (50 days in all, 5 left out before val "
        "and before test as embargo) and needs at least 6"
    )


def test_window_too_long_for_train_part():
    with pytest.raises(InputError, match=r"window 40 is too long for the series: its train part has 34 rows"):
        make_windows(ramp_prices(50), WindowConfig(window=40))


def test_window_one_short_of_fitting_is_refused():
    with pytest.raises(InputError, match=r"window 4 .* val part has 3 rows .* needs at least 5"):
        make_windows(ramp_prices(50), WindowConfig(window=4))


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


# --- embargo ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("embargo", [1, 2])
def test_embargo_leaves_windows_of_rows_between_parts(gspc, embargo):
    w = make_windows(gspc, WindowConfig(embargo=embargo))
    last_train_target = int(w.starts["train"][-1]) + 30
    first_val_row = int(w.starts["val"][0])
    last_val_target = int(w.starts["val"][-1]) + 30
    assert first_val_row - last_train_target - 1 == 30 * embargo  # rows used by no sample
    assert int(w.starts["test"][0]) - last_val_target - 1 == 30 * embargo


def test_values_inside_the_embargo_change_nothing():
    prices = ramp_prices(100)
    cfg = WindowConfig(window=5)  # train feature rows 0..68 (prices 0..69); val from feature row 74 (prices 74..)
    base = make_windows(prices, cfg)
    changed = prices.copy()
    changed.iloc[71:74] *= 3.0  # price rows strictly inside the embargo
    other = make_windows(changed, cfg)
    for name in SPLITS:
        x0, y0 = base.split(name)
        x1, y1 = other.split(name)
        assert torch.equal(x0, x1) and torch.equal(y0, y1), name
    changed.iloc[74] *= 3.0  # control: the first price the val part reads
    assert not torch.equal(make_windows(changed, cfg).split("val")[0], base.split("val")[0])


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("embargo", 0, "embargo must be at least 1 window between parts, got 0"),
        ("folds", 1, "folds must be 0 (one validation split) or at least 2, got 1"),
        ("folds", -2, "folds must be 0 (one validation split) or at least 2, got -2"),
    ],
)
def test_embargo_and_folds_refused(field, value, message):
    with pytest.raises(InputError) as err:
        make_windows(ramp_prices(200), WindowConfig(**{field: value}))
    assert str(err.value) == message


# --- several tickers ----------------------------------------------------------------------------------


def pooled_prices() -> dict[str, pd.DataFrame]:
    """Two tickers on overlapping business-day ranges: A has 120 days, B starts 10 days later with 110."""
    a = ramp_prices(120)
    b = ramp_prices(120).iloc[10:] * 2.0
    b["Close"] = b["Close"] ** 1.5  # another return pattern than A
    return {"A": a, "B": b}


POOL_CFG = WindowConfig(window=4)


def test_pooled_windows_never_cross_tickers():
    w = make_windows(pooled_prices(), POOL_CFG)
    assert w.segments == {"A": (0, 119), "B": (119, 228)}
    for name in SPLITS:
        for start in w.starts[name].tolist():
            hi = next(seg_hi for seg_lo, seg_hi in w.segments.values() if seg_lo <= start < seg_hi)
            assert start + POOL_CFG.window < hi  # window and target inside the start's ticker


def test_pooled_split_dates_are_the_same_for_every_ticker():
    prices = pooled_prices()
    w = make_windows(prices, POOL_CFG)
    calendar = make_features(prices["A"]).index  # A covers every date B has
    bounds = part_bounds(len(calendar), POOL_CFG)
    for name in SPLITS:
        lo, hi = bounds[name]
        for ticker, (seg_lo, seg_hi) in w.segments.items():
            starts = w.starts[name][(w.starts[name] >= seg_lo) & (w.starts[name] < seg_hi)]
            window_dates = w.dates[starts.numpy()]
            target_dates = w.dates[(starts + POOL_CFG.window).numpy()]
            first = max(calendar[lo], w.dates[seg_lo])  # B's history begins inside the train part
            assert window_dates.min() == first, (name, ticker)  # every ticker starts the part on its date
            assert target_dates.max() == calendar[hi - 1], (name, ticker)


def test_pooled_scaler_per_ticker_fitted_on_its_train_rows():
    prices = pooled_prices()
    w = make_windows(prices, POOL_CFG)
    a_end = part_bounds(119, POOL_CFG)["train"][1]  # 83 train rows of the 119-date calendar
    for ticker, frame in prices.items():
        features = make_features(frame)
        train = features[features.index < features.index.union(make_features(prices["A"]).index)[a_end]]
        np.testing.assert_allclose(w.scalers[ticker].mean_, train.mean().to_numpy(), rtol=1e-10)
        np.testing.assert_allclose(w.scalers[ticker].scale_, train.std(ddof=0).to_numpy(), rtol=1e-10)
    assert len(w.scalers["A"].mean_) == 5
    assert w.scalers["B"].n_samples_seen_ == 73  # B starts 10 dates later
    assert w.scaler is w.scalers["A"]


def test_pooled_naive_loss_uses_each_tickers_own_zero_return():
    w = make_windows(pooled_prices(), POOL_CFG)
    total, count = 0.0, 0
    for start in w.starts["val"].tolist():
        row = start + POOL_CFG.window
        ticker = next(t for t, (lo, hi) in w.segments.items() if lo <= row < hi)
        zero = -w.scalers[ticker].mean_[0] / w.scalers[ticker].scale_[0]
        total += (float(w.features[row, 0]) - zero) ** 2
        count += 1
    assert w.naive_loss("val") == pytest.approx(total / count, rel=1e-5)


def test_pooled_no_look_ahead_in_another_ticker():
    prices = pooled_prices()
    base = make_windows(prices, POOL_CFG)
    changed = {k: v.copy() for k, v in prices.items()}
    changed["B"].iloc[-10:] *= 5.0  # B's test part only (from calendar date 105 of 119)
    other = make_windows(changed, POOL_CFG)
    for name in ("train", "val"):
        assert torch.equal(base.split(name)[0], other.split(name)[0])
    assert not torch.equal(base.split("test")[0], other.split("test")[0])


def test_pooled_tickers_keep_the_features_they_share(caplog):
    prices = pooled_prices()
    prices["B"] = prices["B"][["Close"]]
    w = make_windows(prices, POOL_CFG)
    assert w.feature_names == ["close"]
    assert "pooled tickers do not all have high, low, open, volume; training on close only" in caplog.text


def test_pooled_short_ticker_refused_by_name():
    prices = pooled_prices()
    prices["C"] = ramp_prices(120).iloc[100:]  # only in the test part
    with pytest.raises(InputError, match=r"window 4 is too long for C: its train part has 0 rows"):
        make_windows(prices, POOL_CFG)


# --- walk-forward folds -------------------------------------------------------------------------------


def test_fold_bounds_are_time_series_split_with_the_embargo_as_gap():
    folds = fold_bounds(99, WindowConfig(window=5, folds=3))  # 84 dates before the test part
    # TimeSeriesSplit(3, gap=5) on 84: val blocks of 84 // 4 = 21, train ends gap before each.
    assert folds == [
        {"train": (0, 16), "val": (21, 42)},
        {"train": (0, 37), "val": (42, 63)},
        {"train": (0, 58), "val": (63, 84)},
    ]


def test_folds_fit_their_own_scalers_and_never_see_the_test_part():
    prices = ramp_prices(300)
    cfg = WindowConfig(window=5, folds=3)
    w = make_windows(prices, cfg)
    assert len(w.folds) == 3 and w.validation_sets == w.folds
    test_start = w.dates[int(w.starts["test"][0])]
    features = make_features(prices)
    for fold, parts in zip(w.folds, fold_bounds(len(features), cfg), strict=True):
        assert set(fold.starts) == {"train", "val"}
        assert fold.dates[(fold.starts["val"][-1] + 5).item()] < test_start
        lo, hi = parts["train"]
        np.testing.assert_allclose(fold.scaler.mean_, features.iloc[lo:hi].mean().to_numpy(), rtol=1e-10)
        assert int(fold.starts["val"][0]) == parts["val"][0]
    changed = prices.copy()
    changed.iloc[-30:] *= 4.0  # inside the test part
    other = make_windows(changed, cfg)
    for a, b in zip(w.folds, other.folds, strict=True):
        assert torch.equal(a.split("val")[0], b.split("val")[0])
        assert torch.equal(a.split("train")[1], b.split("train")[1])


def test_without_folds_the_objective_validates_on_the_split():
    w = make_windows(ramp_prices(100), K10_CFG)
    assert w.folds == [] and w.validation_sets == [w]


def test_too_many_folds_refused():
    with pytest.raises(InputError, match=r"cannot cut 40 walk-forward folds from 84 dates"):
        make_windows(ramp_prices(100), WindowConfig(window=5, folds=40))


def test_walk_forward_folds_leave_out_a_ticker_not_yet_listed():
    prices = {"A": ramp_prices(300), "B": ramp_prices(300).iloc[150:] * 3.0}  # B listed on calendar date 150
    w = make_windows(prices, WindowConfig(window=5, folds=3))
    assert set(w.segments) == {"A", "B"}  # the main split needs every ticker
    assert [sorted(fold.segments) for fold in w.folds] == [["A"], ["A"], ["A", "B"]]
    # In fold 3, B trains on its own 36 rows before the fold's train end (calendar 186), scaled by itself.
    b_features = make_features(prices["B"])
    np.testing.assert_allclose(w.folds[2].scalers["B"].mean_, b_features.iloc[:36].mean().to_numpy(), rtol=1e-10)


# --- no look-ahead across every boundary ------------------------------------------------------------

LOOK_AHEAD_CFG = WindowConfig(window=5, folds=3)


def noisy_prices(n: int, seed: int) -> pd.DataFrame:
    """A random walk with OHLC and volume around it: every feature varies, unlike the ramp."""
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.01, n)))
    prices = ramp_prices(n)
    return prices.assign(Open=close * 0.99, High=close * 1.02, Low=close * 0.97, Close=close)


def before_and_after(data, boundary: str):
    """(the Windows, the parts before the boundary, the part right after it)."""
    if boundary == "train|val":
        return data, ["train"], "val"
    if boundary == "val|test":
        return data, ["train", "val"], "test"
    fold = data.folds[int(boundary.split()[1]) - 1]
    return fold, ["train"], "val"


@pytest.mark.parametrize("pooled", [False, True], ids=["one series", "pooled"])
@pytest.mark.parametrize("boundary", ["train|val", "val|test", "fold 1", "fold 2", "fold 3"])
def test_no_look_ahead_across_any_boundary(boundary, pooled):
    """Change every price after the last date a part before the boundary uses: its inputs, targets, naive
    forecast and every scaler stay bit-identical; the part after the boundary does change."""
    prices = {"A": noisy_prices(300, 0), "B": noisy_prices(280, 1).iloc[20:]} if pooled else noisy_prices(300, 0)
    base, before, after = before_and_after(make_windows(prices, LOOK_AHEAD_CFG), boundary)
    last = max(base.target_dates(name).max() for name in before)  # a target is the last row a sample uses
    rng = np.random.default_rng(2)

    def shaken(frame: pd.DataFrame) -> pd.DataFrame:
        frame = frame.copy()
        later = frame.index > last
        frame.loc[later] = frame.loc[later].to_numpy() * rng.uniform(0.5, 3.0, size=frame.loc[later].shape)
        return frame

    changed = {k: shaken(v) for k, v in prices.items()} if pooled else shaken(prices)
    other, _, _ = before_and_after(make_windows(changed, LOOK_AHEAD_CFG), boundary)
    for name in before:
        rows = base.starts[name] + base.window
        assert torch.equal(base.starts[name], other.starts[name])
        assert torch.equal(base.inputs(base.starts[name]), other.inputs(other.starts[name]))
        assert torch.equal(base.targets(base.starts[name]), other.targets(other.starts[name]))
        assert torch.equal(base.naive_rows[rows], other.naive_rows[rows])
    assert base.scalers.keys() == other.scalers.keys() and len(base.scalers) == (2 if pooled else 1)
    for ticker, scaler in base.scalers.items():
        np.testing.assert_array_equal(scaler.mean_, other.scalers[ticker].mean_)
        np.testing.assert_array_equal(scaler.scale_, other.scalers[ticker].scale_)
    assert not torch.equal(base.split(after)[0], other.split(after)[0])  # the change is seen after the boundary


def test_training_and_validation_ignore_the_test_part():
    """The whole objective side, trained: with only test-part prices changed, every seed's curves are
    bit-identical, on the one split and on walk-forward folds."""
    prices = noisy_prices(400, 3)
    changed = prices.copy()
    changed.iloc[-40:] *= 1.7  # inside the test part (the last 15% of 399 feature rows)
    cfg = TrainConfig(max_epochs=2, seeds=2, batch_size=32)
    model = ModelConfig(model="rnn", hidden_size=4, dropout_type="variational", dropout_rate=0.3)
    for window_cfg in (WindowConfig(window=5), LOOK_AHEAD_CFG):
        base, other = make_windows(prices, window_cfg), make_windows(changed, window_cfg)
        assert not torch.equal(base.split("test")[0], other.split("test")[0])
        runs = [train_validation(model, cfg, data) for data in (base, other)]
        assert len(runs[0]) == cfg.seeds * max(1, window_cfg.folds)
        for a, b in zip(*runs, strict=True):
            assert [s.train_loss for s in a.history] == [s.train_loss for s in b.history]
            assert a.val_curve == b.val_curve
