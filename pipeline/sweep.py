"""Stage 6b — sweep: a grid of dropout types × rates per family, many seeds, a paired design.

In:  a `SweepConfig` (families, types, rates, seeds, worker processes), the fixed `RunConfig` and its
     `Windows`.
Out: one `ConfigResult` per grid point (its summary over seeds, per-seed metrics and curves), logged
     as nested MLflow runs of the active (parent) run, plus `sweep.csv` (one row per config × seed) and
     `curves.json` on the parent, which `pipeline.report` reads.

Paired design: within a family, seed s gives every type and rate the same initial weights, the same
batch order and the same starting random state for the masks (see `SeedRun`); only the dropout differs.
Comparisons against `none` are then paired per seed, which detects effects of a few percent that
unpaired tests over a handful of seeds cannot. `tests/test_report.py` checks the pairing.

Each grid point trains in a worker process (one torch thread each; `workers` processes at once); only
the parent process writes to MLflow, so a SQLite store sees one writer.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import mlflow

from pipeline.config import RunConfig
from pipeline.errors import InputError
from pipeline.models import FAMILIES, PRESETS, ModelConfig, applicable_types, check_model_config
from pipeline.stability import summarize
from pipeline.tracking import EpochLogger, log_params_once, log_text_artifact
from pipeline.train import DivergedError, epoch_metrics, train_seeds
from pipeline.windows import Windows

NO_OP_BUILTIN = "builtin_1layer"  # label of the article's one-layer built-in RNN dropout, built as written


@dataclass
class SweepConfig:
    """The grid. Empty `types` means every type the family accepts (with its num_layers)."""

    types: str = ""  # comma-separated dropout types
    rates: str = "0.1,0.3,0.5"  # comma-separated dropout rates
    seeds: int = 5  # seeds per grid point (the paired comparisons need several)
    workers: int = 2  # processes training grid points in parallel (one torch thread each)


@dataclass
class ConfigResult:
    model: ModelConfig
    label: str  # type as reported: the dropout type, or NO_OP_BUILTIN
    summary: dict[str, float] = field(default_factory=dict)  # over seeds (pipeline.stability.summarize)
    per_seed: list[dict[str, float]] = field(default_factory=list)  # the same measures, one seed at a time
    curves: list[dict[str, list[float]]] = field(default_factory=list)  # per seed: val and train loss by epoch
    epochs: list[dict[str, float]] = field(default_factory=list)  # per epoch: means over the seeds
    failure: str = ""


def families(model: str) -> tuple[str, ...]:
    if model == "all":
        return FAMILIES
    if model not in FAMILIES:
        raise InputError(f"unknown model {model!r}: choose one of {', '.join(FAMILIES)}, or all")
    return (model,)


def parse_list(text: str, kind: type, name: str) -> list:
    try:
        return [kind(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        raise InputError(f"{name} must be a comma-separated list of {kind.__name__}, got {text!r}") from None


def grid(sweep: SweepConfig, base: ModelConfig) -> list[tuple[ModelConfig, str]]:
    """(model config, reported type) for every grid point: per family `none` first, then type × rate.

    For the Elman RNN, the article's one-layer built-in dropout (a no-op in PyTorch) is added at each
    rate whenever `builtin` is asked for or all types are, so the report can show it next to `none`.
    """
    rates = parse_list(sweep.rates, float, "rates")
    asked = parse_list(sweep.types, str, "types")
    points = []
    for family in families(base.model):
        types = asked or [t for t in applicable_types(family, base.num_layers) if t != "none"]
        points.append((dataclasses.replace(base, model=family, dropout_type="none", dropout_rate=0.0), "none"))
        for kind in (t for t in types if t != "none"):
            if kind == "builtin" and family == "rnn" and base.num_layers < 2:
                continue  # one layer: measured as written below (builtin_1layer), not refused
            for rate in rates:
                cfg = dataclasses.replace(base, model=family, dropout_type=kind, dropout_rate=rate)
                check_model_config(cfg)  # refuse a type the family does not take, before anything trains
                points.append((cfg, kind))
        if family == "rnn" and base.num_layers == 1 and (not asked or "builtin" in asked):
            literal = {k: v for k, v in PRESETS["article-rnn-builtin"].items() if k != "dropout_rate"}
            points += [(dataclasses.replace(base, **literal, dropout_rate=rate), NO_OP_BUILTIN) for rate in rates]
    return points


def train_point(model_cfg: ModelConfig, label: str, cfg: RunConfig, data: Windows) -> ConfigResult:
    """Train one grid point with all seeds (runs in a worker process)."""
    result = ConfigResult(model_cfg, label)
    try:
        runs = train_seeds(model_cfg, cfg.train, data, lambda _e, stats: result.epochs.append(epoch_metrics(stats)))
    except DivergedError as exc:
        result.failure = str(exc)
        return result
    naive = data.naive_loss("val")
    result.summary = summarize(runs, cfg.objective, naive)
    result.per_seed = [{"seed": run.seed, **summarize([run], cfg.objective, naive)} for run in runs]
    result.curves = [{"val_loss": run.val_curve, "train_loss": [s.train_loss for s in run.history]} for run in runs]
    return result


def _worker(args: tuple) -> ConfigResult:
    import torch

    model_cfg, label, cfg, data = args
    torch.set_num_threads(cfg.train.threads)
    return train_point(model_cfg, label, cfg, data)


def check_sweep(sweep: SweepConfig, cfg: RunConfig) -> None:
    """Refuse a sweep the report could not analyse, before anything runs."""
    if sweep.seeds < 2:
        raise InputError(f"a sweep needs at least 2 seeds for paired comparisons, got {sweep.seeds}")
    if cfg.window.folds:
        # The paired per-seed statistics of the report assume one validation curve per seed.
        raise InputError("folds (walk-forward validation) applies to tune's objective; a sweep uses one split")


def run_sweep(sweep: SweepConfig, cfg: RunConfig, data: Windows) -> list[ConfigResult]:
    """Train the grid (in `sweep.workers` processes) and log it under the active MLflow run."""
    check_sweep(sweep, cfg)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seeds=sweep.seeds))
    points = grid(sweep, cfg.model)
    parent = mlflow.active_run()
    log_params_once(
        {
            **cfg.flat(),
            "model": cfg.model.model,
            "types": sweep.types or "all",
            "rates": sweep.rates,
            "seeds": sweep.seeds,
            "grid_points": len(points),
        }
    )
    mlflow.set_tag("pipeline.kind", "sweep")
    started = time.perf_counter()
    jobs = [(model_cfg, label, cfg, data) for model_cfg, label in points]
    results = []
    if sweep.workers > 1:
        with ProcessPoolExecutor(sweep.workers, mp_context=get_context("spawn")) as pool:
            for index, result in enumerate(pool.map(_worker, jobs), 1):
                results.append(log_point(result, cfg, parent.info.run_id, index, len(points), started))
    else:
        for index, job in enumerate(jobs, 1):
            results.append(log_point(_worker(job), cfg, parent.info.run_id, index, len(points), started))
    log_text_artifact(sweep_csv(results), "sweep.csv")
    log_text_artifact(json.dumps([curves_record(r) for r in results]), "curves.json")
    return results


def point_name(result: ConfigResult) -> str:
    m = result.model
    return f"{m.model} · {result.label}" + (f" · p={m.dropout_rate:.2f}" if result.label != "none" else "")


def log_point(
    result: ConfigResult, cfg: RunConfig, parent_id: str, index: int, total: int, started: float
) -> ConfigResult:
    """One nested run per grid point: params, per-epoch curves (step = epoch), summary metrics."""
    run_cfg = dataclasses.replace(cfg, model=result.model)
    with mlflow.start_run(run_name=point_name(result), nested=True, parent_run_id=parent_id) as child:
        mlflow.log_params({**run_cfg.flat(), "reported_type": result.label})
        curves = EpochLogger(child.info.run_id, interval=float("inf"))
        for epoch, metrics in enumerate(result.epochs, 1):
            curves.log(metrics, epoch)
        curves.flush()
        mlflow.log_metrics(result.summary)
        mlflow.set_tag("sweep_state", "FAIL" if result.failure else "COMPLETE")
        if result.failure:
            mlflow.set_tag("fail_reason", result.failure)
    outcome = result.failure or f"objective {result.summary['objective']:.4f}"
    print(f"[{index}/{total}] {point_name(result)}: {outcome}  ({time.perf_counter() - started:.0f}s)", file=sys.stderr)
    return result


SEED_COLUMNS = ("family", "type", "rate", "seed")


def sweep_csv(results: list[ConfigResult]) -> str:
    """One row per grid point × seed: the per-seed measures, for the paired statistics of the report."""
    rows = [
        {"family": r.model.model, "type": r.label, "rate": r.model.dropout_rate, **seed}
        for r in results
        for seed in r.per_seed
    ]
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=[*SEED_COLUMNS, *[k for k in rows[0] if k not in SEED_COLUMNS]])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def curves_record(result: ConfigResult) -> dict[str, Any]:
    return {
        "family": result.model.model,
        "type": result.label,
        "rate": result.model.dropout_rate,
        "objective": result.summary.get("objective"),
        "curves": result.curves,
    }
