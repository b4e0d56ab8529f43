"""Stage 1 (ingest): shipped files, CSV layouts, yfinance shapes (K1, K2), empty answers and the cache (K3),
retries, cache metadata and incremental refresh, CSVs stored in the cache, split columns, the quality record.

Only the network call `yfinance.download` is replaced (and `time.sleep`, so that retries do not wait);
everything else runs for real on files in tmp_path.
"""

from __future__ import annotations

import hashlib
import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yfinance

from pipeline import cache, ingest
from pipeline.cache import cache_path, flatten_download, load_cached_ticker, read_cache_meta, write_cache
from pipeline.clean import MAX_FILL_DAYS, QualityReport, clean_prices, clean_prices_with_report, read_price_csv
from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.ingest import IngestConfig, load_prices, load_prices_with_report

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
    """Stands in for `yfinance.download`: gives its answers in turn (the last one repeats) and records its calls.

    An answer is a frame to return or an exception to raise.
    """

    def __init__(self, answers: list[pd.DataFrame | Exception]) -> None:
        self.answers = answers
        self.calls: list[tuple[tuple, dict]] = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        answer = self.answers[min(len(self.calls), len(self.answers)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer


@pytest.fixture
def fake_download(monkeypatch):
    def install(
        result: pd.DataFrame | None = None, exc: Exception | None = None, answers: list | None = None
    ) -> FakeDownload:
        fake = FakeDownload(answers or [exc if exc is not None else result])
        monkeypatch.setattr(yfinance, "download", fake)
        return fake

    return install


@pytest.fixture(autouse=True)
def sleeps(monkeypatch) -> list[float]:
    """Retries wait with time.sleep: record the waits instead of waiting."""
    waits: list[float] = []
    monkeypatch.setattr(cache.time, "sleep", waits.append)
    return waits


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def parse(path: Path) -> pd.DataFrame:
    return clean_prices(read_price_csv(path), source=str(path))


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def load_ticker(ticker: str, cache_dir: Path) -> pd.DataFrame:
    """The clean Close-priced series of `ticker` from yfinance (mocked) or the cache."""
    return load_cached_ticker(ticker, cache_dir, "Close")[0]


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
    assert all_files(tmp_path) == ["cache/TEST.csv", "cache/TEST.json"]  # no temp file left over
    cached = parse(cache_dir / "TEST.csv")
    check_clean(cached, COLUMNS)
    np.testing.assert_array_equal(cached.to_numpy(), frame.to_numpy())
    assert cached.index.equals(frame.index)


def test_old_flat_download_with_adj_close_gives_the_auto_adjusted_frame(tmp_path, fake_download):
    """Old yfinance: flat columns, raw prices and Adj Close. Here a 2:1 split after 2024-01-04 (raw prices
    before it are twice the adjusted ones) and a dividend factor of 0.99 before 2024-01-03."""
    recent = k1_frame()
    fake_download(recent)
    expected = load_ticker("TEST", tmp_path / "new")
    adjusted = flatten_download(recent, "TEST")
    factor = pd.Series([0.5 * 0.99, 0.5, 0.5, 1.0, 1.0], index=adjusted.index)
    old = adjusted[["Open", "High", "Low", "Close"]].div(factor, axis=0)
    old["Adj Close"] = adjusted["Close"]
    old["Volume"] = adjusted["Volume"]
    assert old.loc["2024-01-03", "Close"] == 2 * 101.2  # what an unadjusted frame would train on
    fake_download(old)
    frame = load_ticker("TEST", tmp_path / "old")
    pd.testing.assert_frame_equal(frame, expected, check_exact=False, rtol=1e-12)
    assert frame.loc["2024-01-03", "Close"] == pytest.approx(101.2, rel=1e-12)
    assert "Adj Close" not in parse(tmp_path / "old" / "TEST.csv").columns


def test_tz_aware_download_east_of_utc_keeps_the_local_day(tmp_path, fake_download):
    """A Tokyo-listed download: midnight local time is the previous day in UTC; the local day is kept."""
    raw = k1_frame()
    raw.index = raw.index.tz_localize("Asia/Tokyo").rename("Date")
    fake_download(raw)
    frame = load_ticker("TEST", tmp_path / "cache")
    assert frame.index.tz is None
    assert frame.index.equals(k1_frame().index)
    assert frame.loc["2024-01-04", "Close"] == 100.8


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
    assert all_files(tmp_path) == ["cache/TEST.csv", "cache/TEST.json"]


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


# --- K3: empty answers and the cache, with bounded retries -----------------------------------

EMPTY_REASON = "empty answer: offline, unknown or delisted ticker"


def test_k3_empty_download_without_cache_fails_cleanly(tmp_path, fake_download, sleeps):
    fake = fake_download(empty_download())
    with pytest.raises(InputError) as err:
        load_ticker("NOPE", tmp_path / "cache")
    assert str(err.value) == (
        f"no data for ticker 'NOPE': yfinance returned nothing in 3 attempts (last: {EMPTY_REASON}) "
        f"and there is no cache at {tmp_path / 'cache' / 'NOPE.csv'}"
    )
    assert len(fake.calls) == 3  # an empty answer may be a rate limit: retried
    assert sleeps == [0.5, 1.0]  # exponential backoff between the attempts, none after the last
    assert all_files(tmp_path) == []  # neither a cache file nor a temp file


def test_k3_fully_empty_dataframe_without_cache(tmp_path, fake_download):
    fake = fake_download(pd.DataFrame())
    with pytest.raises(InputError, match="no data for ticker 'NOPE'"):
        load_prices(IngestConfig(ticker="NOPE"), data_dir=tmp_path)
    assert len(fake.calls) == 3
    assert all_files(tmp_path) == []


def test_retry_after_two_exceptions_succeeds_on_the_third_call(tmp_path, fake_download, sleeps):
    rate_limited = yfinance.exceptions.YFRateLimitError()
    fake = fake_download(answers=[rate_limited, ConnectionError("reset by peer"), k1_frame()])
    frame = load_ticker("TEST", tmp_path / "cache")
    assert len(fake.calls) == 3
    assert [call[0][0] for call in fake.calls] == ["TEST", "TEST", "TEST"]
    assert sleeps == [0.5, 1.0]
    assert frame.loc["2024-01-08", "Close"] == 103.1
    assert all_files(tmp_path) == ["cache/TEST.csv", "cache/TEST.json"]


def test_retry_stops_at_the_first_answer_with_rows(tmp_path, fake_download, sleeps):
    fake = fake_download(answers=[empty_download(), k1_frame()])
    assert len(load_ticker("TEST", tmp_path / "cache")) == 5
    assert len(fake.calls) == 2
    assert sleeps == [0.5]


def test_retries_exhausted_by_exceptions_names_the_last_reason(tmp_path, fake_download):
    fake = fake_download(answers=[empty_download(), ConnectionError("network is unreachable")])
    with pytest.raises(InputError) as err:
        load_ticker("TEST", tmp_path / "cache")
    assert str(err.value) == (
        "no data for ticker 'TEST': yfinance returned nothing in 3 attempts "
        f"(last: ConnectionError: network is unreachable) and there is no cache at {tmp_path / 'cache' / 'TEST.csv'}"
    )
    assert len(fake.calls) == 3
    assert all_files(tmp_path) == []


def test_k3_empty_download_uses_existing_cache_with_warning(tmp_path, fake_download, caplog):
    cache_dir = tmp_path / "cache"
    fake_download(k1_frame())
    fresh = load_ticker("TEST", cache_dir)
    before = {name: (cache_dir / name).read_bytes() for name in ("TEST.csv", "TEST.json")}

    fake = fake_download(empty_download())
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        cached = load_ticker("TEST", cache_dir)
    pd.testing.assert_frame_equal(cached, fresh, check_index_type=False)
    assert cached.loc["2024-01-08", "Close"] == 103.1
    assert len(fake.calls) == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "pipeline.cache"]
    assert [w.getMessage() for w in warnings] == [
        f"yfinance gave no data for TEST in 3 attempts ({EMPTY_REASON}); using the cache {cache_dir / 'TEST.csv'}"
    ]
    # The cache and its metadata are neither overwritten by the empty answer nor lost.
    assert {name: (cache_dir / name).read_bytes() for name in before} == before
    assert all_files(tmp_path) == ["cache/TEST.csv", "cache/TEST.json"]


def test_k3_download_exception_falls_back_to_cache(tmp_path, fake_download, caplog):
    cache_dir = tmp_path / "cache"
    fake_download(k1_frame())
    fresh = load_ticker("TEST", cache_dir)
    before = (cache_dir / "TEST.csv").read_bytes()

    fake = fake_download(exc=yfinance.exceptions.YFRateLimitError())
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        cached = load_ticker("TEST", cache_dir)
    assert len(fake.calls) == 3
    np.testing.assert_array_equal(cached.to_numpy(), fresh.to_numpy())
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert messages == [
        "yfinance gave no data for TEST in 3 attempts (YFRateLimitError: Too Many Requests. Rate limited. "
        f"Try after a while.); using the cache {cache_dir / 'TEST.csv'}"
    ]
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
        fake = fake_download(exc=RuntimeError("boom"))
        raw, reason = cache.download("TEST")
        assert raw is None
        assert reason == "RuntimeError: boom"
        assert len(fake.calls) == 3
        assert yf_log.level == logging.INFO
    finally:
        yf_log.setLevel(old)


def test_full_download_asks_for_all_history_auto_adjusted(tmp_path, fake_download):
    fake = fake_download(k1_frame())
    load_ticker("TEST", tmp_path / "cache")
    assert fake.calls == [
        (("TEST",), {"period": "max", "auto_adjust": True, "progress": False, "threads": False}),
    ]


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
    with pytest.raises(InputError) as err:
        parse(write(tmp_path / "lead.csv", text))
    assert str(err.value) == f"{tmp_path / 'lead.csv'}: no Close on 2024-01-02 and no earlier Close to fill it from"


def test_all_empty_rows_are_dropped(tmp_path):
    frame = parse(write(tmp_path / "blank.csv", "Date,Open,Close\n2024-01-02,9,10\n2024-01-03,,\n2024-01-04,9.5,11\n"))
    assert frame.index.tolist() == [pd.Timestamp("2024-01-02"), pd.Timestamp("2024-01-04")]


def test_no_rows_with_prices(tmp_path):
    with pytest.raises(InputError, match="no rows with prices"):
        parse(write(tmp_path / "none.csv", "Date,Open,Close\n2024-01-02,,\n2024-01-03,,\n"))


# --- atomic cache writes ------------------------------------------------------------------------


def small_frame(close: float) -> pd.DataFrame:
    idx = pd.DatetimeIndex(["2024-01-02", "2024-01-03"], name="Date")
    return pd.DataFrame({"Close": [close, close + 1]}, index=idx)


def test_cache_write_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "X.csv"
    write_cache(small_frame(10.0), path, "yfinance", "none")
    assert all_files(tmp_path) == ["sub/X.csv", "sub/X.json"]
    assert path.read_text() == "Date,Close\n2024-01-02,10.0\n2024-01-03,11.0\n"
    write_cache(small_frame(20.0), path, "yfinance", "none")
    assert all_files(tmp_path) == ["sub/X.csv", "sub/X.json"]
    assert parse(path)["Close"].tolist() == [20.0, 21.0]
    assert read_cache_meta(path)["rows"] == 2


def test_cache_write_failure_keeps_previous_files(tmp_path, monkeypatch):
    path = tmp_path / "X.csv"
    write_cache(small_frame(10.0), path, "yfinance", "none")
    before = path.read_bytes(), path.with_suffix(".json").read_bytes()

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(cache.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        write_cache(small_frame(20.0), path, "yfinance", "none")
    assert (path.read_bytes(), path.with_suffix(".json").read_bytes()) == before
    assert all_files(tmp_path) == ["X.csv", "X.json"]


def test_failed_cache_write_keeps_previous_cache(tmp_path, monkeypatch, fake_download):
    cache_dir = tmp_path / "cache"
    fake_download(k1_frame())
    load_ticker("TEST", cache_dir)
    before = (cache_dir / "TEST.csv").read_bytes()

    changed = k1_frame() * 2
    fake_download(changed)

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(cache.os, "replace", refuse)
    with pytest.raises(OSError):
        load_ticker("TEST", cache_dir)
    assert (cache_dir / "TEST.csv").read_bytes() == before
    assert all_files(tmp_path) == ["cache/TEST.csv", "cache/TEST.json"]
    assert read_cache_meta(cache_dir / "TEST.csv")["rows"] == 5  # data and metadata still agree
    assert parse(cache_dir / "TEST.csv").loc["2024-01-08", "Close"] == 103.1


# --- cache metadata and incremental refresh ----------------------------------------------------


def yf_frame(closes: dict[str, float], ticker: str = "TEST") -> pd.DataFrame:
    """A yfinance-shaped answer: Close as given, High +1, Low -1, Open -0.5, Volume 1e6."""
    idx = pd.DatetimeIndex(list(closes), name="Date")
    close = np.array(list(closes.values()))
    prices = {
        "Close": close,
        "High": close + 1,
        "Low": close - 1,
        "Open": close - 0.5,
        "Volume": np.full(len(idx), 1e6),
    }
    cols = pd.MultiIndex.from_product([list(prices), [ticker]], names=["Price", "Ticker"])
    return pd.DataFrame(np.column_stack(list(prices.values())), index=idx, columns=cols)


HISTORY = {"2024-01-02": 100.0, "2024-01-03": 101.0, "2024-01-04": 102.0, "2024-01-05": 103.0, "2024-01-08": 104.0}
LATER = {"2024-01-09": 105.0, "2024-01-10": 106.0}


def only_start(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in ("auto_adjust", "progress", "threads")}


def test_cache_metadata_of_a_download(tmp_path, fake_download):
    fake_download(yf_frame(HISTORY))
    cache_dir = tmp_path / "cache"
    before = datetime.now(UTC).replace(microsecond=0)
    load_ticker("TEST", cache_dir)
    after = datetime.now(UTC)
    meta = json.loads((cache_dir / "TEST.json").read_text())
    fetched_at = datetime.fromisoformat(meta.pop("fetched_at"))
    assert fetched_at.utcoffset().total_seconds() == 0
    assert before <= fetched_at <= after
    assert meta == {
        "source": "yfinance",
        "first_date": "2024-01-02",
        "last_date": "2024-01-08",
        "rows": 5,
        "columns": ["Open", "High", "Low", "Close", "Volume"],
        "adjustment": "yfinance auto_adjust=True: splits and dividends",
        "sha256": hashlib.sha256((cache_dir / "TEST.csv").read_bytes()).hexdigest(),
    }
    assert read_cache_meta(cache_dir / "TEST.csv")["rows"] == 5


def test_second_fetch_downloads_and_appends_only_the_new_days(tmp_path, fake_download):
    cache_dir = tmp_path / "cache"
    fake = fake_download(answers=[yf_frame(HISTORY), yf_frame({"2024-01-08": 104.0, **LATER})])
    load_ticker("TEST", cache_dir)
    frame, report = load_prices_with_report(IngestConfig(ticker="TEST"), data_dir=tmp_path)
    assert len(fake.calls) == 2
    assert only_start(fake.calls[0][1]) == {"period": "max"}
    assert only_start(fake.calls[1][1]) == {"start": "2024-01-08"}  # from the cache's last day, not all history
    cached = parse(cache_dir / "TEST.csv")
    assert cached["Close"].tolist() == [100.0, 101.0, 102.0, 103.0, 104.0, 105.0, 106.0]
    assert cached.index.is_unique
    assert cached["Open"].tolist() == [99.5, 100.5, 101.5, 102.5, 103.5, 104.5, 105.5]
    pd.testing.assert_frame_equal(frame, cached)
    assert report.summary() == (
        "TEST: 7 rows kept of 7 read, 2024-01-02 .. 2024-01-10, columns Open, High, Low, Close, Volume; "
        "cleaned: nothing"
    )
    meta = read_cache_meta(cache_dir / "TEST.csv")
    assert (meta["source"], meta["first_date"], meta["last_date"], meta["rows"]) == (
        "yfinance",
        "2024-01-02",
        "2024-01-10",
        7,
    )


def test_refresh_with_nothing_new_keeps_the_series(tmp_path, fake_download):
    cache_dir = tmp_path / "cache"
    fake = fake_download(answers=[yf_frame(HISTORY), yf_frame({"2024-01-08": 104.0})])
    first = load_ticker("TEST", cache_dir)
    second = load_ticker("TEST", cache_dir)
    assert len(fake.calls) == 2
    pd.testing.assert_frame_equal(second, first)


def test_float_noise_on_the_overlap_day_is_not_a_readjustment(tmp_path, fake_download):
    cache_dir = tmp_path / "cache"
    noisy = {"2024-01-08": 104.0 * (1 + 1e-9), **LATER}
    fake = fake_download(answers=[yf_frame(HISTORY), yf_frame(noisy)])
    load_ticker("TEST", cache_dir)
    frame = load_ticker("TEST", cache_dir)
    assert len(fake.calls) == 2  # no full download
    assert frame.loc["2024-01-08", "Close"] == 104.0  # the cached day is kept as it was
    assert len(frame) == 7


def test_readjusted_overlap_triggers_a_full_download(tmp_path, fake_download, caplog):
    """A dividend since the last fetch: Yahoo scales all earlier auto-adjusted prices (here by 0.98)."""
    cache_dir = tmp_path / "cache"
    readjusted = {day: close * 0.98 for day, close in HISTORY.items()}
    fake = fake_download(
        answers=[
            yf_frame(HISTORY),
            yf_frame({"2024-01-08": readjusted["2024-01-08"], **LATER}),
            yf_frame({**readjusted, **LATER}),
        ]
    )
    load_ticker("TEST", cache_dir)
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        frame = load_ticker("TEST", cache_dir)
    assert [only_start(call[1]) for call in fake.calls] == [
        {"period": "max"},
        {"start": "2024-01-08"},
        {"period": "max"},
    ]
    assert [r.getMessage() for r in caplog.records] == [
        f"TEST: the close of 2024-01-08 changed from 104.0 (cached) to {104.0 * 0.98}: the history was re-adjusted "
        "(a split or dividend); downloading it all again"
    ]
    expected = [close * 0.98 for close in HISTORY.values()] + [105.0, 106.0]
    assert frame["Close"].tolist() == expected
    assert parse(cache_dir / "TEST.csv")["Close"].tolist() == expected  # no mix of old and new adjustment
    assert read_cache_meta(cache_dir / "TEST.csv")["rows"] == 7


def test_overlap_day_missing_from_the_answer_triggers_a_full_download(tmp_path, fake_download):
    cache_dir = tmp_path / "cache"
    fake = fake_download(answers=[yf_frame(HISTORY), yf_frame(LATER), yf_frame({**HISTORY, **LATER})])
    load_ticker("TEST", cache_dir)
    frame = load_ticker("TEST", cache_dir)
    assert [only_start(call[1]) for call in fake.calls] == [
        {"period": "max"},
        {"start": "2024-01-08"},
        {"period": "max"},
    ]
    assert len(frame) == 7


def test_cache_without_metadata_gets_a_full_download(tmp_path, fake_download):
    """A cache written before metadata existed, or by hand: its origin is unknown, so nothing is appended to it."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    write(cache_dir / "TEST.csv", "Date,Close\n2024-01-02,1.0\n2024-01-03,2.0\n")
    fake = fake_download(yf_frame(HISTORY))
    frame = load_ticker("TEST", cache_dir)
    assert only_start(fake.calls[0][1]) == {"period": "max"}
    assert frame["Close"].tolist() == list(HISTORY.values())
    assert read_cache_meta(cache_dir / "TEST.csv")["rows"] == 5


def test_crash_between_data_and_metadata_leaves_no_wrong_metadata(tmp_path, fake_download, monkeypatch, caplog):
    """Data is written first; metadata that does not match the data (sha256) is ignored, never trusted."""
    cache_dir = tmp_path / "cache"
    fake = fake_download(answers=[yf_frame(HISTORY), yf_frame({"2024-01-08": 104.0, **LATER}), yf_frame(HISTORY)])
    load_ticker("TEST", cache_dir)
    old_meta = (cache_dir / "TEST.json").read_bytes()
    replace = cache.os.replace

    def crash_on_metadata(src, dst):
        if str(dst).endswith(".json"):
            raise OSError("killed")
        replace(src, dst)

    monkeypatch.setattr(cache.os, "replace", crash_on_metadata)
    with pytest.raises(OSError, match="killed"):
        load_ticker("TEST", cache_dir)
    monkeypatch.setattr(cache.os, "replace", replace)
    assert all_files(tmp_path) == ["cache/TEST.csv", "cache/TEST.json"]  # no temp file left
    assert len(parse(cache_dir / "TEST.csv")) == 7  # the new data is there ...
    assert (cache_dir / "TEST.json").read_bytes() == old_meta  # ... with the old metadata (5 rows)
    with caplog.at_level(logging.WARNING, logger="pipeline.cache"):
        assert read_cache_meta(cache_dir / "TEST.csv") is None
    assert "does not describe the file" in caplog.records[0].getMessage()
    load_ticker("TEST", cache_dir)  # so the next refresh downloads everything and writes matching metadata
    assert only_start(fake.calls[2][1]) == {"period": "max"}
    assert read_cache_meta(cache_dir / "TEST.csv")["rows"] == 5


def test_unreadable_metadata_is_ignored(tmp_path, fake_download):
    cache_dir = tmp_path / "cache"
    fake = fake_download(yf_frame(HISTORY))
    load_ticker("TEST", cache_dir)
    write(cache_dir / "TEST.json", "{not json")
    assert read_cache_meta(cache_dir / "TEST.csv") is None
    load_ticker("TEST", cache_dir)
    assert [only_start(call[1]) for call in fake.calls] == [{"period": "max"}, {"period": "max"}]


# --- `ingest --csv` stores the series in the cache ---------------------------------------------


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> Path:
    """An empty data folder in place of the repository's data/ (read from ingest.DATA_DIR at call time)."""
    folder = tmp_path / "data"
    monkeypatch.setattr(ingest, "DATA_DIR", folder)
    return folder


def test_ingest_csv_stores_the_series_and_the_name_loads_it_without_yfinance(tmp_path, data_dir, fake_download, capsys):
    fake = fake_download(exc=AssertionError("yfinance must not be called"))
    path = write(tmp_path / "my prices (2024).csv", "Date,Close,Volume\n2024-01-02,10,100\n2024-01-03,11,200\n")
    assert main(["ingest", "--csv", str(path)]) == 0
    stored = data_dir / "cache" / "my_prices_2024.csv"
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        f"{path}: 2 rows kept of 2 read, 2024-01-02 .. 2024-01-03, columns Close, Volume; cleaned: nothing; "
        f"stored as my_prices_2024 in {stored} (load it with --ticker my_prices_2024)"
    ]
    assert err == ""
    assert all_files(data_dir) == ["cache/my_prices_2024.csv", "cache/my_prices_2024.json"]
    meta = read_cache_meta(stored)
    assert meta["source"] == f"csv:{path.resolve()}"
    assert (meta["first_date"], meta["last_date"], meta["rows"]) == ("2024-01-02", "2024-01-03", 2)
    assert meta["adjustment"] == "none: prices as in the file"

    assert main(["ingest", "--ticker", "my_prices_2024"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "my_prices_2024: 2 rows kept of 2 read, 2024-01-02 .. 2024-01-03, columns Close, Volume; cleaned: nothing"
    ]
    assert err == ""
    assert fake.calls == []  # the cache's source is a file: yfinance is never asked
    frame = load_prices(IngestConfig(ticker="my_prices_2024"))
    assert frame["Close"].tolist() == [10.0, 11.0]
    assert fake.calls == []


def test_ingest_csv_with_an_explicit_name(tmp_path, data_dir, capsys, fake_download):
    fake = fake_download(exc=AssertionError("yfinance must not be called"))
    path = write(tmp_path / "p.csv", "Date,Close,Stock Splits\n2024-01-02,100,0\n2024-01-03,51,2\n")
    assert main(["ingest", "--csv", str(path), "--ticker", "MINE.X"]) == 0
    stored = data_dir / "cache" / "MINE.X.csv"
    (line,) = capsys.readouterr().out.splitlines()
    assert line.endswith(f"; stored as MINE.X in {stored} (load it with --ticker MINE.X)")
    assert all_files(data_dir) == ["cache/MINE.X.csv", "cache/MINE.X.json"]
    assert read_cache_meta(stored)["adjustment"] == "split column: 1 split applied"
    assert load_prices(IngestConfig(ticker="MINE.X"))["Close"].tolist() == [50.0, 51.0]
    assert fake.calls == []


def test_refused_csv_writes_nothing(tmp_path, data_dir, capsys):
    path = write(tmp_path / "bad.csv", "Date,Close\n2024-01-02,10\n2024-01-03,abc\n")
    assert main(["ingest", "--csv", str(path)]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"error: {path}: non-numeric Close value 'abc' on 2024-01-03"]
    assert out == ""
    assert all_files(tmp_path) == ["bad.csv"]  # no cache file, metadata or temp file


def test_csv_cannot_be_stored_under_a_shipped_name(tmp_path, data_dir, capsys):
    path = write(tmp_path / "p.csv", "Date,Close\n2024-01-02,10\n")
    assert main(["ingest", "--csv", str(path), "--ticker", "MSFT"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}: cannot store it as 'MSFT', the name of a shipped series; give another --ticker"
    ]
    assert all_files(tmp_path) == ["p.csv"]


def test_csv_whose_name_cannot_be_made_a_ticker(tmp_path, data_dir, capsys):
    path = write(tmp_path / "(((.csv", "Date,Close\n2024-01-02,10\n")
    assert main(["ingest", "--csv", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: {path}: cannot make a cache name of the file name; give one with --ticker NAME"
    ]
    assert all_files(tmp_path) == ["(((.csv"]


def test_failed_store_leaves_no_temp_file(tmp_path, data_dir, monkeypatch):
    path = write(tmp_path / "p.csv", "Date,Close\n2024-01-02,10\n")

    def refuse(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(cache.os, "replace", refuse)
    with pytest.raises(OSError, match="disk full"):
        ingest.store_csv(IngestConfig(csv=str(path)))
    assert all_files(tmp_path) == ["p.csv"]


# --- split columns ------------------------------------------------------------------------------

# Raw prices with a 2:1 split on 2024-01-04: the close halves (102 -> 51) and volume doubles.
SPLIT_ROWS = (
    "2024-01-02,99,101,98,100,1000,{a}\n"
    "2024-01-03,101,103,100,102,1200,{b}\n"
    "2024-01-04,51,52,50,51,2600,{c}\n"
    "2024-01-05,51.5,53,51,52,2400,{d}\n"
)


def split_csv(tmp_path: Path, ratios=(0, 0, 2, 0), column: str = "Stock Splits") -> Path:
    a, b, c, d = ratios
    header = f"Date,Open,High,Low,Close,Volume,{column}\n"
    return write(tmp_path / "s.csv", header + SPLIT_ROWS.format(a=a, b=b, c=c, d=d))


@pytest.mark.parametrize("column", ["Stock Splits", "stock_splits", "Splits", "Split", "STOCK SPLITS"])
def test_two_for_one_split_is_taken_out_of_earlier_rows(tmp_path, column):
    frame, report = clean_prices_with_report(read_price_csv(split_csv(tmp_path, column=column)), "s")
    check_clean(frame, COLUMNS)
    # Rows before the split day: prices / 2, volume * 2. The split day and later: unchanged.
    assert frame["Open"].tolist() == [49.5, 50.5, 51.0, 51.5]
    assert frame["High"].tolist() == [50.5, 51.5, 52.0, 53.0]
    assert frame["Low"].tolist() == [49.0, 50.0, 50.0, 51.0]
    assert frame["Close"].tolist() == [50.0, 51.0, 51.0, 52.0]
    assert frame["Volume"].tolist() == [2000.0, 2400.0, 2600.0, 2400.0]
    assert report.large_moves == ()  # log(51/51) = 0: the split day is no longer a large move
    assert (report.splits_applied, report.splits_already_adjusted) == (1, 0)
    assert report.summary() == (
        "s: 4 rows kept of 4 read, 2024-01-02 .. 2024-01-05, columns Open, High, Low, Close, Volume; "
        "cleaned: 1 split applied"
    )


def test_without_the_split_column_the_split_day_is_flagged(tmp_path):
    raw = read_price_csv(split_csv(tmp_path)).drop(columns="Stock Splits")
    frame, report = clean_prices_with_report(raw, "s")
    assert frame["Close"].tolist() == [100.0, 102.0, 51.0, 52.0]
    assert report.large_moves == ("2024-01-04",)  # log(51/102) = -0.69
    assert report.splits_applied == 0


def test_reverse_split_multiplies_earlier_prices(tmp_path):
    path = write(
        tmp_path / "r.csv",
        "Date,Close,Volume,Stock Splits\n"
        "2024-01-02,10,1000,0\n2024-01-03,10.5,800,0\n2024-01-04,21,450,0.5\n2024-01-05,21.5,400,0\n",
    )
    frame, report = clean_prices_with_report(read_price_csv(path), "r")
    assert frame["Close"].tolist() == [20.0, 21.0, 21.0, 21.5]
    assert frame["Volume"].tolist() == [500.0, 400.0, 450.0, 400.0]
    assert (report.splits_applied, report.large_moves) == (1, ())


def test_two_splits_compound(tmp_path):
    path = write(
        tmp_path / "two.csv",
        "Date,Close,Volume,Splits\n2024-01-02,600,10,0\n2024-01-03,612,10,0\n2024-01-04,306,20,2\n"
        "2024-01-05,309,20,1\n2024-01-08,103,60,3\n2024-01-09,104,60,\n",
    )
    frame, report = clean_prices_with_report(read_price_csv(path), "two")
    assert frame["Close"].tolist() == [100.0, 102.0, 102.0, 103.0, 103.0, 104.0]  # / 6, / 6, / 3, / 3, as is
    assert frame["Volume"].tolist() == [60.0, 60.0, 60.0, 60.0, 60.0, 60.0]
    assert report.splits_applied == 2  # 1 and empty mean no split


def test_split_already_in_the_prices_is_left_alone(tmp_path):
    """yfinance's Ticker.history(): split-adjusted prices next to the split column (and dividends)."""
    path = write(
        tmp_path / "h.csv",
        "Date,Open,High,Low,Close,Volume,Dividends,Stock Splits\n"
        "2024-01-02 00:00:00-05:00,49.5,50.5,49,50,2000,0.0,0.0\n"
        "2024-01-03 00:00:00-05:00,50.5,51.5,50,51,2400,0.25,0.0\n"
        "2024-01-04 00:00:00-05:00,51,52,50,51,2600,0.0,2.0\n"
        "2024-01-05 00:00:00-05:00,51.5,53,51,52,2400,0.0,0.0\n",
    )
    frame, report = clean_prices_with_report(read_price_csv(path), "h")
    check_clean(frame, COLUMNS)
    assert frame["Close"].tolist() == [50.0, 51.0, 51.0, 52.0]  # not halved again
    assert frame["Volume"].tolist() == [2000.0, 2400.0, 2600.0, 2400.0]
    assert (report.splits_applied, report.splits_already_adjusted) == (0, 1)
    assert report.summary().endswith("cleaned: 1 split already adjusted")


def test_split_column_is_ignored_with_adj_close(tmp_path):
    """Adj Close includes splits already: the split column (even a malformed one) is not used."""
    path = write(
        tmp_path / "a.csv",
        "Date,Close,Adj Close,Stock Splits\n2024-01-02,100,50,\n2024-01-03,102,51,\n2024-01-04,51,51,2:1\n",
    )
    frame, report = load_prices_with_report(IngestConfig(csv=str(path), price_column="Adj Close"))
    assert frame["Close"].tolist() == [50.0, 51.0, 51.0]
    assert list(frame.columns) == ["Close"]
    assert (report.splits_applied, report.large_moves) == (0, ())


def test_split_on_a_dropped_empty_row_applies_from_the_next_row(tmp_path):
    text = "Date,Close,Stock Splits\n2024-01-02,100,0\n2024-01-03,102,0\n2024-01-04,,2\n2024-01-05,51,0\n"
    path = write(tmp_path / "e.csv", text)
    frame, report = clean_prices_with_report(read_price_csv(path), "e")
    assert frame["Close"].tolist() == [50.0, 51.0, 51.0]
    assert (report.empty_rows, report.splits_applied, report.cells_filled) == (1, 1, 0)


def test_split_on_the_first_row_changes_nothing(tmp_path):
    frame, report = clean_prices_with_report(read_price_csv(split_csv(tmp_path, ratios=(2, 0, 0, 0))), "s")
    assert frame["Close"].tolist() == [100.0, 102.0, 51.0, 52.0]
    assert (report.splits_applied, report.splits_already_adjusted) == (0, 0)


def test_non_numeric_split_ratio_is_refused(tmp_path):
    with pytest.raises(InputError) as err:
        parse(split_csv(tmp_path, ratios=(0, 0, "2:1", 0)))
    assert str(err.value) == (
        f"{tmp_path / 's.csv'}: non-numeric Stock Splits value '2:1' on 2024-01-04 "
        "(give the ratio as one number: 2 for a 2-for-1 split, 0.5 for 1-for-2)"
    )


def test_negative_split_ratio_is_refused(tmp_path):
    with pytest.raises(InputError) as err:
        parse(split_csv(tmp_path, ratios=(0, 0, -2, 0)))
    assert str(err.value) == f"{tmp_path / 's.csv'}: negative Stock Splits value -2 on 2024-01-04"


def test_dividends_column_is_dropped(tmp_path):
    frame = parse(write(tmp_path / "d.csv", "Date,Close,Dividends\n2024-01-02,10,0\n2024-01-03,11,0.5\n"))
    assert list(frame.columns) == ["Close"]
    assert frame["Close"].tolist() == [10.0, 11.0]


# --- the data-quality record --------------------------------------------------------------------


def test_quality_record_as_dict_is_json_ready():
    columns = ("Close", "Volume")
    report = QualityReport(
        "X", 9, 7, 1, 1, 2, "2020-01-01", "2020-01-09", columns, large_moves=("2020-01-03",), splits_applied=1
    )
    record = report.as_dict()
    assert json.loads(json.dumps(record)) == record
    assert record == {
        "source": "X",
        "rows_read": 9,
        "rows_kept": 7,
        "duplicate_dates": 1,
        "empty_rows": 1,
        "cells_filled": 2,
        "first_date": "2020-01-01",
        "last_date": "2020-01-09",
        "columns": ["Close", "Volume"],
        "price_column": "Close",
        "large_moves": ["2020-01-03"],
        "large_move_threshold": 0.25,
        "splits_applied": 1,
        "splits_already_adjusted": 0,
        "summary": (
            "X: 7 rows kept of 9 read, 2020-01-01 .. 2020-01-09, columns Close, Volume; cleaned: 1 duplicate date, "
            "1 empty row, 2 cells filled, 1 split applied; 1 large move flagged (2020-01-03)"
        ),
    }
    assert report.as_params()["data_splits_applied"] == 1
    assert report.as_params()["data_splits_already_adjusted"] == 0
