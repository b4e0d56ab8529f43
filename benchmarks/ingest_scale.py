"""Ingest and window many tickers: is memory O(rows × features), and is the time spent parsing?

Writes `--tickers` synthetic daily OHLCV CSV files of `--years` years each (random walks on business
days, each ticker listed a few days after the previous one so the pooled calendar is ragged), then
times, per phase: reading the CSV files (`read_price_csv`), validating and cleaning them
(`clean_prices_with_report`) and pooling them into windows (`make_windows`, one scaler per ticker,
the same split dates for all). Memory: the bytes the windows hold (one feature-major float32 array plus
the int64 sample starts) against the bytes of the same samples materialised as an (S, window, F) array.

Run: python benchmarks/ingest_scale.py [--tickers 500] [--years 20] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import platform
import resource
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.clean import clean_prices_with_report, read_price_csv
from pipeline.windows import WindowConfig, make_windows

DAYS_PER_YEAR = 252


def write_tickers(folder: Path, tickers: int, years: int) -> list[Path]:
    """One CSV per ticker: Date, Open, High, Low, Close, Volume (one header line, ISO dates)."""
    rng = np.random.default_rng(0)
    rows = years * DAYS_PER_YEAR
    paths = []
    for k in range(tickers):
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
        path = folder / f"T{k:04d}.csv"
        frame.to_csv(path, float_format="%.6f")
        paths.append(path)
    return paths


def measure(paths: list[Path], window: int) -> dict[str, float]:
    timings = {"read": 0.0, "clean": 0.0}
    frames = {}
    for path in paths:
        start = time.perf_counter()
        raw = read_price_csv(path)
        middle = time.perf_counter()
        frames[path.stem], _ = clean_prices_with_report(raw, str(path))
        timings["read"] += middle - start
        timings["clean"] += time.perf_counter() - middle
    start = time.perf_counter()
    data = make_windows(frames, WindowConfig(window=window))
    timings["windows"] = time.perf_counter() - start
    samples = sum(len(s) for s in data.starts.values())
    held = data._by_feature.untyped_storage().nbytes() + sum(s.numel() * 8 for s in data.starts.values())
    assert data._view.untyped_storage().data_ptr() == data._by_feature.untyped_storage().data_ptr()
    return {
        **timings,
        "rows": data.features.shape[0],
        "features": data.n_features,
        "samples": samples,
        "held_mb": held / 2**20,
        "materialised_mb": samples * window * data.n_features * 4 / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tickers", type=int, default=500)
    parser.add_argument("--years", type=int, default=20)
    parser.add_argument("--window", type=int, default=30)
    parser.add_argument("--write", type=Path, help="append the result as a markdown section to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_tickers(Path(tmp), args.tickers, args.years)
        size_mb = sum(p.stat().st_size for p in paths) / 2**20
        m = measure(paths, args.window)
    total = m["read"] + m["clean"] + m["windows"]
    lines = [
        f"### Ingest and window {args.tickers} tickers × {args.years} years ({date.today()})",
        "",
        f"`python benchmarks/ingest_scale.py --tickers {args.tickers} --years {args.years}`; "
        f"{platform.machine()}, pandas {pd.__version__}, torch {torch.__version__}; "
        f"{size_mb:.0f} MB of CSV, {m['rows']:,} feature rows × {m['features']} features, "
        f"{m['samples']:,} samples of window {args.window}.",
        "",
        "| phase | seconds | share of the time |",
        "|---|---|---|",
        *(
            f"| {name} | {m[key]:.2f} | {m[key] / total:.0%} |"
            for name, key in [
                ("read CSV (pandas parser)", "read"),
                ("validate and clean", "clean"),
                ("pool into windows", "windows"),
            ]
        ),
        "",
        f"Windows hold {m['held_mb']:.1f} MB (features + sample starts); the same samples materialised as "
        f"(S, window, F) float32 would be {m['materialised_mb']:.0f} MB: ratio "
        f"{m['materialised_mb'] / m['held_mb']:.1f}. Pooling costs {m['windows'] / m['rows'] * 1e6:.2f} µs per row. "
        f"Peak RSS of the process: {m['peak_rss_mb']:.0f} MB.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        with args.write.open("a") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
