"""Ingest and window many tickers: is memory O(rows × features), and is the time spent parsing?

Writes `--tickers` synthetic daily OHLCV CSV files twice, `--short-years` and `--years` long (random
walks on business days, ticker k listed k mod 50 days after the first, so the pooled calendar is ragged),
then, alternating short and long file of each ticker so that both sizes see the same machine state,
times each phase: reading (`read_price_csv`, the pandas parser), validating and cleaning
(`clean_prices_with_report`; of that, parsing dates and numbers is timed on its own by profiling) and
pooling into windows (`make_windows`, one scaler per ticker, the same split dates for all).

From the two sizes, each phase's time is split into a fixed cost per series and a marginal cost per
row: a Python loop over rows would show as a per-row cost of microseconds; vectorised pandas/numpy work
costs nanoseconds per row. Memory: the bytes the windows hold (one feature-major float32 array plus
the int64 sample starts) against the same samples materialised as an (S, window, F) float32 array.

Run: python benchmarks/ingest_scale.py [--tickers 500] [--short-years 5] [--years 20] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import cProfile
import platform
import pstats
import resource
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.clean import clean_prices_with_report, read_price_csv
from pipeline.windows import WindowConfig, Windows, make_windows

DAYS_PER_YEAR = 252
PARSERS = ("_parse_dates", "_to_float")  # the functions of pipeline/clean.py that turn text into values


def write_ticker(path: Path, k: int, rows: int, rng: np.random.Generator) -> None:
    """One CSV: Date, Open, High, Low, Close, Volume (one header line, ISO dates)."""
    dates = pd.bdate_range("2000-01-03", periods=rows + k % 50)[k % 50 :]
    close = 50 * np.exp(np.cumsum(rng.normal(0, 0.015, rows)))
    spread = np.abs(rng.normal(0, 0.01, (rows, 3)))
    frame = pd.DataFrame(
        {
            "Open": close * (1 + spread[:, 0] - spread[:, 1]),
            "High": close * (1 + spread[:, 0] + spread[:, 2]),
            "Low": close * (1 - spread[:, 1] - spread[:, 2]),
            "Close": close,
            "Volume": rng.integers(1e5, 1e7, rows),
        },
        index=pd.Index(dates.strftime("%Y-%m-%d"), name="Date"),
    )
    frame.to_csv(path, float_format="%.6f")


def read_and_clean(path: Path, timings: dict[str, float]) -> pd.DataFrame:
    start = time.perf_counter()
    raw = read_price_csv(path)
    middle = time.perf_counter()
    clean, _ = clean_prices_with_report(raw, str(path))
    timings["read"] += middle - start
    timings["clean"] += time.perf_counter() - middle
    return clean


def pool(frames: dict[str, pd.DataFrame], window: int, timings: dict[str, float]) -> Windows:
    start = time.perf_counter()
    data = make_windows(frames, WindowConfig(window=window))
    timings["windows"] += time.perf_counter() - start
    return data


def profile_cleaning(paths: list[Path]) -> tuple[float, float]:
    """Profile `clean_prices_with_report` on `paths` (cProfile): (share of its time in the date and number
    parsers, Python function calls per file). A loop over rows would make the calls grow with the rows."""
    raws = [read_price_csv(p) for p in paths]
    profile = cProfile.Profile()
    profile.enable()
    for path, raw in zip(paths, raws, strict=True):
        clean_prices_with_report(raw, str(path))
    profile.disable()
    stats = pstats.Stats(profile)
    rows = stats.stats  # {(file, line, name): (calls, ncalls, tottime, cumtime, callers)}
    cumulative = {name: row[3] for (file, _, name), row in rows.items() if file.endswith("clean.py")}
    share = sum(cumulative[name] for name in PARSERS) / cumulative["clean_prices_with_report"]
    return share, stats.total_calls / len(paths)


def window_memory(data: Windows, window: int) -> tuple[float, float]:
    """(MB the windows hold, MB of the same samples materialised as (S, window, F) float32)."""
    assert data._view.untyped_storage().data_ptr() == data._by_feature.untyped_storage().data_ptr()
    samples = sum(len(s) for s in data.starts.values())
    held = data._by_feature.untyped_storage().nbytes() + sum(s.numel() * 8 for s in data.starts.values())
    return held / 2**20, samples * window * data.n_features * 4 / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickers", type=int, default=500)
    parser.add_argument("--short-years", type=int, default=5)
    parser.add_argument("--years", type=int, default=20)
    parser.add_argument("--window", type=int, default=30)
    parser.add_argument("--write", type=Path, help="append the result as a markdown section to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = {"short": args.short_years * DAYS_PER_YEAR, "long": args.years * DAYS_PER_YEAR}
    timings = {size: {"read": 0.0, "clean": 0.0, "windows": 0.0} for size in sizes}
    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        paths = {size: [Path(tmp) / f"{size}{k:04d}.csv" for k in range(args.tickers)] for size in sizes}
        for size, rows in sizes.items():
            for k, path in enumerate(paths[size]):
                write_ticker(path, k, rows, rng)
        csv_mb = sum(p.stat().st_size for p in paths["long"]) / 2**20
        frames: dict[str, dict[str, pd.DataFrame]] = {size: {} for size in sizes}
        for k in range(args.tickers):  # alternate the sizes: both see the same machine state
            for size in sizes:
                frames[size][f"T{k:04d}"] = read_and_clean(paths[size][k], timings[size])
        data = {size: pool(frames[size], args.window, timings[size]) for size in sizes}
        profiled = {size: paths[size][:50] for size in sizes}
        share, long_calls = profile_cleaning(profiled["long"])
        short_calls = profile_cleaning(profiled["short"])[1]
    rows = {size: data[size].features.shape[0] for size in sizes}
    samples = sum(len(s) for s in data["long"].starts.values())
    held_mb, materialised_mb = window_memory(data["long"], args.window)
    long_total = sum(timings["long"].values())

    def split(phase: str) -> tuple[float, float]:
        """(fixed ms per series, marginal ns per row) of a phase, from the two sizes."""
        per_row = (timings["long"][phase] - timings["short"][phase]) / (rows["long"] - rows["short"])
        fixed = (timings["long"][phase] - per_row * rows["long"]) / args.tickers
        return fixed * 1e3, per_row * 1e9

    phases = [("read CSV (pandas parser)", "read"), ("validate and clean", "clean"), ("pool into windows", "windows")]
    table = []
    for name, key in phases:
        fixed_ms, row_ns = split(key)
        table.append(
            f"| {name} | {timings['short'][key]:.2f} | {timings['long'][key]:.2f} | "
            f"{timings['long'][key] / long_total:.0%} | {fixed_ms:.1f} | {row_ns:.0f} |"
        )
    lines = [
        f"### Ingest and window {args.tickers} tickers × {args.short_years} and {args.years} years ({date.today()})",
        "",
        f"`python benchmarks/ingest_scale.py --tickers {args.tickers} --short-years {args.short_years} "
        f"--years {args.years}`; {platform.machine()}, pandas {pd.__version__}, torch {torch.__version__}; "
        f"{csv_mb:.0f} MB of CSV in the long set, {rows['long']:,} feature rows × {data['long'].n_features} "
        f"features, {samples:,} samples of window {args.window}.",
        "",
        f"| phase | s, {args.short_years} y | s, {args.years} y | share, {args.years} y "
        "| fixed ms per series | marginal ns per row |",
        "|---|---|---|---|---|---|",
        *table,
        "",
        f"Parsing dates and numbers is {share:.0%} of validate-and-clean (cProfile, {len(profiled['long'])} long "
        f"files). Python function calls per series while validating and cleaning: {short_calls:,.0f} "
        f"({args.short_years} y), {long_calls:,.0f} ({args.years} y). Windows hold {held_mb:.1f} MB (features + "
        f"sample starts); the same samples materialised as (S, window, F) float32 would be "
        f"{materialised_mb:.0f} MB: ratio {materialised_mb / held_mb:.1f}. "
        f"Peak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        with args.write.open("a") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
