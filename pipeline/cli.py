"""Command line: `python -m pipeline {ingest,tune,train,types}`. It only parses and calls the stages.

Options are generated from the stage dataclasses, so their defaults cannot drift from the code's; the
MLproject passes the same names (a test checks both). A user error prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import warnings
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from pipeline.config import SECTIONS, RunConfig, coerce
from pipeline.errors import InputError, NoResultError
from pipeline.ingest import IngestConfig, Series, load_series, store_csv
from pipeline.models import FAMILIES, PRESETS, applicable_types, check_model_config, dropout_effective
from pipeline.stability import INSTABILITY, check_objective_config
from pipeline.sweep import SweepConfig
from pipeline.train import check_train_config
from pipeline.tune import TuneConfig, default_study_name, run_label
from pipeline.windows import Windows, make_windows

if TYPE_CHECKING:
    from mlflow.entities import Run

HELP = {
    "ticker": "ticker: ^GSPC and MSFT are shipped in data/; others are downloaded with yfinance and cached",
    "tickers": "comma-separated tickers pooled for training (windows never cross tickers; one scaler each)",
    "csv": "read prices from this CSV file instead of a ticker; `ingest` also stores it in data/cache/ "
    "as --ticker NAME (default: the file's stem)",
    "price_column": "the close to use: Close, or Adj Close (then Open/High/Low are adjusted by the same factor)",
    "window": "days of history per sample",
    "train_frac": "fraction of rows in the train part (chronological)",
    "val_frac": "fraction of rows in the validation part; the test part is the rest",
    "embargo": "windows of rows left out between train, val and test (at least 1)",
    "folds": "walk-forward validation: k >= 2 expanding folds over train+val scored by the objective; 0: one split",
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
    "n_trials": "Optuna trials to run (per worker process)",
    "study_name": "Optuna study name; an existing name resumes that study",
    "storage": "Optuna storage URL (default: sqlite:///optuna.db here)",
    "max_rate": "upper bound of the sampled dropout rate",
    "config": "a saved config: YAML path, runs:/<run_id>/best_config.yaml, or an Optuna study name (its best trial)",
    "warm_start": "comma-separated earlier configs (YAML, runs:/ URI or study name) to try first in a new study",
    "types": "comma-separated dropout types to sweep (default: every type the family takes)",
    "rates": "comma-separated dropout rates to sweep",
    "workers": "processes in parallel, one torch thread each: grid points (sweep), or trials sharing the study (tune)",
    "join": "true: only run trials of an existing study under its parent run (a worker on another machine)",
    "preset": f"a named example config: {', '.join(PRESETS)} (applied after --config, before other options)",
    "model_uri": "the forecaster: models:/dropout-rnn@champion, models:/dropout-rnn/3, runs:/<run_id>/forecaster",
    "prices_csv": "recent daily prices (any layout ingest reads), at least the model's window + 1 rows",
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
    train.add_argument("--storage", default="", help=f"{HELP['storage']}: where --config looks up a study name")
    train.add_argument("--force", default="false", metavar="BOOL", help="retrain even if an earlier run matches")
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

    predict = commands.add_parser("predict", help="next-day forecast of a logged forecaster from a price CSV")
    predict.add_argument("--model", dest="model_uri", required=True, metavar="URI", help=HELP["model_uri"])
    predict.add_argument("--csv", required=True, metavar="PATH", help=HELP["prices_csv"])
    predict.set_defaults(handler=cmd_predict)

    types = commands.add_parser("types", help="list each model family's dropout types")
    types.set_defaults(handler=cmd_types)
    return parser


def load_data(cfg: RunConfig) -> tuple[Windows, list[Series]]:
    """Prices -> windows, with the series (and their quality records): every input error surfaces before
    MLflow starts. Several tickers are pooled by name; one series keeps the plain single-series messages."""
    series = load_series(cfg.ingest)
    prices = {one.name: one.frame for one in series} if len(series) > 1 else series[0].frame
    return make_windows(prices, cfg.window), series


def prepare(cfg: RunConfig) -> tuple[Windows, list[Series]]:
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


def ui_command(uri: str) -> str:
    """How to see the runs: a tracking server is opened in a browser; a local store through `mlflow ui`."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri {uri}"


def cmd_ingest(args: argparse.Namespace) -> int:
    """Validate a series and print its summary line. With --csv, also store it in the cache.

    The stored series is named by --ticker when given, else by the file's stem made safe (letters, digits
    and ^ = . _ - kept); `--ticker NAME` then loads it from the cache, never from yfinance.
    """
    options = given(args, option_fields([IngestConfig]))
    cfg = IngestConfig(**options)
    if not cfg.csv:
        for one in load_series(cfg):
            print(one.report.summary())
        return 0
    report, path = store_csv(cfg, name=options.get("ticker", ""))
    print(f"{report.summary()}; stored as {path.stem} in {path} (load it with --ticker {path.stem})")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from pipeline.report import build_report
    from pipeline.serve import registry_lines
    from pipeline.tracking import configure_tracking, log_data, tracked_run
    from pipeline.tune import check_tune_config, enqueue, join, open_study, tune, warm_start_trials

    tune_cfg, cfg = split_options(given(args, option_fields(TUNE_OPTIONS, skip=NOT_TUNED)), TuneConfig)
    check_tune_config(tune_cfg)
    if tune_cfg.join and os.environ.get("MLFLOW_RUN_ID"):
        raise InputError("--join adds trials to a study's parent run: use `python -m pipeline tune`, not `mlflow run`")
    data, series = prepare(cfg)
    tune_cfg = dataclasses.replace(tune_cfg, study_name=tune_cfg.study_name or default_study_name(cfg))
    warm = warm_start_trials(tune_cfg, cfg)
    study = open_study(tune_cfg, cfg)
    enqueue(study, warm)
    uri = configure_tracking()
    if tune_cfg.join:
        parent_id = join(tune_cfg, cfg, data, study)
        print(
            f"joined study {tune_cfg.study_name!r}: ran {tune_cfg.workers} × {tune_cfg.n_trials} trial(s) under "
            f"parent run {parent_id}; the study's main process writes the table and retrains the best\n"
            f"  compare trials: {ui_command(uri)}"
        )
        return 0
    with tracked_run(tune_cfg.study_name) as parent:
        log_data(series)
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
        f"{registry_lines(final.registration, result.model_uri)}\n"
        f"  report: {report.resolve()} (also on the parent run)\n"
        f"  compare trials: {ui_command(uri)}\n"
        f"  reuse: mlflow run . -e train -P config=runs:/{parent.info.run_id}/best_config.yaml --env-manager local"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from pipeline.final import fit_and_log
    from pipeline.serve import registry_lines
    from pipeline.tracking import (
        EpochLogger,
        configure_tracking,
        data_digest,
        git_tags,
        log_data,
        log_params_once,
        reusable_run,
        tracked_run,
    )
    from pipeline.train import epoch_metrics
    from pipeline.tune import read_any_config

    fields = option_fields(SECTIONS.values())
    uri = configure_tracking()
    base = read_any_config(args.config, args.storage) if args.config else RunConfig()
    cfg = base.with_options({**PRESETS.get(args.preset, {}), **given(args, fields)})
    data, series = prepare(cfg)
    if not coerce(args.force, False, "force", "--force"):
        earlier, why_not = reusable_run({**cfg.flat(), "data_digest": data_digest(series)}, git_tags())
        if earlier is not None:
            return reuse(earlier)
        if why_not:
            print(f"note: {why_not} (--force true skips this check)", file=sys.stderr)
    tags = {
        "pipeline.kind": "train",
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
        log_params_once(cfg.flat())
        log_data(series)
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
        f"{registry_lines(result.registration, model_uri)}\n"
        f"  open: {ui_command(uri)}"
    )
    return 0


def reuse(earlier: Run) -> int:
    """Report the earlier run that made this stage's result; under `mlflow run`, point the project's run at it."""
    from pipeline.tracking import tracked_run

    run_id = earlier.info.run_id
    if os.environ.get("MLFLOW_RUN_ID"):
        with tracked_run(earlier.info.run_name, tags={"reused_run_id": run_id, "pipeline.kind": "train-reused"}):
            pass
    print(
        f"reusing run {run_id} ({earlier.info.run_name}): same config, data and commit, nothing retrained "
        f"(--force true retrains)\n  forecaster runs:/{run_id}/forecaster"
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pipeline.report import build_report
    from pipeline.sweep import check_sweep, families, grid, run_sweep
    from pipeline.tracking import configure_tracking, log_data, tracked_run

    sweep_cfg, cfg = split_options(given(args, sweep_fields()), SweepConfig)
    points = grid(sweep_cfg, cfg.model)  # refuses unknown families, types and rates before anything runs
    check_sweep(sweep_cfg, cfg)
    check_budget(cfg)
    data, series = load_data(cfg)
    uri = configure_tracking()
    name = f"sweep-{'-'.join(families(cfg.model.model))}-{datetime.now():%Y%m%d-%H%M%S}"
    print(f"{name}: {len(points)} configs × {sweep_cfg.seeds} seeds, {sweep_cfg.workers} workers", file=sys.stderr)
    with tracked_run(name) as parent:
        log_data(series)
        run_sweep(sweep_cfg, cfg, data)
        report = build_report(parent.info.run_id, Path("reports") / name)[0]
    print(f"report: {report.resolve()}\n  parent run {parent.info.run_id}\n  compare configs: {ui_command(uri)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from pipeline.report import build_report
    from pipeline.tracking import configure_tracking

    out = Path(args.out or Path("reports") / args.run_id)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder")
    configure_tracking()
    files = build_report(args.run_id, out)
    print(f"report: {files[0].resolve()} ({len(files) - 1} figures; logged to run {args.run_id} under report/)")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from pipeline.serve import forecast_line, load_forecaster, predict_frame, read_input_csv
    from pipeline.tracking import configure_tracking

    frame = read_input_csv(Path(args.csv))  # a bad file fails before MLflow is touched
    configure_tracking()
    model = load_forecaster(args.model_uri)
    row = predict_frame(model, frame, args.csv).iloc[0]
    print(forecast_line(row, model.unwrap_python_model().settings.price_column))
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
    except KeyboardInterrupt:  # runs are ended KILLED and trials FAIL on the way out
        print("interrupted", file=sys.stderr)
        return 130
