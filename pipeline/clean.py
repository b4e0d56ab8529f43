"""Stage 1a — clean: read a price CSV in any layout people have and validate and clean the frame.

In:  a CSV path (one header line; the three header lines that `DataFrame.to_csv()` writes for a recent
     yfinance download, or its two-line variant), or any raw price frame (e.g. a download).
Out: a DataFrame indexed by `Date` (ascending, unique, tz-naive) with float64 columns, in this order,
     among Open, High, Low, Close, Volume (Close always), and a `QualityReport`: what was read, dropped,
     filled, adjusted and flagged. Anything unusable is refused with an InputError naming the problem.
"""

from __future__ import annotations

import csv
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import InputError

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
        cleaned = ", ".join(plural(n, noun) + tail for n, noun, tail in counts if n) or "nothing"
        line = (
            f"{self.source}: {plural(self.rows_kept, 'row')} kept of {self.rows_read} read, "
            f"{self.first_date} .. {self.last_date}, columns {columns}; cleaned: {cleaned}"
        )
        if self.large_moves:
            more = len(self.large_moves) - 3
            dates = ", ".join(self.large_moves[:3]) + (f", +{more} more" if more > 0 else "")
            line += f"; {plural(len(self.large_moves), 'large move')} flagged ({dates})"
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


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


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
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a CSV file")
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
        row = int(missing.argmax())
        column = frame.columns[frame.iloc[row].isna().argmax()]
        day = frame.index[row].date()
        if frame[column].iloc[:row].isna().all():  # nothing earlier to carry forward
            raise InputError(f"{source}: no {column} on {day} and no earlier {column} to fill it from")
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
        frame = adjust(frame)
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


def adjust(frame: pd.DataFrame) -> pd.DataFrame:
    """Close := Adj Close; Open/High/Low times Adj Close / Close of their row, so each bar keeps its shape.

    This is what yfinance's auto_adjust does. In: numeric columns with Adj Close; out: without it."""
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
    infinite = np.isinf(values)
    if infinite.any():  # "inf" parses as a number, but no price or volume is infinite
        raise InputError(f"{source}: infinite {name} value on {column.index[infinite.argmax()].date()}")
    bad = values.isna() & column.notna()
    if bad.any():
        day = column.index[bad.argmax()]
        # "2:1" is refused rather than read: vendors differ on which number is the new share count.
        hint = " (give the ratio as one number: 2 for a 2-for-1 split, 0.5 for 1-for-2)" if name == SPLITS else ""
        raise InputError(f"{source}: non-numeric {name} value {column[bad].iloc[0]!r} on {day.date()}{hint}")
    return values.astype("float64")
