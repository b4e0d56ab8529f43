"""Command line: `python -m pipeline {ingest,tune,train,types}`. It only parses and calls the stages.

Options are generated from the stage dataclasses, so their defaults cannot drift from the code's; the
MLproject passes the same names (a test checks both). A user error prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import warnings
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

from pipeline.config import SECTIONS, RunConfig, coerce
from pipeline.errors import InputError, NoResultError
from pipeline.ingest import IngestConfig, QualityReport, load_prices_with_report
from pipeline.models import FAMILIES, PRESETS, applicable_types, check_model_config, dropout_effective
from pipeline.stability import INSTABILITY, check_objective_config
from pipeline.sweep import SweepConfig
from pipeline.train import check_train_config
from pipeline.tune import TuneConfig, default_study_name, run_label
from pipeline.windows import Windows, make_windows

HELP = {
    "ticker": "ticker: ^GSPC and MSFT are shipped in data/; others are downloaded with yfinance and cached",
    "csv": "read prices from this CSV file instead of a ticker",
    "price_column": "the close to use: Close, or Adj Close (then Open/High/Low are adjusted by the same factor)",
    "window": "days of history per sample",
    "train_frac": "fraction of rows in the train part (chronological)",
    "val_frac": "fraction of rows in the validation part; the test part is the rest",
    "model": f"model family: {', '.join(FAMILIES)}",
    "hidden_size": "hidden units (recurrent) or channels (cnn)",
    "num_layers": "stacked recurrent layers, or conv blocks for cnn",
    "kernel_size": "cnn kernel size",
    "dropout_type": "dropout type (see `python -m pipeline types`)",
    "dropout_rate": "dropout rate p in [0, 1)",
    "as_written": "build dropout type builtin with one layer as written (PyTorch then applies no dropout)",
    "max_epochs": "maximum epochs per seed",
    "batch_size": "mini-batch size",
    "lr": "Adam learning rate",
    "patience": "early stopping: epochs without validation improvement",
    "seeds": "seeds per config",
    "seed": "first seed",
    "threads": "torch threads per process",
    "penalty": "λ in objective = mean + λ·std of validation losses",
    "last_k": "epochs per seed entering the objective",
    "instability": f"the objective's instability term: {', '.join(INSTABILITY)}",
    "n_trials": "Optuna trials to run",
    "study_name": "Optuna study name; an existing name resumes that study",
    "storage": "Optuna storage URL (default: sqlite:///optuna.db here)",
    "max_rate": "upper bound of the sampled dropout rate",
    "config": "a saved config: YAML path or runs:/<run_id>/best_config.yaml",
    "types": "comma-separated dropout types to sweep (default: every type the family takes)",
    "rates": "comma-separated dropout rates to sweep",
    "workers": "processes training grid points in parallel (one torch thread each)",
    "preset": f"a named example config: {', '.join(PRESETS)} (applied after --config, before other options)",
}
TUNE_OPTIONS = [*SECTIONS.values(), TuneConfig]
NOT_TUNED = ("dropout_type", "dropout_rate", "as_written")  # what a study or sweep chooses itself


def sweep_fields() -> list[dataclasses.Field]:
    """The sweep's options: the run's, less what the grid sets (its `seeds` replaces the train one)."""
    return option_fields(SECTIONS.values(), skip=(*NOT_TUNED, "seeds")) + option_fields([SweepConfig])


class Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def option_fields(kinds: Iterable[type], skip: Iterable[str] = ()) -> list[dataclasses.Field]:
    return [f for kind in kinds for f in dataclasses.fields(kind) if f.name not in set(skip)]


def add_options(parser: argparse.ArgumentParser, fields: list[dataclasses.Field]) -> None:
    """One `--name` per dataclass field. Unset (or empty) means the dataclass default."""
    for f in fields:
        flags = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            flags.append(f"--{f.name}")  # `mlflow run -P dropout_type=...` appends --dropout_type
        parser.add_argument(
            *flags,
            dest=f.name,
            metavar=type(f.default).__name__.upper(),
            help=f"{HELP[f.name]} (default: {f.default!r})",
        )


def given(args: argparse.Namespace, fields: list[dataclasses.Field]) -> dict[str, Any]:
    """The options the user set, converted to their fields' types."""
    values = {}
    for f in fields:
        raw = getattr(args, f.name)
        if raw is not None and raw != "":
            values[f.name] = coerce(raw, f.default, f.name, source=f"--{f.name.replace('_', '-')}")
    return values


def build_parser() -> Parser:
    parser = Parser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    ingest = commands.add_parser("ingest", help="read, validate and clean a price series; print a summary")
    add_options(ingest, option_fields([IngestConfig]))
    ingest.set_defaults(handler=cmd_ingest)

    tune = commands.add_parser("tune", help="Optuna study over dropout type and rate (the main job)")
    add_options(tune, option_fields(TUNE_OPTIONS, skip=NOT_TUNED))
    tune.set_defaults(handler=cmd_tune)

    train = commands.add_parser("train", help="train one config with all its seeds and log the model")
    train.add_argument("--config", default="", help=HELP["config"])
    train.add_argument("--preset", default="", choices=["", *PRESETS], metavar="NAME", help=HELP["preset"])
    add_options(train, option_fields(SECTIONS.values()))
    train.set_defaults(handler=cmd_train)

    sweep = commands.add_parser("sweep", help="grid of dropout types × rates, many seeds, then the report")
    add_options(sweep, sweep_fields())
    sweep.set_defaults(handler=cmd_sweep)

    report = commands.add_parser("report", help="the HTML report of a sweep or study parent run")
    report.add_argument("--run-id", "--run_id", dest="run_id", required=True, help="the sweep's or study's parent run")
    report.add_argument("--out", default="", help="output folder (default: reports/<run id>)")
    report.set_defaults(handler=cmd_report)

    types = commands.add_parser("types", help="list each model family's dropout types")
    types.set_defaults(handler=cmd_types)
    return parser


def load_data(cfg: RunConfig) -> tuple[Windows, QualityReport]:
    """Prices -> windows, with the data-quality record: every input error surfaces before MLflow starts."""
    prices, quality = load_prices_with_report(cfg.ingest)
    return make_windows(prices, cfg.window), quality


def prepare(cfg: RunConfig) -> tuple[Windows, QualityReport]:
    check_model_config(cfg.model)
    check_budget(cfg)
    return load_data(cfg)


def check_budget(cfg: RunConfig) -> None:
    check_train_config(cfg.train)
    check_objective_config(cfg.objective)


def split_options(options: dict[str, Any], kind: type) -> tuple[Any, RunConfig]:
    """A command's options -> its own config (`kind`) and the run config made of the rest."""
    own = {f.name for f in dataclasses.fields(kind)}
    return (
        kind(**{k: v for k, v in options.items() if k in own}),
        RunConfig().with_options({k: v for k, v in options.items() if k not in own}),
    )


def cmd_ingest(args: argparse.Namespace) -> int:
    cfg = IngestConfig(**given(args, option_fields([IngestConfig])))
    _, report = load_prices_with_report(cfg)
    print(report.summary())
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from pipeline.report import build_report
    from pipeline.tracking import configure_tracking, log_params_once, tracked_run
    from pipeline.tune import open_study, tune

    tune_cfg, cfg = split_options(given(args, option_fields(TUNE_OPTIONS, skip=NOT_TUNED)), TuneConfig)
    if tune_cfg.n_trials < 1:
        raise InputError(f"n_trials must be at least 1, got {tune_cfg.n_trials}")
    data, quality = prepare(cfg)
    tune_cfg = dataclasses.replace(tune_cfg, study_name=tune_cfg.study_name or default_study_name(cfg))
    study = open_study(tune_cfg, cfg)
    uri = configure_tracking()
    with tracked_run(tune_cfg.study_name) as parent:
        log_params_once(quality.as_params())
        result = tune(tune_cfg, cfg, data, study)
        report = build_report(parent.info.run_id, Path("reports") / tune_cfg.study_name)[0]
    best, final = result.best_cfg.model, result.final
    summary = final.summary
    print(
        f"\nbest: {run_label(best)} (trial {result.study.best_trial.number} of study {tune_cfg.study_name!r})\n"
        f"  objective {summary['objective']:.4f} = val mean {summary['val_loss_mean']:.4f} "
        f"+ {cfg.objective.penalty:g} · val std {summary['val_loss_std']:.4f} (retrained)\n"
        f"  test MSE {final.test_loss:.4f} vs naive zero-return {final.naive_test_loss:.4f} "
        f"(skill {final.test_skill:+.2%}){'' if final.test_skill > 0 else ': does NOT beat the naive forecast'}\n"
        f"  parent run {parent.info.run_id}; model {result.model_uri}\n"
        f"  report: {report.resolve()} (also on the parent run)\n"
        f"  compare trials: mlflow ui --backend-store-uri {uri}\n"
        f"  reuse: mlflow run . -e train -P config=runs:/{parent.info.run_id}/best_config.yaml --env-manager local"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.final import fit_and_log
    from pipeline.tracking import EpochLogger, configure_tracking, log_params_once, read_config, tracked_run
    from pipeline.train import epoch_metrics

    fields = option_fields(SECTIONS.values())
    uri = configure_tracking()
    base = read_config(args.config) if args.config else RunConfig()
    cfg = base.with_options({**PRESETS.get(args.preset, {}), **given(args, fields)})
    data, quality = prepare(cfg)
    tags = {
        "config_source": args.config or "options",
        "preset": args.preset or "none",
        "dropout_effective": str(dropout_effective(cfg.model)).lower(),
    }
    if cfg.model.dropout_type != "none" and not dropout_effective(cfg.model):
        print(
            f"warning: this config ({run_label(cfg.model)}) applies no dropout: PyTorch's RNN dropout acts "
            "only between stacked layers; its run is tagged dropout_effective=false",
            file=sys.stderr,
        )
    with tracked_run(run_label(cfg.model), tags=tags) as run:
        log_params_once({**cfg.flat(), **quality.as_params()})
        curves = EpochLogger(run.info.run_id)
        try:
            result, model_uri = fit_and_log(
                cfg, data, "config.yaml", on_epoch=lambda epoch, stats: curves.log(epoch_metrics(stats), epoch)
            )
        finally:
            curves.flush()
    print(
        f"{run_label(cfg.model)}: objective {result.summary['objective']:.4f}, "
        f"test MSE {result.test_loss:.4f} vs naive {result.naive_test_loss:.4f} "
        f"(skill {result.test_skill:+.2%})\n  run {run.info.run_id}; model {model_uri}\n"
        f"  open: mlflow ui --backend-store-uri {uri}"
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.report import build_report
    from pipeline.sweep import families, grid, run_sweep
    from pipeline.tracking import configure_tracking, log_params_once, tracked_run

    sweep_cfg, cfg = split_options(given(args, sweep_fields()), SweepConfig)
    points = grid(sweep_cfg, cfg.model)  # refuses unknown families, types and rates before anything runs
    check_budget(cfg)
    data, quality = load_data(cfg)
    uri = configure_tracking()
    name = f"sweep-{'-'.join(families(cfg.model.model))}-{datetime.now():%Y%m%d-%H%M%S}"
    print(f"{name}: {len(points)} configs × {sweep_cfg.seeds} seeds, {sweep_cfg.workers} workers", file=sys.stderr)
    with tracked_run(name) as parent:
        log_params_once(quality.as_params())
        run_sweep(sweep_cfg, cfg, data)
        report = build_report(parent.info.run_id, Path("reports") / name)[0]
    print(
        f"report: {report.resolve()}\n  parent run {parent.info.run_id}\n"
        f"  compare configs: mlflow ui --backend-store-uri {uri}"
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import build_report
    from pipeline.tracking import configure_tracking

    configure_tracking()
    files = build_report(args.run_id, Path(args.out or Path("reports") / args.run_id))
    print(f"report: {files[0].resolve()} ({len(files) - 1} figures; logged to run {args.run_id} under report/)")
    return 0


def cmd_types(args: argparse.Namespace) -> int:
    for family in FAMILIES:
        one, two = applicable_types(family, 1), applicable_types(family, 2)
        extra = [f"{t} (num_layers >= 2)" for t in two if t not in one]
        print(f"{family}: {', '.join([*one, *extra])}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        return args.handler(args)
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except NoResultError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
