"""Stage 1 (ingest): shipped files, CSV layouts, yfinance shapes (K1, K2), empty answers and the cache (K3).

Only the network call `yfinance.download` is replaced; everything else runs for real on files in tmp_path.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yfinance

from pipeline import ingest
from pipeline.errors import InputError
from pipeline.ingest import (
    MAX_FILL_DAYS,
    IngestConfig,
    cache_path,
    clean_prices,
    flatten_download,
    load_prices,
    load_ticker,
    read_price_csv,
    write_atomic,
)

COLUMNS = ["Open", "High", "Low", "Close", "Volume"]

# --- helpers ------------------------------------------------------------------------------------


def k1_frame(tickers: tuple[str, ...] = ("TEST",)) -> pd.DataFrame:
    """The CASES.md K1 frame, in yfinance's exact shape (columns (Price, Ticker), index `Date`)."""
    idx = pd.DatetimeIndex(["2024-01-02", "2024-01-03", "2024-01-04", "2024-01-05", "2024-01-08"], name="Date")
    rows = [
        [100.5, 101.0, 99.0, 100.0, 1e6],
        [101.2, 102.0, 100.1, 100.6, 1.1e6],
        [100.8, 101.9, 100.2, 101.1, 9e5],
        [102.0, 102.5, 100.7, 100.9, 1.2e6],
        [103.1, 103.4, 101.8, 102.0, 1.05e6],
    ]
    prices = ["Close", "High", "Low", "Open", "Volume"]
    cols = pd.MultiIndex.from_product([prices, list(tickers)], names=["Price", "Ticker"])
    wide = [[value for value in row for _ in tickers] for row in rows]  # same prices for every ticker
    return pd.DataFrame(wide, index=idx, columns=cols)


def empty_download() -> pd.DataFrame:
    """What yfinance returns offline / for an unknown ticker: no rows (here with the usual columns)."""
    cols = pd.MultiIndex.from_product([["Close", "High", "Low", "Open", "Volume"], ["TEST"]], names=["Price", "Ticker"])
    return pd.DataFrame(columns=cols, index=pd.DatetimeIndex([], name="Date"), dtype="float64")


class FakeDownload:
    """Stands in for `yfinance.download`: returns a frame, or raises, and records its calls."""

    def __init__(self, result: pd.DataFrame | None = None, exc: Exception | None = None) -> None:
        self.result = result
        self.exc = exc
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        if self.exc is not None:
            raise self.exc
        return self.result


@pytest.fixture
def fake_download(monkeypatch):
    def install(result: pd.DataFrame | None = None, exc: Exception | None = None) -> FakeDownload:
        fake = FakeDownload(result, exc)
        monkeypatch.setattr(yfinance, "download", fake)
        return fake

    return install


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def parse(path: Path) -> pd.DataFrame:
    return clean_prices(read_price_csv(path), source=str(path))


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


# --- the shipped series -------------------------------------------------------------------------


def check_clean(frame: pd.DataFrame, columns: list[str]) -> None:
    assert list(frame.columns) == columns
    assert all(frame[c].dtype == np.float64 for c in columns)
    assert isinstance(frame.index, pd.DatetimeIndex)
    assert frame.index.name == "Date"
    assert frame.index.tz is None
    assert frame.index.is_monotonic_increasing
    assert frame.index.is_unique
    assert not frame.isna().any().any()


def test_shipped_gspc_parses_with_known_values():
    frame = load_prices(IngestConfig(ticker="^GSPC"))
    check_clean(frame, COLUMNS)
    assert len(frame) == 5031
    assert frame.index[0] == pd.Timestamp("1999-01-04")
    assert frame.index[-1] == pd.Timestamp("2018-12-31")
    first = frame.loc["1999-01-04"]
    assert first["Open"] == 1229.22998
    assert first["High"] == 1248.810059
    assert first["Low"] == 1219.099976
    assert first["Close"] == 1228.099976
    assert first["Volume"] == 877000000.0
    assert frame.loc["2018-12-31", "Close"] == 2506.850098
    assert frame.loc["2018-12-31", "Volume"] == 3442870000.0


def test_shipped_msft_multiheader_parses_with_known_values():
    frame = load_prices(IngestConfig(ticker="MSFT"))
    check_clean(frame, COLUMNS)
    assert len(frame) == 7983
    assert frame.index[0] == pd.Timestamp("1986-03-13")
    assert frame.index[-1] == pd.Timestamp("2017-11-10")
    assert frame.loc["1986-03-13", "Close"] == 0.07533
    assert frame.loc["1986-03-13", "Open"] == 0.0672
    assert frame.loc["1986-03-13", "Volume"] == 1371330506.0
    last = frame.loc["2017-11-10"]
    assert (last["Open"], last["High"], last["Low"], last["Close"], last["Volume"]) == (
        83.79,
        84.095,
        83.23,
        83.87,
        19396301.0,
    )


def test_csv_option_takes_precedence_over_ticker(tmp_path):
    path = write(tmp_path / "p.csv", "Date,Close\n2024-01-02,10\n2024-01-03,11\n")
    frame = load_prices(IngestConfig(ticker="^GSPC", csv=str(path)))
    assert list(frame.columns) == ["Close"]
    assert frame["Close"].tolist() == [10.0, 11.0]


# --- K1: yfinance MultiIndex columns ----------------------------------------------------------


def test_k1_flatten_download_single_ticker():
    raw = k1_frame()
    flat = flatten_download(raw, "TEST")
    assert not isinstance(flat.columns, pd.MultiIndex)
    assert list(flat.columns) == ["Close", "High", "Low", "Open", "Volume"]
    assert flat.columns.name is None
    assert isinstance(raw.columns, pd.MultiIndex)  # the input is not modified
    frame = clean_prices(flat, source="yfinance TEST")
    check_clean(frame, COLUMNS)
    assert isinstance(frame["Close"], pd.Series)
    assert frame.loc["2024-01-08", "Close"] == 103.1
    assert frame.loc["2024-01-02"].tolist() == [100.0, 101.0, 99.0, 100.5, 1e6]
    assert len(frame) == 5


def test_k1_flatten_download_two_tickers_refused():
    with pytest.raises(InputError, match="several tickers") as err:
        flatten_download(k1_frame(("TEST", "OTHER")), "TEST")
    assert "OTHER" in str(err.value)
    assert "TEST" in str(err.value)


def test_k1_load_ticker_writes_readable_cache(tmp_path, fake_download):
    fake = fake_download(k1_frame())
    cache_dir = tmp_path / "cache"
    frame = load_ticker("TEST", cache_dir)
    assert len(fake.calls) == 1
    assert fake.calls[0][0][0] == "TEST"
    check_clean(frame, COLUMNS)
    assert frame.loc["2024-01-08", "Close"] == 103.1
    assert all_files(tmp_path) == ["cache/TEST.csv"]  # no temp file left over
    cached = parse(cache_dir / "TEST.csv")
    check_clean(cached, COLUMNS)
    np.testing.assert_array_equal(cached.to_numpy(), frame.to_numpy())
    assert cached.index.equals(frame.index)


def test_k1_load_ticker_two_tickers_refused_and_nothing_cached(tmp_path, fake_download):
    fake_download(k1_frame(("TEST", "OTHER")))
    with pytest.raises(InputError) as err:
        load_ticker("TEST", tmp_path / "cache")
    assert "OTHER" in str(err.value)
    assert "TEST" in str(err.value)
    assert all_files(tmp_path) == []


def test_load_prices_unshipped_ticker_uses_data_dir_cache(tmp_path, fake_download):
    fake_download(k1_frame())
    frame = load_prices(IngestConfig(ticker="TEST"), data_dir=tmp_path)
    assert frame.loc["2024-01-08", "Close"] == 103.1
    assert (tmp_path / "cache" / "TEST.csv").is_file()


# --- K2: yfinance's CSV layouts --------------------------------------------------------------

K2_THREE = """Price,Close,High,Low,Open,Volume
Ticker,TEST,TEST,TEST,TEST,TEST
Date,,,,,
2024-03-11,50.10,50.40,49.70,49.90,2100000
2024-03-12,50.60,50.90,50.00,50.20,2300000
"""
K2_TWO = """Price,Close,High,Low,Open,Volume
Ticker,TEST,TEST,TEST,TEST,TEST
2024-03-11,50.10,50.40,49.70,49.90,2100000
2024-03-12,50.60,50.90,50.00,50.20,2300000
"""


def test_k2_three_and_two_header_lines_parse_to_the_same_float_frame(tmp_path):
    three = parse(write(tmp_path / "three.csv", K2_THREE))
    two = parse(write(tmp_path / "two.csv", K2_TWO))
    for frame in (three, two):
        check_clean(frame, COLUMNS)
        assert frame.index.tolist() == [pd.Timestamp("2024-03-11"), pd.Timestamp("2024-03-12")]
        assert frame.loc["2024-03-11"].tolist() == [49.90, 50.40, 49.70, 50.10, 2100000.0]
        assert frame.loc["2024-03-12"].tolist() == [50.20, 50.90, 50.00, 50.60, 2300000.0]
        assert not any(frame[c].dtype == object for c in frame.columns)
    pd.testing.assert_frame_equal(three, two)


def test_k2_csv_with_two_tickers_refused(tmp_path):
    path = write(
        tmp_path / "two_tickers.csv",
        "Price,Close,Close,Volume,Volume\nTicker,AAA,BBB,AAA,BBB\nDate,,,,\n2024-03-11,1,2,3,4\n",
    )
    with pytest.raises(InputError, match=r"several tickers \(AAA, BBB\)"):
        read_price_csv(path)


def test_k2_plain_read_csv_would_give_strings(tmp_path):
    """The hazard K2 describes is real for this file: a plain read_csv yields strings, ours floats."""
    path = write(tmp_path / "three.csv", K2_THREE)
    plain = pd.read_csv(path, index_col=0)
    assert plain["Close"].dtype != np.float64
    assert parse(path)["Close"].dtype == np.float64


# --- K3: empty answers and the cache ---------------------------------------------------------


def test_k3_empty_download_without_cache_fails_cleanly(tmp_path, fake_download):
    fake_download(empty_download())
    with pytest.raises(InputError) as err:
        load_ticker("NOPE", tmp_path / "cache")
    message = str(err.value)
    assert "'NOPE'" in message
    assert "no cache" in message
    assert "\n" not in message
    assert all_files(tmp_path) == []  # neither a cache file nor a temp file


def test_k3_fully_empty_dataframe_without_cache(tmp_path, fake_download):
    fake_download(pd.DataFrame())
    with pytest.raises(InputError, match="no data for ticker 'NOPE'"):
        load_prices(IngestConfig(ticker="NOPE"), data_dir=tmp_path)
    assert all_files(tmp_path) == []


def test_k3_empty_download_uses_existing_cache_with_warning(tmp_path, fake_download, caplog):
    cache_dir = tmp_path / "cache"
    fake_download(k1_frame())
    fresh = load_ticker("TEST", cache_dir)
    before = (cache_dir / "TEST.csv").read_bytes()

    fake_download(empty_download())
    with caplog.at_level(logging.WARNING, logger="pipeline.ingest"):
        cached = load_ticker("TEST", cache_dir)
    pd.testing.assert_frame_equal(cached, fresh, check_index_type=False)
    assert cached.loc["2024-01-08", "Close"] == 103.1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "pipeline.ingest"]
    assert len(warnings) == 1
    assert "TEST" in warnings[0].getMessage()
    assert "using the cache" in warnings[0].getMessage()
    # The cache is neither overwritten by the empty answer nor lost.
    assert (cache_dir / "TEST.csv").read_bytes() == before
    assert all_files(tmp_path) == ["cache/TEST.csv"]


def test_k3_download_exception_falls_back_to_cache(tmp_path, fake_download, caplog):
    cache_dir = tmp_path / "cache"
    fake_download(k1_frame())
    fresh = load_ticker("TEST", cache_dir)
    before = (cache_dir / "TEST.csv").read_bytes()

    fake = fake_download(exc=yfinance.exceptions.YFRateLimitError())
    with caplog.at_level(logging.WARNING, logger="pipeline.ingest"):
        cached = load_ticker("TEST", cache_dir)
    assert len(fake.calls) == 1
    np.testing.assert_array_equal(cached.to_numpy(), fresh.to_numpy())
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("YFRateLimitError" in m and "TEST" in m for m in messages)
    assert (cache_dir / "TEST.csv").read_bytes() == before


def test_k3_download_exception_without_cache(tmp_path, fake_download):
    fake_download(exc=ConnectionError("network is unreachable"))
    with pytest.raises(InputError) as err:
        load_ticker("TEST", tmp_path / "cache")
    assert "'TEST'" in str(err.value)
    assert "ConnectionError: network is unreachable" in str(err.value)
    assert all_files(tmp_path) == []


def test_download_restores_yfinance_log_level(fake_download):
    yf_log = logging.getLogger("yfinance")
    old = yf_log.level
    yf_log.setLevel(logging.INFO)
    try:
        fake_download(exc=RuntimeError("boom"))
        raw, reason = ingest.download("TEST")
        assert raw is None
        assert reason == "RuntimeError: boom"
        assert yf_log.level == logging.INFO
    finally:
        yf_log.setLevel(old)


# --- cache path safety ------------------------------------------------------------------------


@pytest.mark.parametrize("ticker", ["^GSPC", "BRK-B", "EURUSD=X", "MSFT", "BTC-USD"])
def test_cache_path_accepts_real_tickers(tmp_path, ticker):
    path = cache_path(ticker, tmp_path)
    assert path == tmp_path / f"{ticker}.csv"
    assert path.parent == tmp_path


@pytest.mark.parametrize("ticker", ["../evil", "a/b", "..", ".", "", "a\\b", "/etc/passwd", "x" * 33])
def test_cache_path_refuses_escaping_names(tmp_path, ticker):
    with pytest.raises(InputError, match="invalid ticker"):
        cache_path(ticker, tmp_path)


def test_load_ticker_refuses_bad_name_before_downloading(tmp_path, fake_download):
    fake = fake_download(k1_frame())
    with pytest.raises(InputError, match=r"invalid ticker '\.\./evil'"):
        load_ticker("../evil", tmp_path / "cache")
    assert fake.calls == []
    assert all_files(tmp_path) == []


# --- CSV edge cases ---------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="CSV file not found"):
        load_prices(IngestConfig(csv=str(tmp_path / "nope.csv")))


def test_empty_file(tmp_path):
    with pytest.raises(InputError, match="the file is empty"):
        read_price_csv(write(tmp_path / "e.csv", ""))


def test_blank_first_line_is_empty(tmp_path):
    with pytest.raises(InputError, match="the file is empty"):
        read_price_csv(write(tmp_path / "e.csv", ",,\n"))


def test_header_only(tmp_path):
    with pytest.raises(InputError, match="has a header but no data rows"):
        read_price_csv(write(tmp_path / "h.csv", "Date,Open,High,Low,Close,Volume\n"))


def test_semicolon_delimiter(tmp_path):
    path = write(tmp_path / "s.csv", "Date;Close\n2024-01-02;10\n")
    with pytest.raises(InputError, match="expected comma-separated columns") as err:
        read_price_csv(path)
    assert "'Date;Close'" in str(err.value)


def test_no_close_column(tmp_path):
    path = write(tmp_path / "n.csv", "Date,Open,Price\n2024-01-02,1,2\n")
    with pytest.raises(InputError, match=r"no Close column \(found: Open, Price\)"):
        parse(path)


def test_non_numeric_price_names_column_and_date(tmp_path):
    path = write(tmp_path / "x.csv", "Date,Open,Close\n2024-01-02,10,10\n2024-01-03,11,abc\n2024-01-04,12,12\n")
    with pytest.raises(InputError, match=r"non-numeric Close value 'abc' on 2024-01-03"):
        parse(path)


def test_unreadable_date(tmp_path):
    path = write(tmp_path / "d.csv", "Date,Close\n2024-01-02,10\nyesterday,11\n")
    with pytest.raises(InputError, match=r"cannot read 'yesterday' as a date"):
        parse(path)


@pytest.mark.parametrize("value", ["0", "-5.5"])
def test_non_positive_price_names_date(tmp_path, value):
    path = write(tmp_path / "z.csv", f"Date,Close\n2024-01-02,10\n2024-01-03,{value}\n2024-01-04,12\n")
    with pytest.raises(InputError, match=r"non-positive price on 2024-01-03"):
        parse(path)


def test_zero_volume_is_allowed_negative_volume_refused(tmp_path):
    ok = parse(write(tmp_path / "v0.csv", "Date,Close,Volume\n2024-01-02,10,0\n2024-01-03,11,5\n"))
    assert ok["Volume"].tolist() == [0.0, 5.0]
    with pytest.raises(InputError, match=r"negative volume on 2024-01-03"):
        parse(write(tmp_path / "v1.csv", "Date,Close,Volume\n2024-01-02,10,1\n2024-01-03,11,-5\n"))


def test_duplicate_dates_keep_the_last_row(tmp_path):
    path = write(tmp_path / "dup.csv", "Date,Close\n2024-01-02,10\n2024-01-03,11\n2024-01-03,12\n2024-01-04,13\n")
    frame = parse(path)
    assert frame.index.is_unique
    assert frame["Close"].tolist() == [10.0, 12.0, 13.0]
    assert frame.loc["2024-01-03", "Close"] == 12.0


def test_unsorted_dates_get_sorted(tmp_path):
    path = write(tmp_path / "u.csv", "Date,Close\n2024-01-04,13\n2024-01-02,10\n2024-01-03,11\n")
    frame = parse(path)
    assert frame.index.tolist() == [pd.Timestamp(d) for d in ("2024-01-02", "2024-01-03", "2024-01-04")]
    assert frame["Close"].tolist() == [10.0, 11.0, 13.0]


def test_lowercase_columns_and_adj_close_dropped(tmp_path):
    path = write(
        tmp_path / "lc.csv",
        "date,volume,adj close,close,low,high,open\n"
        "2024-01-02,100,9.5,10,9,11,9.8\n"
        "2024-01-03,200,10.5,11,10,12,10.2\n",
    )
    frame = parse(path)
    check_clean(frame, COLUMNS)
    assert frame.loc["2024-01-02"].tolist() == [9.8, 11.0, 9.0, 10.0, 100.0]
    assert frame.loc["2024-01-03", "Close"] == 11.0  # Close, not Adj Close


def test_close_only_csv(tmp_path):
    frame = parse(write(tmp_path / "c.csv", "Date,Close\n2024-01-02,10.5\n2024-01-03,11.25\n"))
    check_clean(frame, ["Close"])
    assert frame["Close"].tolist() == [10.5, 11.25]


def test_us_dates(tmp_path):
    frame = parse(write(tmp_path / "us.csv", "Date,Close\n01/02/2024,10\n01/03/2024,11\n12/31/2024,12\n"))
    assert frame.index.tolist() == [pd.Timestamp(d) for d in ("2024-01-02", "2024-01-03", "2024-12-31")]
    assert frame["Close"].tolist() == [10.0, 11.0, 12.0]


def test_tz_aware_csv_dates_keep_the_local_day(tmp_path):
    text = "Date,Close\n2024-01-02 00:00:00-05:00,10\n2024-01-03 00:00:00-05:00,11\n"
    frame = parse(write(tmp_path / "tz.csv", text))
    assert frame.index.tz is None
    assert frame.index.tolist() == [pd.Timestamp("2024-01-02"), pd.Timestamp("2024-01-03")]


def test_tz_aware_csv_dates_east_of_utc_keep_the_local_day(tmp_path):
    text = "Date,Close\n2024-01-04 00:00:00+09:00,10\n2024-01-05 00:00:00+09:00,11\n"
    frame = parse(write(tmp_path / "tz.csv", text))
    assert frame.index.tolist() == [pd.Timestamp("2024-01-04"), pd.Timestamp("2024-01-05")]


def test_tz_aware_csv_dates_across_daylight_saving(tmp_path):
    """A daily series saved from a tz-aware frame (New York) has -05:00 in winter and -04:00 in summer."""
    text = "Date,Close\n2024-03-08 00:00:00-05:00,10\n2024-03-11 00:00:00-04:00,11\n2024-03-12 00:00:00-04:00,12\n"
    frame = parse(write(tmp_path / "dst.csv", text))
    assert frame.index.tz is None
    assert frame.index.tolist() == [pd.Timestamp(d) for d in ("2024-03-08", "2024-03-11", "2024-03-12")]
    assert frame["Close"].tolist() == [10.0, 11.0, 12.0]


def test_tz_aware_index_frame_keeps_the_local_day():
    idx = pd.DatetimeIndex(["2024-01-02", "2024-07-02"]).tz_localize("America/New_York")
    frame = clean_prices(pd.DataFrame({"Close": [10.0, 11.0]}, index=idx), source="tz")
    assert frame.index.tz is None
    assert frame.index.tolist() == [pd.Timestamp("2024-01-02"), pd.Timestamp("2024-07-02")]


def test_gap_up_to_max_fill_days_is_forward_filled(tmp_path):
    assert MAX_FILL_DAYS == 3
    text = "Date,Open,Close\n2024-01-02,9,10\n2024-01-03,9.5,\n2024-01-04,9.6,\n2024-01-05,9.7,\n2024-01-08,10.5,11\n"
    frame = parse(write(tmp_path / "gap.csv", text))
    assert frame["Close"].tolist() == [10.0, 10.0, 10.0, 10.0, 11.0]
    assert frame["Open"].tolist() == [9.0, 9.5, 9.6, 9.7, 10.5]


def test_gap_longer_than_max_fill_days_is_refused(tmp_path):
    text = (
        "Date,Open,Close\n"
        "2024-01-02,9,10\n2024-01-03,9.5,\n2024-01-04,9.6,\n2024-01-05,9.7,\n2024-01-08,9.8,\n2024-01-09,10.5,11\n"
    )
    with pytest.raises(InputError, match=r"missing prices on 2024-01-08 for longer than 3 rows"):
        parse(write(tmp_path / "gap.csv", text))


def test_leading_missing_price_is_refused(tmp_path):
    text = "Date,Open,Close\n2024-01-02,9,\n2024-01-03,9.5,10\n"
    with pytest.raises(InputError, match=r"missing prices on 2024-01-02"):
        parse(write(tmp_path / "lead.csv", text))


def test_all_empty_rows_are_dropped(tmp_path):
    frame = parse(write(tmp_path / "blank.csv", "Date,Open,Close\n2024-01-02,9,10\n2024-01-03,,\n2024-01-04,9.5,11\n"))
    assert frame.index.tolist() == [pd.Timestamp("2024-01-02"), pd.Timestamp("2024-01-04")]


def test_no_rows_with_prices(tmp_path):
    with pytest.raises(InputError, match="no rows with prices"):
        parse(write(tmp_path / "none.csv", "Date,Open,Close\n2024-01-02,,\n2024-01-03,,\n"))


# --- write_atomic -----------------------------------------------------------------------------


def small_frame(close: float) -> pd.DataFrame:
    idx = pd.DatetimeIndex(["2024-01-02", "2024-01-03"], name="Date")
    return pd.DataFrame({"Close": [close, close + 1]}, index=idx)


def test_write_atomic_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "X.csv"
    write_atomic(small_frame(10.0), path)
    assert all_files(tmp_path) == ["sub/X.csv"]
    assert path.read_text() == "Date,Close\n2024-01-02,10.0\n2024-01-03,11.0\n"
    write_atomic(small_frame(20.0), path)
    assert all_files(tmp_path) == ["sub/X.csv"]
    assert parse(path)["Close"].tolist() == [20.0, 21.0]


def test_write_atomic_failure_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "X.csv"
    write_atomic(small_frame(10.0), path)
    before = path.read_bytes()

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ingest.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_atomic(small_frame(20.0), path)
    assert path.read_bytes() == before
    assert all_files(tmp_path) == ["X.csv"]


def test_failed_cache_write_keeps_previous_cache(tmp_path, monkeypatch, fake_download):
    cache_dir = tmp_path / "cache"
    fake_download(k1_frame())
    load_ticker("TEST", cache_dir)
    before = (cache_dir / "TEST.csv").read_bytes()

    changed = k1_frame() * 2
    fake_download(changed)

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ingest.os, "replace", refuse)
    with pytest.raises(OSError):
        load_ticker("TEST", cache_dir)
    assert (cache_dir / "TEST.csv").read_bytes() == before
    assert all_files(tmp_path) == ["cache/TEST.csv"]
    assert parse(cache_dir / "TEST.csv").loc["2024-01-08", "Close"] == 103.1
