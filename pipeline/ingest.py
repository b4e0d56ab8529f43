"""Stage 1 — ingest: turn a ticker or a CSV file into one clean daily price frame.

In:  a ticker (a file shipped in `data/`, a cached download, or a fresh yfinance download) or a CSV
     path in one of the layouts people have on disk (one header line, or the three header lines that
     `DataFrame.to_csv()` writes for a recent yfinance download, or its two-line variant).
Out: a DataFrame indexed by `Date` (ascending, unique, tz-naive) with float64 columns, in this order,
     among Open, High, Low, Close, Volume. Close is always present; the others when the source has them.
     Next to it (`load_prices_with_report`), a `QualityReport`: what was read, dropped, filled and flagged.

Nothing here touches MLflow: a bad input fails before any run is started.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

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
# Column names are matched ignoring case, spaces and underscores ("adj close", "Adj_Close", "AdjClose").
# Adj Close is dropped unless price_column asks for it: prices from yfinance are auto-adjusted already,
# and an adjusted close next to unadjusted O/H/L would create fake jumps.
ALIASES = {"open": "Open", "high": "High", "low": "Low", "close": "Close", "volume": "Volume", "adjclose": "Adj Close"}
PRICE_COLUMNS = ("Close", "Adj Close")
MAX_FILL_DAYS = 3  # isolated gaps up to this many rows are forward-filled; longer gaps are refused
# |daily log return of Close| above this (a fall of 22% or a rise of 28%) is flagged in the report, not
# removed: real crashes exist (MSFT 1987-10-19: 0.36), but so do unadjusted splits (2:1 gives 0.69).
LARGE_MOVE = 0.25
SAFE_TICKER = re.compile(r"^[A-Za-z0-9^=._-]{1,32}$")


@dataclass
class IngestConfig:
    """Where the prices come from."""

    ticker: str = "^GSPC"  # a shipped series (^GSPC, MSFT) or any yfinance ticker
    csv: str = ""  # a CSV file to read instead of the ticker
    # "Close", or "Adj Close": Close becomes the adjusted close, Open/High/Low scaled by the same factor
    price_column: str = "Close"


@dataclass(frozen=True)
class QualityReport:
    """What cleaning read, dropped, filled and flagged in one series (dates as YYYY-MM-DD)."""

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

    def summary(self) -> str:
        """One line: rows, dates, columns, what cleaning changed, and the large moves."""
        columns = ", ".join(self.columns)
        if self.price_column == "Adj Close":
            columns += " (Close = Adj Close, Open/High/Low scaled)"
        counts = [(self.duplicate_dates, "duplicate date", ""), (self.empty_rows, "empty row", "")]
        counts.append((self.cells_filled, "cell", " filled"))
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


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def load_prices(cfg: IngestConfig, data_dir: Path = DATA_DIR) -> pd.DataFrame:
    """Return the clean price frame for `cfg` (CSV file if given, else the ticker)."""
    return load_prices_with_report(cfg, data_dir)[0]


def load_prices_with_report(cfg: IngestConfig, data_dir: Path = DATA_DIR) -> tuple[pd.DataFrame, QualityReport]:
    """Return the clean price frame for `cfg` and its QualityReport (source: the CSV path or ticker given)."""
    price_column = canonical_price_column(cfg.price_column)
    if cfg.csv:
        frame, report = clean_prices_with_report(read_price_csv(Path(cfg.csv)), cfg.csv, price_column)
    elif cfg.ticker in SHIPPED:
        path = data_dir / SHIPPED[cfg.ticker]
        frame, report = clean_prices_with_report(read_price_csv(path), str(path), price_column)
    else:
        frame, report = _load_ticker(cfg.ticker, data_dir / "cache", price_column)
    return frame, replace(report, source=cfg.csv or cfg.ticker)


def canonical_price_column(name: str) -> str:
    """Canonical "Close" or "Adj Close" for any spelling of them ("adj_close", "AdjClose", ...); else InputError."""
    for column in PRICE_COLUMNS:
        if _key(name) == _key(column):
            return column
    raise InputError(f"price_column must be Close or Adj Close, got {name!r}")


def _key(name: object) -> str:
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
    if frame.empty and not any(_key(column) in ALIASES for column in frame.columns):
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
         are forward-filled; with "Adj Close", Close becomes the adjusted close and Open/High/Low are
         scaled by Adj Close / Close of their row. Non-numeric or non-positive prices, negative volumes
         and longer gaps are refused with the offending date.
    """
    rows_read = len(frame)
    frame = _canonical_columns(frame, source, price_column)
    frame.index = _parse_dates(frame.index, source)
    for column in frame.columns:
        frame[column] = _to_float(frame[column], column, source)
    frame = frame.sort_index(kind="stable")
    duplicated = frame.index.duplicated(keep="last")
    frame = frame[~duplicated]
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
    )
    return frame, report


def _canonical_columns(frame: pd.DataFrame, source: str, price_column: str) -> pd.DataFrame:
    names = {}
    for column in frame.columns:
        name = ALIASES.get(_key(column))
        if name and name not in names.values() and (name != "Adj Close" or price_column == "Adj Close"):
            names[column] = name
    found = ", ".join(str(c) for c in frame.columns)
    if price_column not in names.values():
        raise InputError(f"{source}: no {price_column} column (found: {found})")
    if "Close" not in names.values() and {"Open", "High", "Low"} & set(names.values()):
        raise InputError(f"{source}: no Close column to scale Open/High/Low by Adj Close / Close (found: {found})")
    frame = frame[list(names)].rename(columns=names)
    return frame[[c for c in (*COLUMNS, "Adj Close") if c in frame.columns]].copy()


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
        parsed = {fmt: pd.to_datetime(strings, format=fmt, errors="coerce") for fmt in ("ISO8601", "%m/%d/%Y")}
        dates = next((d for d in parsed.values() if d.notna().all()), None)
        if dates is None:
            iso, us = (d.notna() for d in parsed.values())
            if not (iso | us).all():
                bad = strings[(~(iso | us)).argmax()]
                raise InputError(f"{source}: cannot read {bad!r} as a date (expected YYYY-MM-DD or MM/DD/YYYY)")
            raise InputError(f"{source}: dates mix formats ({strings[iso.argmax()]!r}, {strings[us.argmax()]!r})")
    if dates.tz is not None:
        # Exchange-local timestamps (e.g. 2024-01-02 00:00-05:00): keep the local calendar day.
        dates = dates.tz_localize(None)
    return dates.normalize()


def _to_float(column: pd.Series, name: str, source: str) -> pd.Series:
    values = pd.to_numeric(column, errors="coerce")
    bad = values.isna() & column.notna()
    if bad.any():
        day = column.index[bad.argmax()]
        raise InputError(f"{source}: non-numeric {name} value {column[bad].iloc[0]!r} on {day.date()}")
    return values.astype("float64")


# --- yfinance with a local cache ---------------------------------------------------------------


def load_ticker(ticker: str, cache_dir: Path) -> pd.DataFrame:
    """Download `ticker` with yfinance into the cache; offline or refused, fall back to the cache."""
    return _load_ticker(ticker, cache_dir, "Close")[0]


def _load_ticker(ticker: str, cache_dir: Path, price_column: str) -> tuple[pd.DataFrame, QualityReport]:
    # Downloads are auto-adjusted (no Adj Close column), so price_column "Adj Close" is refused here,
    # before anything is written to the cache.
    path = cache_path(ticker, cache_dir)
    raw, reason = download(ticker)
    if raw is not None and not raw.empty:
        frame, report = clean_prices_with_report(flatten_download(raw, ticker), f"yfinance {ticker}", price_column)
        write_atomic(frame, path)
        return frame, report
    if path.is_file():
        log.warning("yfinance gave no data for %s (%s); using the cache %s", ticker, reason, path)
        return clean_prices_with_report(read_price_csv(path), str(path), price_column)
    raise InputError(
        f"no data for ticker {ticker!r}: yfinance returned nothing ({reason}) and there is no cache at {path}"
    )


def cache_path(ticker: str, cache_dir: Path) -> Path:
    """The cache file of a ticker; names that could escape the cache folder are refused."""
    if not SAFE_TICKER.match(ticker) or ticker.strip(".") == "":
        raise InputError(f"invalid ticker {ticker!r}: use letters, digits and ^ = . _ - only")
    return cache_dir / f"{ticker}.csv"


def download(ticker: str) -> tuple[pd.DataFrame | None, str]:
    """Call yfinance; return (frame or None, why it is empty). Never raises for network trouble."""
    import yfinance as yf

    # yfinance logs each failure at ERROR and emits library warnings; we report one line ourselves.
    yf_log = logging.getLogger("yfinance")
    level, yf_log.level = yf_log.level, logging.CRITICAL
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            raw = yf.download(ticker, period="max", auto_adjust=True, progress=False, threads=False)
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


def write_atomic(frame: pd.DataFrame, path: Path) -> None:
    """Write `frame` as CSV so that readers only ever see the old file or the complete new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.StringIO()
    frame.to_csv(buffer)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(buffer.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
