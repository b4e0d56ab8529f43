"""Stage 2 — windows: leakage-free, chronologically split training samples.

In:  the clean price frame from `ingest` (Date index; Close and optionally Open, High, Low, Volume), or
     several of them ({ticker: frame}) to pool for training.
Out: `Windows`: the scaled feature matrix (N rows, F features; the tickers' rows one after the other)
     and, per split, the first row of each sample's window. Sample s covers rows s .. s+window-1 and its
     target is the close-to-close log return of row s+window (the next day). With `folds` >= 2 it also
     carries one `Windows` per walk-forward fold (train and val only).

Leakage rules (each one tested):
- The split is by date: the calendar (every date any ticker has) is cut chronologically into train /
  val / test parts (default 70/15/15), the same dates for every ticker. An embargo of `embargo` windows
  of rows is left out before the val and before the test part (López de Prado, "Advances in Financial
  Machine Learning", 2018, ch. 7: samples next to a boundary share information with the other side).
- A sample's window *and* its target lie inside one part of one ticker: no sample crosses a boundary or
  goes from one ticker to another.
- Each ticker's scaler is fitted on its train part only (fitting it on the whole series leaks the future).
- Walk-forward folds (scikit-learn's `TimeSeriesSplit`, with the embargo as its `gap`) cut the dates
  before the test part; each fold fits its own scalers on its own train rows.
- The split depends only on the data and the config, never on a seed; only the order of training
  batches is shuffled (in `train`).
Windows are views of one (feature-major) array (`Tensor.unfold`): memory stays O(rows × features), and a
batch is gathered only when it is used.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from sklearn.model_selection import TimeSeriesSplit
from sklearn.preprocessing import StandardScaler

from pipeline.errors import InputError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
Parts = dict[str, tuple[int, int]]  # split -> [lo, hi) positions in the calendar (or in one series' rows)


@dataclass
class WindowConfig:
    """How samples are cut from the series."""

    window: int = 30  # days of history per sample
    train_frac: float = 0.70
    val_frac: float = 0.15  # the test part is the rest
    embargo: int = 1  # windows of rows left out between parts (at least 1)
    folds: int = 0  # 0: one train/val split; k >= 2: walk-forward validation with k folds (TimeSeriesSplit)


def make_features(prices: pd.DataFrame) -> pd.DataFrame:
    """Log-return features, one row per day from the second day on.

    close: log(C_t / C_{t-1}); open/high/low: log(X_t / C_{t-1}); volume: log((V_t+1) / (V_{t-1}+1))
    (the +1 keeps days with zero volume finite). Columns absent from `prices` are left out.
    """
    prev_close = prices["Close"].shift(1)
    features = {"close": np.log(prices["Close"] / prev_close)}
    for column in ("Open", "High", "Low"):
        if column in prices:
            features[column.lower()] = np.log(prices[column] / prev_close)
    if "Volume" in prices:
        features["volume"] = np.log1p(prices["Volume"]).diff()
    return pd.DataFrame(features, index=prices.index).iloc[1:]


@dataclass
class Windows:
    """Scaled features plus the sample starts of each split. Target = scaled `close` of the next row."""

    features: torch.Tensor  # (N, F) float32, scaled with train-part statistics (a view of feature-major storage)
    starts: dict[str, torch.Tensor]  # split -> (S,) int64 first row of each sample's window
    window: int
    feature_names: list[str]
    dates: pd.DatetimeIndex  # (N,) date of each feature row
    scalers: dict[str, StandardScaler]  # ticker -> scaler fitted on that ticker's train rows only
    segments: dict[str, tuple[int, int]]  # ticker -> its rows [lo, hi) of `features`
    naive_rows: torch.Tensor = field(repr=False)  # (N,) the zero-return forecast in each row's scaled units
    folds: list[Windows] = field(default_factory=list)  # walk-forward folds (train and val only)
    prices: pd.DataFrame | None = field(default=None, repr=False)  # the first ticker's clean prices (serving)

    def __post_init__(self) -> None:
        # Stored feature-major, (F, N): each window of one feature is then a contiguous run of `window`
        # floats, which makes gathering a batch ~3x faster than from (N, F). `features` stays the (N, F)
        # view of that one storage (writes to it are seen by every window), and the windows are a view
        # of it too: (N - window + 1, F, window), no copy.
        self._by_feature = self.features.t().contiguous()
        self.features = self._by_feature.t()
        self._view = self._by_feature.unfold(1, self.window, 1).transpose(0, 1)

    @property
    def n_features(self) -> int:
        return self.features.shape[1]

    @property
    def scaler(self) -> StandardScaler:
        """The scaler of the first (or only) ticker: what a served model applies to new prices."""
        return next(iter(self.scalers.values()))

    @property
    def validation_sets(self) -> list[Windows]:
        """What the objective validates on: the walk-forward folds if any, else this train/val split."""
        return self.folds or [self]

    def inputs(self, starts: torch.Tensor) -> torch.Tensor:
        """(S,) starts -> (S, window, F) inputs, gathered from the view; laid out (S, F, window) in memory,
        which the CNN uses as it is and the recurrent models make (S, window, F)-contiguous."""
        return self._view.index_select(0, starts).transpose(1, 2)

    def targets(self, starts: torch.Tensor) -> torch.Tensor:
        """(S,) starts -> (S,) scaled next-day close returns."""
        return self.features[starts + self.window, 0]

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """All inputs (S, window, F) and targets (S,) of one split."""
        return self.inputs(self.starts[name]), self.targets(self.starts[name])

    def target_dates(self, name: str) -> pd.DatetimeIndex:
        return self.dates[(self.starts[name] + self.window).numpy()]

    def naive_loss(self, name: str) -> float:
        """MSE of the zero-return forecast on one split, in the same units as the models' losses."""
        rows = self.starts[name] + self.window
        return float(((self.features[rows, 0] - self.naive_rows[rows]) ** 2).mean())

    def naive_validation_loss(self) -> float:
        """The zero-return forecast's val MSE, averaged over the validation sets (folds or the one split)."""
        return float(np.mean([part.naive_loss("val") for part in self.validation_sets]))


def part_bounds(n_rows: int, cfg: WindowConfig) -> Parts:
    """Positions [lo, hi) of the train, val and test parts among `n_rows` dates, embargo left out."""
    a = int(n_rows * cfg.train_frac)
    b = int(n_rows * (cfg.train_frac + cfg.val_frac))
    gap = cfg.embargo * cfg.window
    return {"train": (0, a), "val": (min(a + gap, b), b), "test": (min(b + gap, n_rows), n_rows)}


def fold_bounds(n_rows: int, cfg: WindowConfig) -> list[Parts]:
    """Walk-forward folds over the dates before the test part: expanding train, next block as val,
    `embargo` windows of dates between them (TimeSeriesSplit's `gap`)."""
    dev = int(n_rows * (cfg.train_frac + cfg.val_frac))
    splitter = TimeSeriesSplit(n_splits=cfg.folds, gap=cfg.embargo * cfg.window)
    try:
        cuts = list(splitter.split(np.arange(dev)))
    except ValueError as exc:  # too few dates for that many folds with this gap
        raise InputError(f"cannot cut {cfg.folds} walk-forward folds from {dev} dates: {exc}") from None
    return [{"train": (0, int(train[-1]) + 1), "val": (int(val[0]), int(val[-1]) + 1)} for train, val in cuts]


def make_windows(prices: pd.DataFrame | Mapping[str, pd.DataFrame], cfg: WindowConfig) -> Windows:
    """Build the features, split them by date, fit each ticker's scaler on its train rows, index the
    samples. `prices` is one clean frame or {ticker: clean frame} to pool."""
    check_window_config(cfg)
    series = dict(prices) if isinstance(prices, Mapping) else {"series": prices}
    features = common_features({ticker: make_features(frame) for ticker, frame in series.items()})
    calendar = pd.DatetimeIndex(np.unique(np.concatenate([frame.index.to_numpy() for frame in features.values()])))
    gap = cfg.embargo * cfg.window
    data = assemble(features, calendar, part_bounds(len(calendar), cfg), cfg.window, "", gap)
    data.prices = next(iter(series.values()))  # a served model reads price rows like these
    if cfg.folds:
        folds = fold_bounds(len(calendar), cfg)
        data.folds = [
            assemble(features, calendar, parts, cfg.window, f"walk-forward fold {k + 1} of {cfg.folds}: ", gap, False)
            for k, parts in enumerate(folds)
        ]
    return data


def common_features(features: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Keep the feature columns every ticker has (in the first ticker's order); warn about the others."""
    first = next(iter(features.values())).columns
    shared = [c for c in first if all(c in frame.columns for frame in features.values())]
    dropped = sorted({c for frame in features.values() for c in frame.columns} - set(shared))
    if dropped:
        log.warning("pooled tickers do not all have %s; training on %s only", ", ".join(dropped), ", ".join(shared))
    return {ticker: frame[shared] for ticker, frame in features.items()}


def assemble(
    features: dict[str, pd.DataFrame],
    calendar: pd.DatetimeIndex,
    parts: Parts,
    window: int,
    what: str,
    gap: int,
    every_ticker: bool = True,
) -> Windows:
    """One `Windows` from each ticker's unscaled features and the parts, as positions in `calendar`.

    A part [lo, hi) holds the dates calendar[lo] <= d < calendar[hi]; each ticker's part must fit a
    window and its target. A ticker whose part does not is refused (`what` prefixes the message; `gap`,
    the embargo in rows, is named in it), or, unless `every_ticker`, left out (an early walk-forward fold
    may predate a ticker's listing), as long as one ticker remains.
    """
    blocks, dates, naive = [], [], []
    starts: dict[str, list[torch.Tensor]] = {name: [] for name in parts}
    scalers, segments, offset, refusals = {}, {}, 0, []
    for ticker, frame in features.items():
        rows = {name: rows_between(frame.index, calendar, lo, hi) for name, (lo, hi) in parts.items()}
        # Window rows s..s+window-1 and target row s+window must all lie in [lo, hi).
        short = next((name for name, (lo, hi) in rows.items() if hi - lo < window + 1), None)
        if short:
            where, (lo, hi) = "the series" if ticker == "series" else ticker, rows[short]
            days = len(frame) + 1  # a feature row per day after the first
            why = (
                f"it has {days} days in all"
                if window >= days
                else f"its {short} part has {hi - lo} rows ({days} days in all, {gap} left out before val and "
                f"before test as embargo) and needs at least {window + 1}"
            )
            refusals.append(f"{what}window {window} is too long for {where}: {why}")
            if every_ticker:
                break
            continue
        for name, (lo, hi) in rows.items():
            starts[name].append(torch.arange(offset + lo, offset + hi - window, dtype=torch.int64))
        values = frame.to_numpy(dtype=np.float64)
        lo, hi = rows["train"]
        scalers[ticker] = StandardScaler().fit(values[lo:hi])
        blocks.append(scalers[ticker].transform(values).astype(np.float32))
        naive.append(np.full(len(frame), -scalers[ticker].mean_[0] / scalers[ticker].scale_[0], dtype=np.float32))
        dates.append(frame.index)
        segments[ticker] = (offset, offset + len(frame))
        offset += len(frame)
    if refusals and (every_ticker or not segments):
        raise InputError(refusals[0])
    return Windows(
        features=torch.from_numpy(np.concatenate(blocks)),
        starts={name: torch.cat(parts_starts) for name, parts_starts in starts.items()},
        window=window,
        feature_names=list(next(iter(features.values())).columns),
        dates=pd.DatetimeIndex(np.concatenate([d.to_numpy() for d in dates])),
        scalers=scalers,
        segments=segments,
        naive_rows=torch.from_numpy(np.concatenate(naive)),
    )


def rows_between(dates: pd.DatetimeIndex, calendar: pd.DatetimeIndex, lo: int, hi: int) -> tuple[int, int]:
    """The rows [first, last) of one ticker's sorted `dates` that fall in calendar[lo] <= d < calendar[hi]."""

    def position(i: int) -> int:
        return len(dates) if i >= len(calendar) else int(dates.searchsorted(calendar[i]))

    return position(lo), position(hi)


def check_window_config(cfg: WindowConfig) -> None:
    if cfg.window < 1:
        raise InputError(f"window must be at least 1, got {cfg.window}")
    if not (0 < cfg.train_frac < 1 and 0 < cfg.val_frac < 1 and cfg.train_frac + cfg.val_frac < 1):
        raise InputError(
            f"train_frac and val_frac must be in (0, 1) and leave a test part; got {cfg.train_frac} and {cfg.val_frac}"
        )
    if cfg.embargo < 1:
        raise InputError(f"embargo must be at least 1 window between parts, got {cfg.embargo}")
    if cfg.folds < 0 or cfg.folds == 1:
        raise InputError(f"folds must be 0 (one validation split) or at least 2, got {cfg.folds}")
