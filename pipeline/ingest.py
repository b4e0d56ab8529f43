"""Stage 1 — ingest: turn a ticker or a CSV file into one clean daily price frame.

In:  a ticker (a file shipped in `data/`, a series in the cache `data/cache/`, or a fresh yfinance
     download) or a CSV path in one of the layouts people have on disk (one header line, or the three
     header lines that `DataFrame.to_csv()` writes for a recent yfinance download, or its two-line variant).
Out: a DataFrame indexed by `Date` (ascending, unique, tz-naive) with float64 columns, in this order,
     among Open, High, Low, Close, Volume. Close is always present; the others when the source has them.
     Next to it (`load_prices_with_report`), a `QualityReport`: what was read, dropped, filled, adjusted
     and flagged.

The cache holds one clean series per name: `<name>.csv` and a metadata sidecar `<name>.json` (where it
came from, when, its dates, its adjustment). Downloads are refreshed incrementally; `store_csv` (the
`ingest --csv` command) puts a CSV file's clean series there, to be loaded later by name, never from
yfinance. Nothing here touches MLflow: a bad input fails before any run is started.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import InputError

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# Real series shipped with the repository, so the default job runs offline (see data/README.md).
SHIPPED = {
    "^GSPC": "GSPC_1999-2018_daily.csv",
    "MSFT": "MSFT_1986-2017_daily_yf-multiheader.csv",
}
COLUMNS = ("Open", "High", "Low", "Close", "Volume")
SPLITS = "Stock Splits"  # yfinance's name: the split ratio on the split day (2.0 for 2:1), 0 elsewhere
# Column names are matched ignoring case, spaces and underscores ("adj close", "Adj_Close", "AdjClose").
# Adj Close is dropped unless price_column asks for it: prices from yfinance are auto-adjusted already,
# and an adjusted close next to unadjusted O/H/L would create fake jumps. Any other column (Dividends,
# Change %, ...) is dropped: a dividend does not change the share count, and dividend adjustment is what
# Adj Close is for.
ALIASES = {
    "open": "Open",
    "high": "High",
    "low": "Low",
    "close": "Close",
    "volume": "Volume",
    "adjclose": "Adj Close",
    "stocksplits": SPLITS,
    "splits": SPLITS,
    "split": SPLITS,
}
PRICE_COLUMNS = ("Close", "Adj Close")
MAX_FILL_DAYS = 3  # isolated gaps up to this many rows are forward-filled; longer gaps are refused
# |daily log return of Close| above this (a fall of 22% or a rise of 28%) is flagged in the report, not
# removed: real crashes exist (MSFT 1987-10-19: 0.36), but so do unadjusted splits (2:1 gives 0.69).
LARGE_MOVE = 0.25
SAFE_TICKER = re.compile(r"^[A-Za-z0-9^=._-]{1,32}$")
# Yahoo rate-limits by raising (YFRateLimitError) or by answering with an empty frame; both are retried.
ATTEMPTS = 3  # yfinance calls per fetch before falling back to the cache
BACKOFF_S = 0.5  # wait before the second attempt, doubled before each further one (0.5 s, 1 s)
# An incremental refresh re-reads the cache's last day; if its close moved by more than this (relative),
# the history was re-adjusted since (a split or dividend) and is downloaded again in full. Any dividend
# (>= 0.1% of the price) is far above it; float noise between two fetches of the same value is far below.
REVISION_RTOL = 1e-4
YFINANCE_ADJUSTMENT = "yfinance auto_adjust=True: splits and dividends"


@dataclass
class IngestConfig:
    """Where the prices come from."""

    ticker: str = "^GSPC"  # a shipped series (^GSPC, MSFT) or any yfinance ticker
    tickers: str = ""  # comma-separated tickers pooled for training (replaces ticker when given)
    csv: str = ""  # a CSV file to read instead of the ticker
    # "Close", or "Adj Close": Close becomes the adjusted close, Open/High/Low scaled by the same factor
    price_column: str = "Close"


@dataclass(frozen=True)
class QualityReport:
    """What cleaning read, dropped, filled, adjusted and flagged in one series (dates as YYYY-MM-DD)."""

    source: str  # the ticker or CSV path, as the user gave it
    rows_read: int
    rows_kept: int
    duplicate_dates: int  # rows dropped because a later row has the same date
    empty_rows: int  # rows without any value, dropped
    cells_filled: int  # missing values forward-filled (gaps of up to MAX_FILL_DAYS rows)
    first_date: str
    last_date: str
    columns: tuple[str, ...]
    price_column: str = "Close"
    large_moves: tuple[str, ...] = ()  # dates whose |log return of Close| > the threshold (kept, not removed)
    large_move_threshold: float = LARGE_MOVE
    splits_applied: int = 0  # splits of the split column whose jump was taken out of the prices
    splits_already_adjusted: int = 0  # splits the prices show no jump for (adjusted at the source), left as is

    def summary(self) -> str:
        """One line: rows, dates, columns, what cleaning changed, and the large moves."""
        columns = ", ".join(self.columns)
        if self.price_column == "Adj Close":
            columns += " (Close = Adj Close, Open/High/Low scaled)"
        counts = [(self.duplicate_dates, "duplicate date", ""), (self.empty_rows, "empty row", "")]
        counts.append((self.cells_filled, "cell", " filled"))
        counts.append((self.splits_applied, "split", " applied"))
        counts.append((self.splits_already_adjusted, "split", " already adjusted"))
        cleaned = ", ".join(_plural(n, noun) + tail for n, noun, tail in counts if n) or "nothing"
        line = (
            f"{self.source}: {_plural(self.rows_kept, 'row')} kept of {self.rows_read} read, "
            f"{self.first_date} .. {self.last_date}, columns {columns}; cleaned: {cleaned}"
        )
        if self.large_moves:
            more = len(self.large_moves) - 3
            dates = ", ".join(self.large_moves[:3]) + (f", +{more} more" if more > 0 else "")
            line += f"; {_plural(len(self.large_moves), 'large move')} flagged ({dates})"
        return line

    def as_params(self) -> dict[str, str | int | float]:
        """Flat {name: scalar} for `mlflow.log_params`, names prefixed `data_` (dates capped at 20)."""
        params = {f"data_{k}": v for k, v in asdict(self).items() if k not in ("columns", "large_moves")}
        dates = ",".join(self.large_moves[:20]) + (",..." if len(self.large_moves) > 20 else "")
        params.update(data_columns=",".join(self.columns), data_large_moves=len(self.large_moves))
        return {**params, "data_large_move_dates": dates}

    def as_dict(self) -> dict[str, Any]:
        """Every field (tuples as lists, all large-move dates) and the summary line: the `data_quality.json` record."""
        record = {**asdict(self), "columns": list(self.columns), "large_moves": list(self.large_moves)}
        return {**record, "summary": self.summary()}


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def load_prices(cfg: IngestConfig, data_dir: Path | None = None) -> pd.DataFrame:
    """Return the clean price frame for `cfg` (CSV file if given, else the ticker)."""
    return load_prices_with_report(cfg, data_dir)[0]


def load_prices_with_report(cfg: IngestConfig, data_dir: Path | None = None) -> tuple[pd.DataFrame, QualityReport]:
    """Return the clean price frame for `cfg` and its QualityReport (source: the CSV path or ticker given).

    `data_dir` (default DATA_DIR, read at call time) holds the shipped files and the `cache/` folder.
    """
    data_dir = data_dir or DATA_DIR
    price_column = canonical_price_column(cfg.price_column)
    if cfg.csv:
        frame, report = clean_prices_with_report(read_price_csv(Path(cfg.csv)), cfg.csv, price_column)
    elif cfg.ticker in SHIPPED:
        path = data_dir / SHIPPED[cfg.ticker]
        frame, report = clean_prices_with_report(read_price_csv(path), str(path), price_column)
    else:
        frame, report = _load_ticker(cfg.ticker, data_dir / "cache", price_column)
    return frame, replace(report, source=cfg.csv or cfg.ticker)


@dataclass(frozen=True)
class Series:
    """One clean price series to train on, under the name the user gave (ticker or CSV path)."""

    name: str
    frame: pd.DataFrame
    report: QualityReport


def load_series(cfg: IngestConfig, data_dir: Path | None = None) -> list[Series]:
    """The series to train on: the CSV file or the ticker, or each of `cfg.tickers` (pooled by `windows`)."""
    names = [name.strip() for name in cfg.tickers.split(",") if name.strip()]
    if not names:
        frame, report = load_prices_with_report(cfg, data_dir)
        return [Series(report.source, frame, report)]
    if cfg.csv:
        raise InputError("give either --csv or --tickers, not both")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"tickers listed more than once: {', '.join(repeated)}")
    single = [replace(cfg, ticker=name, tickers="") for name in names]
    return [Series(one.ticker, *load_prices_with_report(one, data_dir)) for one in single]


def pooled_params(series: list[Series]) -> dict[str, str | int | float]:
    """`data_*` params for MLflow: one series' own record; for several, their counts summed, the widest date
    range and the names (each series' full record goes to the `data_quality.json` artifact)."""
    if len(series) == 1:
        return series[0].report.as_params()
    reports = [one.report for one in series]
    counted = ("rows_read", "rows_kept", "duplicate_dates", "empty_rows", "cells_filled", "splits_applied")
    return {
        "data_source": ",".join(one.name for one in series),
        "data_series": len(series),
        **{f"data_{key}": sum(getattr(report, key) for report in reports) for key in counted},
        "data_large_moves": sum(len(report.large_moves) for report in reports),
        "data_first_date": min(report.first_date for report in reports),
        "data_last_date": max(report.last_date for report in reports),
        "data_price_column": reports[0].price_column,
    }


def store_csv(cfg: IngestConfig, name: str = "", data_dir: Path | None = None) -> tuple[QualityReport, Path]:
    """Clean the CSV file `cfg.csv` and store its series in the cache, to be loaded later as `--ticker name`.

    In:  the config (its `csv` and `price_column`), the name to store under (default: the file's stem made
         safe, e.g. "my prices (2024).csv" -> "my_prices_2024"), the data folder (default DATA_DIR).
    Out: the QualityReport and the cache file written; its metadata says `source: csv:<absolute path>`,
         so loading the name later never asks yfinance. A refused CSV or name writes nothing.
    """
    data_dir = data_dir or DATA_DIR
    name = name or safe_name(Path(cfg.csv).stem, cfg.csv)
    if name in SHIPPED:
        # `--ticker MSFT` always reads the shipped file, so a cache of that name could never be loaded.
        raise InputError(f"{cfg.csv}: cannot store it as {name!r}, the name of a shipped series; give another --ticker")
    path = cache_path(name, data_dir / "cache")
    frame, report = load_prices_with_report(cfg, data_dir)
    write_cache(frame, path, f"csv:{Path(cfg.csv).resolve()}", _adjustment(report))
    return report, path


def safe_name(stem: str, source: str) -> str:
    """A cache name from a file stem: runs of characters a ticker cannot have become "_" (at most 32 characters)."""
    name = re.sub(r"[^A-Za-z0-9^=.-]+", "_", stem).strip("_.")[:32]
    if not name:
        raise InputError(f"{source}: cannot make a cache name of the file name; give one with --ticker NAME")
    return name


def canonical_price_column(name: str) -> str:
    """Canonical "Close" or "Adj Close" for any spelling of them ("adj_close", "AdjClose", ...); else InputError."""
    for column in PRICE_COLUMNS:
        if column_key(name) == column_key(column):
            return column
    raise InputError(f"price_column must be Close or Adj Close, got {name!r}")


def column_key(name: object) -> str:
    """How column names are matched: ignoring case, spaces and underscores."""
    return re.sub(r"[\s_]+", "", str(name)).lower()


# --- CSV files --------------------------------------------------------------------------------


def read_price_csv(path: Path) -> pd.DataFrame:
    """Read a price CSV in any supported layout; columns and index are still raw strings/values."""
    if not path.is_file():
        raise InputError(f"CSV file not found: {path}")
    try:  # utf-8-sig: spreadsheet exports often start with a byte-order mark
        with path.open(newline="", encoding="utf-8-sig") as handle:
            lines = [line for _, line in zip(range(3), handle, strict=False)]
    except UnicodeDecodeError:
        raise InputError(f"{path}: not a text CSV file (a spreadsheet or archive? export it as CSV)") from None
    head = list(csv.reader(lines))
    if not head or not any(cell.strip() for cell in head[0]):
        raise InputError(f"{path}: the file is empty")
    if len(head[0]) < 2:
        raise InputError(
            f"{path}: expected comma-separated columns (Date, ..., Close, ...); found one column {head[0][0]!r}"
        )
    first_cells = [row[0].strip().lower() if row else "" for row in head]
    skip: list[int] = []
    if first_cells[:2] == ["price", "ticker"]:
        # yfinance's to_csv layout: a Price line, a Ticker line and (usually) an empty Date line.
        tickers = sorted({cell for cell in head[1][1:] if cell})
        if len(tickers) > 1:
            raise InputError(f"{path}: holds several tickers ({', '.join(tickers)}); give one file per ticker")
        skip = [1]
        if len(head) > 2 and first_cells[2] == "date" and not any(cell.strip() for cell in head[2][1:]):
            skip.append(2)
    try:
        frame = pd.read_csv(path, skiprows=skip, index_col=0, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot parse as CSV ({str(exc).strip().splitlines()[0]})") from None
    if frame.empty and not any(column_key(column) in ALIASES for column in frame.columns):
        # e.g. the JSON error Yahoo answers for an unknown symbol, saved under a .csv name
        raise InputError(f"{path}: not a price CSV (no Date/Close header; first line {lines[0].strip()[:60]!r})")
    if frame.empty:
        raise InputError(f"{path}: has a header but no data rows")
    return frame


# --- cleaning ---------------------------------------------------------------------------------


def clean_prices(frame: pd.DataFrame, source: str, price_column: str = "Close") -> pd.DataFrame:
    """The clean frame alone (see `clean_prices_with_report`)."""
    return clean_prices_with_report(frame, source, price_column)[0]


def clean_prices_with_report(
    frame: pd.DataFrame, source: str, price_column: str = "Close"
) -> tuple[pd.DataFrame, QualityReport]:
    """Validate and clean a raw price frame: canonical float columns, sorted unique dates; and its report.

    In:  the raw frame (dates as read, column names in any spelling), `source` for messages, and the
         price column ("Close" or "Adj Close", canonical spelling).
    Out: duplicate dates keep the last row, all-empty rows are dropped, gaps of up to MAX_FILL_DAYS rows
         are forward-filled; with a split column (and price column Close), the jumps of raw prices at
         splits are taken out (`_apply_splits`); with "Adj Close", Close becomes the adjusted close and
         Open/High/Low are scaled by Adj Close / Close of their row (the split column is then ignored:
         Adj Close includes splits already). Non-numeric or non-positive prices, negative volumes or
         split ratios and longer gaps are refused with the offending date.
    """
    rows_read = len(frame)
    frame = _canonical_columns(frame, source, price_column)
    frame.index = _parse_dates(frame.index, source)
    for column in frame.columns:
        frame[column] = _to_float(frame[column], column, source)
    frame = frame.sort_index(kind="stable")
    duplicated = frame.index.duplicated(keep="last")
    frame = frame[~duplicated]
    # The split column is an event, not a price: it is neither filled nor part of an "empty" row.
    splits = frame.pop(SPLITS) if SPLITS in frame else None
    empty = frame.isna().all(axis=1)
    frame = frame[~empty]
    if frame.empty:
        raise InputError(f"{source}: no rows with prices")
    for column in PRICE_COLUMNS:
        if column in frame and frame[column].isna().all():
            raise InputError(f"{source}: the {column} column has no values")
    holes = int(frame.isna().sum().sum())
    frame = frame.ffill(limit=MAX_FILL_DAYS)
    missing = frame.isna().any(axis=1)
    if missing.any():
        day = frame.index[missing.argmax()].date()
        raise InputError(f"{source}: missing prices on {day} for longer than {MAX_FILL_DAYS} rows")
    prices = frame.drop(columns="Volume", errors="ignore")
    bad = (prices <= 0).any(axis=1)
    if bad.any():
        day = frame.index[bad.argmax()].date()
        raise InputError(f"{source}: non-positive price on {day} (log returns need prices > 0)")
    if "Volume" in frame and (frame["Volume"] < 0).any():
        day = frame.index[(frame["Volume"] < 0).argmax()].date()
        raise InputError(f"{source}: negative volume on {day}")
    applied = already = 0
    if splits is not None:
        frame, applied, already = _apply_splits(frame, splits, source)
    if price_column == "Adj Close":
        frame = _adjust(frame)
    frame.index.name = "Date"
    moves = np.log(frame["Close"]).diff().abs() > LARGE_MOVE
    report = QualityReport(
        source=source,
        rows_read=rows_read,
        rows_kept=len(frame),
        duplicate_dates=int(duplicated.sum()),
        empty_rows=int(empty.sum()),
        cells_filled=holes,  # every hole was filled, or the gap check above refused the series
        first_date=str(frame.index[0].date()),
        last_date=str(frame.index[-1].date()),
        columns=tuple(frame.columns),
        price_column=price_column,
        large_moves=tuple(str(day.date()) for day in frame.index[moves]),
        splits_applied=applied,
        splits_already_adjusted=already,
    )
    return frame, report


def _canonical_columns(frame: pd.DataFrame, source: str, price_column: str) -> pd.DataFrame:
    # Adj Close only when asked for; the split column only for Close (Adj Close has the splits in it).
    optional = {"Adj Close"} if price_column == "Adj Close" else {SPLITS}
    names = {}
    for column in frame.columns:
        name = ALIASES.get(column_key(column))
        if name and name not in names.values() and (name in COLUMNS or name in optional):
            names[column] = name
    found = ", ".join(str(c) for c in frame.columns)
    if price_column not in names.values():
        raise InputError(f"{source}: no {price_column} column (found: {found})")
    if "Close" not in names.values() and {"Open", "High", "Low"} & set(names.values()):
        raise InputError(f"{source}: no Close column to scale Open/High/Low by Adj Close / Close (found: {found})")
    frame = frame[list(names)].rename(columns=names)
    return frame[[c for c in (*COLUMNS, "Adj Close", SPLITS) if c in frame.columns]].copy()


def _apply_splits(frame: pd.DataFrame, splits: pd.Series, source: str) -> tuple[pd.DataFrame, int, int]:
    """Take the fake jumps of splits out of raw prices; return the frame and (splits applied, already adjusted).

    In:  the clean frame and the split column on the (sorted, unique) dates before empty rows were dropped:
         the ratio on a split day (2.0 for 2:1, 0.5 for a 1:2 reverse split), 0, 1 or empty elsewhere.
    Out: Open/High/Low/Close of every row before a split day divided by the product of the ratios of the
         later splits, Volume multiplied by it (post-split shares), so the series has no jump there.
    A split is applied only where the prices show its jump: the split day's close-to-close move is closer
    to -log(ratio) than to 0. yfinance's `Ticker.history()` (and Yahoo's own Close) carries the split
    column next to prices that are split-adjusted already; dividing them again would create the very jump
    this removes, so such splits are counted as already adjusted and left alone.
    """
    negative = splits < 0
    if negative.any():
        day = splits.index[negative.argmax()].date()
        raise InputError(f"{source}: negative {SPLITS} value {splits[negative].iloc[0]:g} on {day}")
    ratios = splits[(splits > 0) & (splits != 1)]  # NaN compares False: no split
    # A split on a dropped (empty) row acts from the next kept row on: the rows before it are the same.
    positions = frame.index.searchsorted(ratios.index)
    close = frame["Close"].to_numpy()
    factor = np.ones(len(frame))  # per row: the product of the ratios of the applied splits after it
    applied = already = 0
    for position, ratio in zip(positions, ratios, strict=True):
        if position == 0 or position == len(frame):
            continue  # no kept row on both sides of it: nothing to adjust
        move = np.log(close[position] / close[position - 1])
        if abs(move + np.log(ratio)) < abs(move):
            factor[:position] *= ratio
            applied += 1
        else:
            already += 1
    frame = frame.copy()
    for column in ("Open", "High", "Low", "Close"):
        if column in frame:
            frame[column] = frame[column] / factor
    if "Volume" in frame:
        frame["Volume"] = frame["Volume"] * factor
    return frame, applied, already


def _adjust(frame: pd.DataFrame) -> pd.DataFrame:
    """Close := Adj Close; Open/High/Low times Adj Close / Close of their row, so each bar keeps its shape."""
    adjusted = frame.pop("Adj Close")
    if "Close" in frame:
        factor = adjusted / frame["Close"]
        for column in ("Open", "High", "Low"):
            if column in frame:
                frame[column] = frame[column] * factor
    frame["Close"] = adjusted
    return frame[[c for c in COLUMNS if c in frame.columns]]


def _parse_dates(index: pd.Index, source: str) -> pd.DatetimeIndex:
    if isinstance(index, pd.DatetimeIndex):
        dates = index
    else:
        # "2024-03-11 00:00:00-04:00" -> "2024-03-11 00:00:00": keep the exchange-local calendar day, also
        # when the offset changes with daylight saving (mixed offsets would fail to parse as one index).
        strings = index.astype(str).str.replace(
            r"(\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)(?:[+-]\d{2}:?\d{2}|Z)$", r"\1", regex=True
        )
        # One format for the whole column: a day-first date such as 13/01/2024 is refused, not guessed.
        # Parsing dates is most of the cleaning time: the US format is tried only when ISO fails.
        dates = pd.to_datetime(strings, format="ISO8601", errors="coerce")
        if dates.isna().any():
            dates = _us_dates(strings, dates.notna(), source)
    if dates.tz is not None:
        # Exchange-local timestamps (e.g. 2024-01-02 00:00-05:00): keep the local calendar day.
        dates = dates.tz_localize(None)
    return dates.normalize()


def _us_dates(strings: pd.Index, iso: np.ndarray, source: str) -> pd.DatetimeIndex:
    """The dates as MM/DD/YYYY, when not all of them are ISO (`iso`: which ones are); else InputError."""
    dates = pd.to_datetime(strings, format="%m/%d/%Y", errors="coerce")
    us = dates.notna()
    if us.all():
        return dates
    if not (iso | us).all():
        bad = strings[(~(iso | us)).argmax()]
        raise InputError(f"{source}: cannot read {bad!r} as a date (expected YYYY-MM-DD or MM/DD/YYYY)")
    raise InputError(f"{source}: dates mix formats ({strings[iso.argmax()]!r}, {strings[us.argmax()]!r})")


def _to_float(column: pd.Series, name: str, source: str) -> pd.Series:
    values = pd.to_numeric(column, errors="coerce")
    bad = values.isna() & column.notna()
    if bad.any():
        day = column.index[bad.argmax()]
        # "2:1" is refused rather than read: vendors differ on which number is the new share count.
        hint = " (give the ratio as one number: 2 for a 2-for-1 split, 0.5 for 1-for-2)" if name == SPLITS else ""
        raise InputError(f"{source}: non-numeric {name} value {column[bad].iloc[0]!r} on {day.date()}{hint}")
    return values.astype("float64")


# --- yfinance with a local cache ---------------------------------------------------------------


class NoAnswer(Exception):
    """yfinance gave no rows in ATTEMPTS calls; the message is the last reason."""


def load_ticker(ticker: str, cache_dir: Path) -> pd.DataFrame:
    """Download `ticker` with yfinance into the cache; offline or refused, fall back to the cache."""
    return _load_ticker(ticker, cache_dir, "Close")[0]


def _load_ticker(ticker: str, cache_dir: Path, price_column: str) -> tuple[pd.DataFrame, QualityReport]:
    """The clean series of `ticker` and its report, from the cache or yfinance; the cache is updated.

    A series stored from a CSV file (`store_csv`) is read from the cache and never sent to yfinance.
    Downloads are auto-adjusted (no Adj Close column), so price_column "Adj Close" is refused for them,
    before anything is written to the cache.
    """
    path = cache_path(ticker, cache_dir)
    meta = read_cache_meta(path)
    if meta is not None and meta["source"] != "yfinance":
        return clean_prices_with_report(read_price_csv(path), str(path), price_column)
    try:
        frame, report = _refresh(ticker, path, meta, price_column)
    except NoAnswer as failure:
        if path.is_file():
            log.warning(
                "yfinance gave no data for %s in %d attempts (%s); using the cache %s", ticker, ATTEMPTS, failure, path
            )
            return clean_prices_with_report(read_price_csv(path), str(path), price_column)
        raise InputError(
            f"no data for ticker {ticker!r}: yfinance returned nothing in {ATTEMPTS} attempts (last: {failure}) "
            f"and there is no cache at {path}"
        ) from None
    write_cache(frame, path, "yfinance", YFINANCE_ADJUSTMENT)
    return frame, report


def _refresh(
    ticker: str, path: Path, meta: dict[str, Any] | None, price_column: str
) -> tuple[pd.DataFrame, QualityReport]:
    """The whole clean series from yfinance, downloading only the new days when the cache allows it.

    In:  the ticker, its cache file and the cache's verified metadata (None: no cache, a cache of unknown
         origin, or one whose metadata does not match it).
    Out: the clean series and its report; raises NoAnswer when yfinance gives nothing.
    With a yfinance cache, only the days from the cache's last date on are downloaded, and only the days
    after it are appended. Auto-adjusted history changes after every split or dividend (all earlier prices
    are scaled again), so the cache's last day, downloaded again, must have the same close; if it does not
    (or is missing from the answer), appending would glue two different adjustments together, and the full
    history is downloaded instead.
    """
    source = f"yfinance {ticker}"
    if meta is not None:
        cached = clean_prices(read_price_csv(path), str(path))
        last = cached.index[-1]
        new = clean_prices(_fetch(ticker, start=f"{last:%Y-%m-%d}"), source, price_column)
        if last in new.index and list(new.columns) == list(cached.columns):
            was, now = cached.at[last, "Close"], new.at[last, "Close"]
            if abs(now / was - 1) <= REVISION_RTOL:
                return clean_prices_with_report(pd.concat([cached, new[new.index > last]]), source, price_column)
            change = f"the close of {last.date()} changed from {was} (cached) to {now}"
            log.warning(
                "%s: %s: the history was re-adjusted (a split or dividend); downloading it all again", ticker, change
            )
    return clean_prices_with_report(_fetch(ticker), source, price_column)


def _fetch(ticker: str, start: str | None = None) -> pd.DataFrame:
    """One ticker's raw answer with flat columns (from `start`, YYYY-MM-DD, else all history); else NoAnswer."""
    raw, reason = download(ticker, start)
    if raw is None:
        raise NoAnswer(reason)
    return flatten_download(raw, ticker)


def download(ticker: str, start: str | None = None) -> tuple[pd.DataFrame | None, str]:
    """Call yfinance up to ATTEMPTS times; return (frame, "") or (None, the last reason it was empty).

    Yahoo's rate limit shows up as an exception or as an empty answer, so both are retried after a short
    exponential backoff (BACKOFF_S, doubled each time). Never raises for network trouble.
    """
    reason = ""
    for attempt in range(ATTEMPTS):
        if attempt:
            time.sleep(BACKOFF_S * 2 ** (attempt - 1))
        raw, reason = _download_once(ticker, start)
        if raw is not None:
            return raw, ""
    return None, reason


def _download_once(ticker: str, start: str | None) -> tuple[pd.DataFrame | None, str]:
    import yfinance as yf

    # Explicit auto_adjust and no `actions`: prices adjusted for splits and dividends, no split column.
    span = {"start": start} if start else {"period": "max"}
    # yfinance logs each failure at ERROR and emits library warnings; we report one line ourselves.
    yf_log = logging.getLogger("yfinance")
    level, yf_log.level = yf_log.level, logging.CRITICAL
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = yf.download(ticker, **span, auto_adjust=True, progress=False, threads=False)
    except Exception as exc:  # yfinance raises for rate limits and assorted network errors
        return None, f"{type(exc).__name__}: {exc}"
    finally:
        yf_log.setLevel(level)
    if raw is None or raw.empty:
        return None, "empty answer: offline, unknown or delisted ticker"
    return raw, ""


def flatten_download(raw: pd.DataFrame, ticker: str) -> pd.DataFrame:
    """Flatten yfinance's (Price, Ticker) MultiIndex columns; refuse a frame with several tickers."""
    if isinstance(raw.columns, pd.MultiIndex):
        level = raw.columns.names.index("Ticker") if "Ticker" in raw.columns.names else 1
        tickers = sorted(map(str, raw.columns.get_level_values(level).unique()))
        if len(tickers) > 1:
            raise InputError(f"yfinance returned several tickers for {ticker!r}: {', '.join(tickers)}")
        raw = raw.droplevel(level, axis=1)
    raw = raw.copy()
    raw.columns.name = None
    return raw


# --- cache files: the series, then its metadata ------------------------------------------------


def cache_path(ticker: str, cache_dir: Path) -> Path:
    """The cache file of a ticker; names that could escape the cache folder are refused."""
    if not SAFE_TICKER.match(ticker) or ticker.strip(".") == "":
        raise InputError(f"invalid ticker {ticker!r}: use letters, digits and ^ = . _ - only")
    return cache_dir / f"{ticker}.csv"


def meta_path(path: Path) -> Path:
    """The metadata sidecar of a cache file: `<name>.json` next to `<name>.csv`."""
    return path.with_suffix(".json")


def write_cache(frame: pd.DataFrame, path: Path, source: str, adjustment: str) -> dict[str, Any]:
    """Write the clean series to `path`, then its metadata next to it; return the metadata.

    Both writes are atomic, data first. A crash between the two leaves the new data with the old metadata
    (or none); the metadata carries the data's sha256, so `read_cache_meta` then ignores it instead of
    describing the wrong file. Metadata for data that is not there cannot arise: data is never removed.
    """
    data = frame.to_csv().encode()
    _write_bytes_atomic(data, path)
    meta = {
        "source": source,  # "yfinance", or "csv:<absolute path>" for a series stored by `ingest --csv`
        "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "first_date": str(frame.index[0].date()),
        "last_date": str(frame.index[-1].date()),
        "rows": len(frame),
        "columns": list(frame.columns),
        "adjustment": adjustment,
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    _write_bytes_atomic((json.dumps(meta, indent=2) + "\n").encode(), meta_path(path))
    return meta


def read_cache_meta(path: Path) -> dict[str, Any] | None:
    """The metadata of cache file `path`, or None: no metadata, unreadable, or not matching the file."""
    try:
        meta = json.loads(meta_path(path).read_text())
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring the cache metadata of %s: %s", path, exc)
        return None
    if not isinstance(meta, dict) or not isinstance(meta.get("source"), str):
        log.warning("ignoring the cache metadata of %s: no source in it", path)
        return None
    if meta.get("sha256") != hashlib.sha256(data).hexdigest():
        log.warning("ignoring the cache metadata of %s: it does not describe the file (an interrupted write?)", path)
        return None
    return meta


def _adjustment(report: QualityReport) -> str:
    """What the stored prices of a CSV file are adjusted for, in words (for the cache metadata)."""
    if report.price_column == "Adj Close":
        return "Adj Close: splits and dividends (Open/High/Low scaled)"
    if report.splits_applied:
        return f"split column: {_plural(report.splits_applied, 'split')} applied"
    return "none: prices as in the file"


def write_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write `frame` as CSV so that readers only ever see the old file or the complete new one."""
    _write_bytes_atomic(frame.to_csv().encode(), path)


def _write_bytes_atomic(data: bytes, path: Path) -> None:
    # A temporary file in the same folder, then one rename: readers see the old file or the new one.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
