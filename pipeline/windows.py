"""Stage 2 — windows: leakage-free, chronologically split training samples.

In:  the clean price frame from `ingest` (Date index; Close and optionally Open, High, Low, Volume).
Out: `Windows`: the scaled feature matrix (N rows, F features) and, per split, the first row of each
     sample's window. Sample s covers rows s .. s+window-1 and its target is the close-to-close log
     return of row s+window (the next day).

Leakage rules (each one tested):
- The rows are cut chronologically into train / val / test parts (default 70/15/15). A sample's window
  *and* its target lie inside one part, so no sample crosses a boundary.
- The scaler is fitted on the train part only (fitting it on the whole series leaks the future).
- The split depends only on the data and fractions, never on a seed; only the order of training
  batches is shuffled (in `train`).
Windows are views of one (feature-major) array (`Tensor.unfold`): memory stays O(rows × features), and a
batch is gathered only when it is used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.preprocessing import StandardScaler

from pipeline.errors import InputError

SPLITS = ("train", "val", "test")


@dataclass
class WindowConfig:
    """How samples are cut from the series."""

    window: int = 30  # days of history per sample
    train_frac: float = 0.70
    val_frac: float = 0.15  # the test part is the rest


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
    scaler: StandardScaler  # fitted on the train part's rows only

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

    def naive_target(self) -> float:
        """The zero-return forecast in scaled units: (0 - mean) / std of the train close returns."""
        return float(-self.scaler.mean_[0] / self.scaler.scale_[0])

    def naive_loss(self, name: str) -> float:
        """MSE of the zero-return forecast on one split, in the same units as the models' losses."""
        targets = self.targets(self.starts[name])
        return float(((targets - self.naive_target()) ** 2).mean())


def part_bounds(n_rows: int, cfg: WindowConfig) -> dict[str, tuple[int, int]]:
    """Row ranges [lo, hi) of the train, val and test parts."""
    a = int(n_rows * cfg.train_frac)
    b = int(n_rows * (cfg.train_frac + cfg.val_frac))
    return {"train": (0, a), "val": (a, b), "test": (b, n_rows)}


def make_windows(prices: pd.DataFrame, cfg: WindowConfig) -> Windows:
    """Build the features, split them chronologically, fit the scaler on train, index the samples."""
    check_window_config(cfg)
    frame = make_features(prices)
    bounds = part_bounds(len(frame), cfg)
    starts = {}
    for name, (lo, hi) in bounds.items():
        # Window rows s..s+window-1 and target row s+window must all lie in [lo, hi).
        if hi - lo < cfg.window + 1:
            raise InputError(
                f"window {cfg.window} is too long for the series: its {name} part has {hi - lo} rows "
                f"({len(frame) + 1} days in all) and needs at least {cfg.window + 1}"
            )
        starts[name] = torch.arange(lo, hi - cfg.window, dtype=torch.int64)
    values = frame.to_numpy(dtype=np.float64)
    lo, hi = bounds["train"]
    scaler = StandardScaler().fit(values[lo:hi])
    scaled = torch.from_numpy(scaler.transform(values).astype(np.float32))
    return Windows(scaled, starts, cfg.window, list(frame.columns), frame.index, scaler)


def check_window_config(cfg: WindowConfig) -> None:
    if cfg.window < 1:
        raise InputError(f"window must be at least 1, got {cfg.window}")
    if not (0 < cfg.train_frac < 1 and 0 < cfg.val_frac < 1 and cfg.train_frac + cfg.val_frac < 1):
        raise InputError(
            f"train_frac and val_frac must be in (0, 1) and leave a test part; got {cfg.train_frac} and {cfg.val_frac}"
        )
