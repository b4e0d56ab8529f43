"""Stage 1 — ingest: turn a ticker, several tickers or a CSV file into clean daily price series.

In:  an `IngestConfig`: a ticker (a file shipped in `data/`, a series in the cache `data/cache/`, or a
     fresh yfinance download: `pipeline.cache`), several tickers to pool, or a CSV path (read and cleaned
     by `pipeline.clean`).
Out: per series, a DataFrame indexed by `Date` (ascending, unique, tz-naive) with float64 columns among
     Open, High, Low, Close, Volume (Close always), and its `QualityReport`; `store_csv` (the `ingest
     --csv` command) puts a CSV file's clean series in the cache, to be loaded later by name.

Nothing here touches MLflow: a bad input fails before any run is started.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from pipeline.cache import cache_path, load_cached_ticker, write_cache
from pipeline.clean import QualityReport, canonical_price_column, clean_prices_with_report, plural, read_price_csv
from pipeline.errors import InputError

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# Real series shipped with the repository, so the default job runs offline (see data/README.md).
SHIPPED = {
    "^GSPC": "GSPC_1999-2018_daily.csv",
    "MSFT": "MSFT_1986-2017_daily_yf-multiheader.csv",
}


@dataclass
class IngestConfig:
    """Where the prices come from."""

    ticker: str = "^GSPC"  # a shipped series (^GSPC, MSFT) or any yfinance ticker
    tickers: str = ""  # comma-separated tickers pooled for training (replaces ticker when given)
    csv: str = ""  # a CSV file to read instead of the ticker
    # "Close", or "Adj Close": Close becomes the adjusted close, Open/High/Low scaled by the same factor
    price_column: str = "Close"


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
        frame, report = load_cached_ticker(cfg.ticker, data_dir / "cache", price_column)
    return frame, replace(report, source=cfg.csv or cfg.ticker)


@dataclass(frozen=True)
class Series:
    """One clean price series to train on, under the name the user gave (ticker or CSV path)."""

    name: str
    frame: pd.DataFrame
    report: QualityReport


def ticker_names(cfg: IngestConfig) -> list[str]:
    """The pooled tickers of `cfg.tickers` ("^GSPC, MSFT," -> ["^GSPC", "MSFT"]); [] for one series."""
    return [name.strip() for name in cfg.tickers.split(",") if name.strip()]


def load_series(cfg: IngestConfig, data_dir: Path | None = None) -> list[Series]:
    """The series to train on: the CSV file or the ticker, or each of `cfg.tickers` (pooled by `windows`)."""
    names = ticker_names(cfg)
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


def _adjustment(report: QualityReport) -> str:
    """What the stored prices of a CSV file are adjusted for, in words (for the cache metadata)."""
    if report.price_column == "Adj Close":
        return "Adj Close: splits and dividends (Open/High/Low scaled)"
    if report.splits_applied:
        return f"split column: {plural(report.splits_applied, 'split')} applied"
    return "none: prices as in the file"
