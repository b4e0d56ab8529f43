"""Overhead of the pipeline's trainer (data feeding + tracking) against a bare PyTorch loop.

Both train the same model on the same S&P 500 windows for one epoch, interleaved round by round (ABBA)
so that machine noise hits both alike; we report medians and their ratio.

- bare:     pre-materialised contiguous (N, window, F) train tensors, randperm batches, forward,
            MSE, backward, Adam step, then one validation forward. The same algorithm, nothing around it.
- pipeline: `SeedRun.step()` (batches gathered from the window view by index, per-batch loss and
            gradient norm read back, validation pass in eval mode, best-state copy) plus the per-epoch
            MLflow logging of a trial (`EpochLogger` on a SQLite store; its final flush is counted).

Run: python benchmarks/trainer_overhead.py [--rounds 25] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import torch
from torch import nn

from pipeline.ingest import IngestConfig, load_prices
from pipeline.models import ModelConfig, build_model
from pipeline.tracking import EpochLogger
from pipeline.train import SeedRun, TrainConfig, epoch_metrics
from pipeline.windows import WindowConfig, make_windows


def bare_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, train: tuple, val: tuple) -> float:
    """One epoch of the same algorithm with nothing around it: train steps, then the validation loss."""
    (x, y), (val_x, val_y) = train, val
    model.train()
    for batch in torch.randperm(len(x)).split(64):
        loss = nn.functional.mse_loss(model(x[batch]), y[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        return nn.functional.mse_loss(model(val_x), val_y).item()


def measure(family: str, rounds: int, data, tracking_dir: Path) -> tuple[list[float], list[float]]:
    """Per-epoch seconds of the bare loop and of the pipeline, `rounds` each, interleaved."""
    model_cfg = ModelConfig(model=family)
    train_cfg = TrainConfig(max_epochs=10_000, patience=10_000, seeds=1)
    torch.manual_seed(0)
    bare_model = build_model(model_cfg, data.n_features)
    bare_opt = torch.optim.Adam(bare_model.parameters(), lr=1e-3)
    x, y = data.split("train")
    train = (x.contiguous(), y.contiguous())  # materialised copies: the bare loop pays no gathering cost
    val = data.split("val")
    run = SeedRun(model_cfg, train_cfg, data, seed=0)
    mlflow.set_tracking_uri(f"sqlite:///{tracking_dir / 'bench.db'}")
    bare_times, pipeline_times = [], []
    with mlflow.start_run(run_name=f"bench-{family}") as active:
        curves = EpochLogger(active.info.run_id)  # as a trial logs its curves
        bare_epoch(bare_model, bare_opt, train, val)  # warm-up both
        curves.log(epoch_metrics([run.step()]), step=0)
        for step in range(1, rounds + 1):
            # Alternate which side goes first (ABBA), so drifts in machine speed cancel.
            for side in ("bare", "pipeline") if step % 2 else ("pipeline", "bare"):
                start = time.perf_counter()
                if side == "bare":
                    bare_epoch(bare_model, bare_opt, train, val)
                    bare_times.append(time.perf_counter() - start)
                else:
                    curves.log(epoch_metrics([run.step()]), step=step)
                    pipeline_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        curves.flush()
        pipeline_times[-1] += time.perf_counter() - start
    return bare_times, pipeline_times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--write", type=Path, help="append the table to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = make_windows(load_prices(IngestConfig()), WindowConfig())
    lines = [
        f"### Trainer overhead vs a bare PyTorch loop ({time.strftime('%Y-%m-%d')})",
        "",
        f"`python benchmarks/trainer_overhead.py --rounds {args.rounds}`; {platform.machine()}, "
        f"{torch.get_num_threads()} torch thread, torch {torch.__version__}, mlflow {mlflow.__version__}; "
        f"^GSPC, window 30, batch 64, hidden 32, {len(data.starts['train'])} train samples; medians of "
        f"{args.rounds} interleaved epochs.",
        "",
        "| model | bare epoch, median (s) | pipeline epoch, median (s) | ratio of medians | ratio of minima |",
        "|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("rnn", "lstm", "cnn"):
            bare, pipe = measure(family, args.rounds, data, Path(tmp))
            median_bare, median_pipe = statistics.median(bare), statistics.median(pipe)
            lines.append(
                f"| {family} | {median_bare:.4f} | {median_pipe:.4f} | {median_pipe / median_bare:.3f} "
                f"| {min(pipe) / min(bare):.3f} |"
            )
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with args.write.open("a") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
