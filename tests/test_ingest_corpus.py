"""Stage 1 (ingest) on files people actually have: the corpus in tests/data/bad/, the price column, the report.

Each corpus file goes through `python -m pipeline ingest --csv FILE` in-process; EXPECTED.yaml says what must
happen. The only stand-ins are `yfinance.download` (the network call: a CSV must never reach it) and the data
folder holding the cache (`ingest.DATA_DIR`, so that stored series land in tmp_path, not in the repository).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml
import yfinance

from pipeline import ingest
from pipeline.cache import read_cache_meta
from pipeline.clean import (
    LARGE_MOVE,
    QualityReport,
    canonical_price_column,
    clean_prices,
    clean_prices_with_report,
    read_price_csv,
)
from pipeline.cli import main
from pipeline.errors import InputError
from pipeline.ingest import IngestConfig, load_prices, load_prices_with_report

ROOT = Path(__file__).resolve().parent.parent
BAD = ROOT / "tests" / "data" / "bad"
EXPECTED = yaml.safe_load((BAD / "EXPECTED.yaml").read_text())
GOOD = sorted(name for name, case in EXPECTED.items() if case.get("ok"))


def data_snapshot() -> dict[str, tuple[int, int] | None]:
    """Every path under the repository's data/ folder, with (size, mtime) for files."""
    return {
        str(p.relative_to(ROOT / "data")): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
        for p in (ROOT / "data").rglob("*")
    }


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Replace yfinance's download by one that records its calls and fails."""
    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a CSV input reached yfinance.download")

    monkeypatch.setattr(yfinance, "download", refuse)
    return calls


# --- the corpus -------------------------------------------------------------------------------


def test_corpus_lists_every_file_and_every_listed_file_exists():
    on_disk = {p.name for p in BAD.iterdir()} - {"EXPECTED.yaml"}
    listed = set(EXPECTED)
    assert sorted(on_disk - listed) == [], "files in tests/data/bad/ without an entry in EXPECTED.yaml"
    assert sorted(listed - on_disk) == [], "entries in EXPECTED.yaml without a file"
    assert len(on_disk) >= 20
    for name, case in EXPECTED.items():
        if case.get("ok"):
            assert {"rows", "first_close", "last_date"} <= set(case), name
        else:
            assert case["exit"] == 2 and case["message"], name


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_corpus_file_through_the_cli(name, capsys, tmp_path, monkeypatch, no_network):
    case = EXPECTED[name]
    path = BAD / name
    argv = ["ingest", "--csv", str(path)]
    if "price_column" in case:
        argv += ["--price-column", case["price_column"]]
    workdir, data_dir = tmp_path / "work", tmp_path / "data"
    workdir.mkdir()
    monkeypatch.chdir(workdir)
    monkeypatch.setattr(ingest, "DATA_DIR", data_dir)
    before = data_snapshot()

    code = main(argv)

    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert data_snapshot() == before  # nothing written to (or removed from) the repository's data/
    assert list(workdir.iterdir()) == []  # nor to the working directory
    assert no_network == []
    stored = sorted(p.name for p in data_dir.rglob("*") if p.is_file())
    if not case.get("ok"):
        assert code == case["exit"]
        lines = err.splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"error: {path}: "), lines
        assert case["message"] in lines[0]
        assert out == ""
        assert stored == []  # a refused file leaves nothing in the cache, not even a temp file
        return
    assert code == 0
    assert err == ""
    (line,) = out.splitlines()  # one summary line
    assert line.startswith(f"{path}: {case['rows']} row{'' if case['rows'] == 1 else 's'} kept of ")
    assert case.get("summary", "") in line
    cache = data_dir / "cache" / f"{path.stem}.csv"
    assert line.endswith(f"; stored as {path.stem} in {cache} (load it with --ticker {path.stem})")
    assert stored == [f"{path.stem}.csv", f"{path.stem}.json"]
    assert read_cache_meta(cache)["source"] == f"csv:{path}"
    # The stored series is the clean frame, loaded by name from the cache without yfinance.
    cfg = IngestConfig(csv=str(path), price_column=case.get("price_column", "Close"))
    pd.testing.assert_frame_equal(load_prices(IngestConfig(ticker=path.stem)), load_prices(cfg), check_freq=False)
    assert no_network == []


@pytest.mark.parametrize("name", GOOD)
def test_corpus_good_file_values(name, no_network):
    case = EXPECTED[name]
    cfg = IngestConfig(csv=str(BAD / name), price_column=case.get("price_column", "Close"))
    frame, report = load_prices_with_report(cfg)
    pd.testing.assert_frame_equal(load_prices(cfg), frame)
    assert len(frame) == case["rows"]
    assert frame["Close"].iloc[0] == case["first_close"]
    assert str(frame.index[-1].date()) == case["last_date"]
    if "first_date" in case:
        assert str(frame.index[0].date()) == case["first_date"]
    if "last_close" in case:
        assert frame["Close"].iloc[-1] == case["last_close"]
    if "first_open" in case:
        assert frame["Open"].iloc[0] == pytest.approx(case["first_open"], rel=1e-12)
    if "first_volume" in case:
        assert frame["Volume"].iloc[0] == case["first_volume"]
    if "columns" in case:
        assert list(frame.columns) == case["columns"]
    assert list(report.large_moves) == case.get("large_moves", [])
    assert report.splits_applied == case.get("splits_applied", 0)
    assert report.splits_already_adjusted == case.get("splits_already_adjusted", 0)
    assert (report.rows_kept, report.last_date) == (case["rows"], case["last_date"])
    assert report.first_date == str(frame.index[0].date())
    assert report.source == str(BAD / name)
    assert case.get("summary", "") in report.summary()
    # The clean-frame contract holds for every accepted file.
    assert frame.index.is_monotonic_increasing and frame.index.is_unique and frame.index.tz is None
    assert not frame.isna().any().any()
    assert (frame.dtypes == "float64").all()


# --- the price column -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "canonical"),
    [
        ("Close", "Close"),
        ("close", "Close"),
        ("Adj Close", "Adj Close"),
        ("adj close", "Adj Close"),
        ("adj_close", "Adj Close"),
        ("AdjClose", "Adj Close"),
        ("ADJ_CLOSE", "Adj Close"),
    ],
)
def test_price_column_spellings(given, canonical):
    assert canonical_price_column(given) == canonical


@pytest.mark.parametrize("given", ["Open", "adjusted", "Adj. Close", ""])
def test_unknown_price_column_refused(given):
    with pytest.raises(InputError, match=rf"price_column must be Close or Adj Close, got {given!r}"):
        canonical_price_column(given)


def test_unknown_price_column_is_one_line_exit_2(capsys, no_network):
    assert main(["ingest", "--ticker", "^GSPC", "--price-column", "Open"]) == 2
    out, err = capsys.readouterr()
    assert err.splitlines() == ["error: price_column must be Close or Adj Close, got 'Open'"]
    assert out == ""


def test_adj_close_scales_open_high_low_by_the_same_factor(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(
        "Date,Open,High,Low,Close,Adj Close,Volume\n"
        "2024-02-07,99,101,98,100,98,1500\n"
        "2024-02-08,100.5,102,100,101,99,1400\n"
        "2024-02-09,101.5,102.5,101,102,102,1300\n"
    )
    raw = clean_prices(read_price_csv(path), "raw")
    adjusted = load_prices(IngestConfig(csv=str(path), price_column="Adj Close"))
    assert adjusted["Close"].tolist() == [98.0, 99.0, 102.0]
    factor = pd.Series([0.98, 99 / 101, 1.0], index=raw.index)
    for column in ("Open", "High", "Low"):
        pd.testing.assert_series_equal(adjusted[column], raw[column] * factor, check_names=False, rtol=1e-12)
    assert adjusted["Volume"].tolist() == raw["Volume"].tolist()  # volume is not a price
    assert (adjusted["Low"] <= adjusted["Close"]).all() and (adjusted["Close"] <= adjusted["High"]).all()
    assert adjusted.loc["2024-02-09"].tolist() == raw.loc["2024-02-09"].tolist()  # factor 1 on the last day


def test_adj_close_only_file_becomes_close(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("Date,Adj Close\n2024-01-02,10.5\n2024-01-03,11\n")
    frame = load_prices(IngestConfig(csv=str(path), price_column="adj_close"))
    assert list(frame.columns) == ["Close"]
    assert frame["Close"].tolist() == [10.5, 11.0]


def test_adj_close_without_close_cannot_scale_open(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("Date,Open,Adj Close\n2024-01-02,10,10.5\n")
    with pytest.raises(InputError, match=r"no Close column to scale Open/High/Low .*\(found: Open, Adj Close\)"):
        load_prices(IngestConfig(csv=str(path), price_column="Adj Close"))


def test_shipped_gspc_adj_close_equals_close():
    """For an index Adj Close = Close (data/README.md): asking for it changes nothing but the report."""
    default, plain = load_prices_with_report(IngestConfig(ticker="^GSPC"))
    adjusted, report = load_prices_with_report(IngestConfig(ticker="^GSPC", price_column="Adj Close"))
    pd.testing.assert_frame_equal(adjusted, default, check_exact=True)
    assert plain.price_column == "Close" and report.price_column == "Adj Close"


def test_downloads_have_no_adj_close_and_nothing_is_cached(tmp_path, monkeypatch):
    idx = pd.DatetimeIndex(["2024-01-02", "2024-01-03"], name="Date")
    cols = pd.MultiIndex.from_product([["Close", "High", "Low", "Open", "Volume"], ["TEST"]], names=["Price", "Ticker"])
    raw = pd.DataFrame([[100.5, 101.0, 99.0, 100.0, 1e6], [101.2, 102.0, 100.1, 100.6, 1.1e6]], index=idx, columns=cols)
    monkeypatch.setattr(yfinance, "download", lambda *args, **kwargs: raw)
    with pytest.raises(
        InputError, match=r"yfinance TEST: no Adj Close column \(found: Close, High, Low, Open, Volume\)"
    ):
        load_prices_with_report(IngestConfig(ticker="TEST", price_column="Adj Close"), data_dir=tmp_path)
    assert list(tmp_path.rglob("*.csv")) == []
    frame, report = load_prices_with_report(IngestConfig(ticker="TEST"), data_dir=tmp_path)
    assert report.summary() == (
        "TEST: 2 rows kept of 2 read, 2024-01-02 .. 2024-01-03, columns Open, High, Low, Close, Volume; "
        "cleaned: nothing"
    )
    assert frame["Close"].tolist() == [100.5, 101.2]
    assert (tmp_path / "cache" / "TEST.csv").is_file()


def test_bad_price_column_is_refused_before_any_download(tmp_path, no_network):
    with pytest.raises(InputError, match="price_column must be"):
        load_prices(IngestConfig(ticker="TEST", price_column="Last"), data_dir=tmp_path)
    assert no_network == []
    assert list(tmp_path.iterdir()) == []


# --- the quality report -----------------------------------------------------------------------


def test_shipped_series_reports():
    _, gspc = load_prices_with_report(IngestConfig(ticker="^GSPC"))
    assert gspc.summary() == (
        "^GSPC: 5031 rows kept of 5031 read, 1999-01-04 .. 2018-12-31, columns Open, High, Low, Close, Volume; "
        "cleaned: nothing"
    )
    _, msft = load_prices_with_report(IngestConfig(ticker="MSFT"))
    # Black Monday: MSFT closed at 0.23483 after 0.33551 (log return -0.357), a real move, flagged not removed.
    assert msft.summary() == (
        "MSFT: 7983 rows kept of 7983 read, 1986-03-13 .. 2017-11-10, columns Open, High, Low, Close, Volume; "
        "cleaned: nothing; 1 large move flagged (1987-10-19)"
    )
    assert msft.as_params() == {
        "data_source": "MSFT",
        "data_rows_read": 7983,
        "data_rows_kept": 7983,
        "data_duplicate_dates": 0,
        "data_empty_rows": 0,
        "data_cells_filled": 0,
        "data_first_date": "1986-03-13",
        "data_last_date": "2017-11-10",
        "data_price_column": "Close",
        "data_large_move_threshold": 0.25,
        "data_splits_applied": 0,
        "data_splits_already_adjusted": 0,
        "data_columns": "Open,High,Low,Close,Volume",
        "data_large_moves": 1,
        "data_large_move_dates": "1987-10-19",
    }


def test_report_counts_what_cleaning_did(tmp_path):
    path = tmp_path / "messy.csv"
    path.write_text(
        "Date,Open,High,Close\n"
        "2008-10-06,100,102,101\n"
        "2008-10-07,101,103,90\n"
        "2008-10-07,101,103,102\n"  # a duplicate date: this later row wins
        "2008-10-08,,,\n"  # an empty row: dropped
        "2008-10-09,102,,\n"  # High and Close filled
        "2008-10-10,103,104,\n"  # Close filled
        "2008-10-06,100,102,101\n"  # a duplicate of the first row, out of order
        "2008-10-13,104,140,139\n"  # log(139/102) = 0.31 > LARGE_MOVE: flagged
    )
    frame, report = clean_prices_with_report(read_price_csv(path), source="messy")
    assert LARGE_MOVE == 0.25
    assert frame["Close"].tolist() == [101.0, 102.0, 102.0, 102.0, 139.0]
    assert frame["High"].tolist() == [102.0, 103.0, 103.0, 104.0, 140.0]
    assert report == QualityReport(
        source="messy",
        rows_read=8,
        rows_kept=5,
        duplicate_dates=2,
        empty_rows=1,
        cells_filled=3,
        first_date="2008-10-06",
        last_date="2008-10-13",
        columns=("Open", "High", "Close"),
        large_moves=("2008-10-13",),
    )
    assert report.summary() == (
        "messy: 5 rows kept of 8 read, 2008-10-06 .. 2008-10-13, columns Open, High, Close; "
        "cleaned: 2 duplicate dates, 1 empty row, 3 cells filled; 1 large move flagged (2008-10-13)"
    )
    pd.testing.assert_frame_equal(clean_prices(read_price_csv(path), source="messy"), frame)


def test_large_move_threshold_is_strict_and_both_directions(tmp_path):
    path = tmp_path / "m.csv"
    # log(128/100) = 0.2469 (not flagged), then a 50% fall and a doubling (flagged).
    path.write_text("Date,Close\n2024-01-02,100\n2024-01-03,128\n2024-01-04,64\n2024-01-05,128\n")
    _, report = clean_prices_with_report(read_price_csv(path), source="m")
    assert report.large_moves == ("2024-01-04", "2024-01-05")
    assert report.summary().endswith("cleaned: nothing; 2 large moves flagged (2024-01-04, 2024-01-05)")


def test_many_large_moves_stay_on_one_line_and_in_param_limits():
    dates = tuple(f"2020-01-{day:02d}" for day in range(1, 26))
    report = QualityReport("X", 30, 30, 0, 0, 0, "2020-01-01", "2020-01-30", ("Close",), large_moves=dates)
    assert report.summary() == (
        "X: 30 rows kept of 30 read, 2020-01-01 .. 2020-01-30, columns Close; cleaned: nothing; "
        "25 large moves flagged (2020-01-01, 2020-01-02, 2020-01-03, +22 more)"
    )
    params = report.as_params()
    assert params["data_large_moves"] == 25
    assert params["data_large_move_dates"] == ",".join(dates[:20]) + ",..."
    assert all(key.startswith("data_") for key in params)
    assert all(isinstance(value, str | int | float) for value in params.values())


def test_adj_close_report_says_so():
    _, report = load_prices_with_report(IngestConfig(csv=str(BAD / "adj_close_dividend.csv"), price_column="AdjClose"))
    assert report.summary() == (
        f"{BAD / 'adj_close_dividend.csv'}: 3 rows kept of 3 read, 2024-02-07 .. 2024-02-09, columns Open, High, "
        "Low, Close, Volume (Close = Adj Close, Open/High/Low scaled); cleaned: nothing"
    )
    assert report.as_params()["data_price_column"] == "Adj Close"
