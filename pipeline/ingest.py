"""Stage 1 — ingest: turn a ticker or a CSV file into one clean daily price frame.

In:  a ticker (a file shipped in `data/`, a cached download, or a fresh yfinance download) or a CSV
     path in one of the layouts people have on disk (one header line, or the three header lines that
     `DataFrame.to_csv()` writes for a recent yfinance download, or its two-line variant).
Out: a DataFrame indexed by `Date` (ascending, unique, tz-naive) with float64 columns, in this order,
     among Open, High, Low, Close, Volume. Close is always present; the others when the source has them.

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
from dataclasses import dataclass
from pathlib import Path

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
# Lower-cased spellings seen in the wild -> canonical column. Adj Close is dropped: prices from
# yfinance are auto-adjusted already, and mixing an adjusted close with unadjusted O/H/L would
# create fake jumps.
ALIASES = {"open": "Open", "high": "High", "low": "Low", "close": "Close", "volume": "Volume"}
MAX_FILL_DAYS = 3  # isolated gaps up to this many rows are forward-filled; longer gaps are refused
SAFE_TICKER = re.compile(r"^[A-Za-z0-9^=._-]{1,32}$")


@dataclass
class IngestConfig:
    """Where the prices come from."""

    ticker: str = "^GSPC"  # a shipped series (^GSPC, MSFT) or any yfinance ticker
    csv: str = ""  # a CSV file to read instead of the ticker


def load_prices(cfg: IngestConfig, data_dir: Path = DATA_DIR) -> pd.DataFrame:
    """Return the clean price frame for `cfg` (CSV file if given, else the ticker)."""
    if cfg.csv:
        return clean_prices(read_price_csv(Path(cfg.csv)), source=cfg.csv)
    if cfg.ticker in SHIPPED:
        path = data_dir / SHIPPED[cfg.ticker]
        return clean_prices(read_price_csv(path), source=str(path))
    return load_ticker(cfg.ticker, data_dir / "cache")


# --- CSV files --------------------------------------------------------------------------------


def read_price_csv(path: Path) -> pd.DataFrame:
    """Read a price CSV in any supported layout; columns and index are still raw strings/values."""
    if not path.is_file():
        raise InputError(f"CSV file not found: {path}")
    with path.open(newline="") as handle:
        head = [row for _, row in zip(range(3), csv.reader(handle), strict=False)]
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
        frame = pd.read_csv(path, skiprows=skip, index_col=0)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot parse as CSV ({str(exc).strip().splitlines()[0]})") from None
    if frame.empty:
        raise InputError(f"{path}: has a header but no data rows")
    return frame


# --- cleaning ---------------------------------------------------------------------------------


def clean_prices(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """Validate and clean a raw price frame: canonical float columns, sorted unique dates.

    Duplicate dates keep the last row, all-empty rows are dropped, gaps of up to MAX_FILL_DAYS rows
    are forward-filled; non-numeric or non-positive prices are refused with the offending date.
    """
    frame = _canonical_columns(frame, source)
    frame.index = _parse_dates(frame.index, source)
    for column in frame.columns:
        frame[column] = _to_float(frame[column], column, source)
    frame = frame.sort_index(kind="stable")
    frame = frame[~frame.index.duplicated(keep="last")]
    frame = frame.dropna(how="all")
    if frame.empty:
        raise InputError(f"{source}: no rows with prices")
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
    frame.index.name = "Date"
    return frame


def _canonical_columns(frame: pd.DataFrame, source: str) -> pd.DataFrame:
    names = {}
    for column in frame.columns:
        key = str(column).strip().lower()
        if key in ALIASES and ALIASES[key] not in names.values():
            names[column] = ALIASES[key]
    if "Close" not in names.values():
        found = ", ".join(str(c) for c in frame.columns)
        raise InputError(f"{source}: no Close column (found: {found})")
    frame = frame[list(names)].rename(columns=names)
    return frame[[c for c in COLUMNS if c in frame.columns]].copy()


def _parse_dates(index: pd.Index, source: str) -> pd.DatetimeIndex:
    if isinstance(index, pd.DatetimeIndex):
        dates = index
    else:
        # "2024-03-11 00:00:00-04:00" -> "2024-03-11 00:00:00": keep the exchange-local calendar day, also
        # when the offset changes with daylight saving (mixed offsets would fail to parse as one index).
        strings = index.astype(str).str.replace(
            r"(\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)(?:[+-]\d{2}:?\d{2}|Z)$", r"\1", regex=True
        )
        dates = None
        for fmt in ("ISO8601", "%m/%d/%Y"):
            try:
                dates = pd.to_datetime(strings, format=fmt)
                break
            except (ValueError, TypeError):
                continue
        if dates is None:
            bad = next((v for v in strings if pd.to_datetime(v, errors="coerce") is pd.NaT), strings[0])
            raise InputError(f"{source}: cannot read {bad!r} as a date (expected YYYY-MM-DD or MM/DD/YYYY)")
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
    path = cache_path(ticker, cache_dir)
    raw, reason = download(ticker)
    if raw is not None and not raw.empty:
        frame = clean_prices(flatten_download(raw, ticker), source=f"yfinance {ticker}")
        write_atomic(frame, path)
        return frame
    if path.is_file():
        log.warning("yfinance gave no data for %s (%s); using the cache %s", ticker, reason, path)
        return clean_prices(read_price_csv(path), source=str(path))
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
