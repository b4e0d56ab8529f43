"""Stage 1b — cache: yfinance downloads, retried, kept in a local cache with metadata, refreshed incrementally.

In:  a ticker and the cache folder (`data/cache/`).
Out: the clean series (via `pipeline.clean`) and its report; the cache updated. The cache holds one
     clean series per name: `<name>.csv` and a metadata sidecar `<name>.json` (where it came from, when,
     its dates, its adjustment, the data's sha256). Downloads are refreshed incrementally; a series stored
     from a CSV file (`ingest --csv`) is read from the cache and never sent to yfinance.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.clean import QualityReport, adjust, clean_prices, clean_prices_with_report, read_price_csv
from pipeline.errors import InputError

log = logging.getLogger(__name__)

SAFE_TICKER = re.compile(r"^[A-Za-z0-9^=._-]{1,32}$")
# Yahoo rate-limits by raising (YFRateLimitError) or by answering with an empty frame; both are retried.
ATTEMPTS = 3  # yfinance calls per fetch before falling back to the cache
BACKOFF_S = 0.5  # wait before the second attempt, doubled before each further one (0.5 s, 1 s)
# An incremental refresh re-reads the cache's last day; if its close moved by more than this (relative),
# the history was re-adjusted since (a split or dividend) and is downloaded again in full. Any dividend
# (>= 0.1% of the price) is far above it; float noise between two fetches of the same value is far below.
REVISION_RTOL = 1e-4
YFINANCE_ADJUSTMENT = "yfinance auto_adjust=True: splits and dividends"


# --- yfinance with a local cache ---------------------------------------------------------------


class NoAnswer(Exception):
    """yfinance gave no rows in ATTEMPTS calls; the message is the last reason."""


def load_cached_ticker(ticker: str, cache_dir: Path, price_column: str) -> tuple[pd.DataFrame, QualityReport]:
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
    """One ticker's raw answer with flat columns (from `start`, YYYY-MM-DD, else all history); else NoAnswer.

    Old yfinance versions answer with raw prices beside `Adj Close` where auto_adjust is not honoured:
    those are adjusted as auto_adjust would, so every version gives the same frame."""
    raw, reason = download(ticker, start)
    if raw is None:
        raise NoAnswer(reason)
    flat = flatten_download(raw, ticker)
    return adjust(flat) if "Adj Close" in flat.columns else flat


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
    """Flatten yfinance's (Price, Ticker) MultiIndex columns (a copy, flat frames too); refuse a frame with
    several tickers."""
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
    if not SAFE_TICKER.match(ticker) or ticker.startswith("."):  # also no hidden files, no "." or ".."
        raise InputError(f"invalid ticker {ticker!r}: use letters, digits and ^ = . _ - only, not starting with .")
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
