"""Stage 6 — tune: an Optuna study over dropout type and rate, every trial a nested MLflow run.

In:  a `TuneConfig`, the fixed `RunConfig` (data, windows, model size, training, objective) and its
     `Windows`.
Out: the finished study, and in MLflow one parent run per study (the project's run under `mlflow run`)
     with one child run per trial (params, per-epoch curves with step = epoch, the objective and its
     parts, the trial's state), then the best config retrained, tested and logged on the parent
     (`best_config.yaml` and the model).

Search space: `dropout_type` over the family's applicable types; `dropout_rate` uniform in
[0, max_rate], sampled only when the type is not `none`. TPE sampler; median pruning on the mean
validation loss across seeds after each epoch. A trial whose loss diverges ends FAIL with its reason
and the study goes on. Models never see Optuna: the objective samples plain values and calls `train`.

Scale-out: point several processes at one `--storage` (any Optuna RDB URL) and `--study-name`; create
the study once first (`optuna create-study`, or one process started before the others).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import mlflow
import optuna

from pipeline.config import RunConfig
from pipeline.errors import InputError, NoResultError
from pipeline.final import FinalResult, fit_and_log
from pipeline.models import ModelConfig, applicable_types, dropout_effective
from pipeline.stability import summarize
from pipeline.tracking import EpochLogger, log_params_once
from pipeline.train import DivergedError, EpochStats, epoch_metrics, train_seeds
from pipeline.windows import Windows

TUNED = ("dropout_type", "dropout_rate")  # what the study samples; everything else is fixed


@dataclass
class TuneConfig:
    """The study."""

    n_trials: int = 10
    study_name: str = ""  # empty: a new study "<model>-<ticker>-<time>"; an existing name resumes it
    storage: str = ""  # Optuna storage URL; empty: sqlite:///optuna.db in the working directory
    max_rate: float = 0.6  # upper bound of the sampled dropout rate


@dataclass
class TuneResult:
    study: optuna.Study
    best_cfg: RunConfig
    final: FinalResult
    model_uri: str


def run_label(model: ModelConfig, trial: int | None = None) -> str:
    """A readable run name, e.g. 'lstm · variational · p=0.25 · trial 7'."""
    parts = [model.model, model.dropout_type]
    if model.dropout_type != "none":
        parts.append(f"p={model.dropout_rate:.2f}")
        if not dropout_effective(model):
            parts.append("no effective dropout")
    if trial is not None:
        parts.append(f"trial {trial}")
    return " · ".join(parts)


def default_study_name(cfg: RunConfig) -> str:
    ticker = Path(cfg.ingest.csv).stem if cfg.ingest.csv else cfg.ingest.ticker.lstrip("^")
    return f"{cfg.model.model}-{ticker}-{datetime.now():%Y%m%d-%H%M%S}"


def fixed_options(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.flat().items() if k not in TUNED}


def storage_url(tune_cfg: TuneConfig) -> str:
    return tune_cfg.storage or f"sqlite:///{Path.cwd() / 'optuna.db'}"


def open_study(tune_cfg: TuneConfig, cfg: RunConfig) -> optuna.Study:
    """Create the study, or load it by name; refuse to resume a study run with other fixed options."""
    storage = storage_url(tune_cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # we print our own progress lines
    try:
        study = optuna.create_study(
            study_name=tune_cfg.study_name,
            storage=storage,
            direction="minimize",
            sampler=optuna.samplers.TPESampler(n_startup_trials=4),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
            load_if_exists=True,
        )
    except (ValueError, ImportError, optuna.exceptions.StorageInternalError) as exc:
        raise InputError(f"cannot open Optuna storage {storage!r}: {str(exc).splitlines()[0]}") from None
    fixed = {k: str(v) for k, v in fixed_options(cfg).items()}
    stored = study.user_attrs.get("fixed_options")
    if stored is None:
        study.set_user_attr("fixed_options", fixed)
    elif stored != fixed:
        changed = ", ".join(f"{k}: {stored.get(k)} -> {v}" for k, v in fixed.items() if stored.get(k) != v)
        raise InputError(
            f"study {tune_cfg.study_name!r} was run with other options ({changed}); "
            "use another --study-name or the same options"
        )
    return study


def sample_model(trial: optuna.Trial, base: ModelConfig, max_rate: float) -> ModelConfig:
    """The trial's model config: the fixed one with a sampled dropout type and rate."""
    kind = trial.suggest_categorical("dropout_type", list(applicable_types(base.model, base.num_layers)))
    rate = trial.suggest_float("dropout_rate", 0.0, max_rate) if kind != "none" else 0.0
    return dataclasses.replace(base, dropout_type=kind, dropout_rate=rate)


class Progress:
    """Terminal progress: an updating epoch line on a TTY, one line per trial everywhere."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.tty = sys.stderr.isatty()

    def epoch(self, label: str, epoch: int, max_epochs: int, val_loss: float) -> None:
        if self.tty:
            print(f"\r  {label}: epoch {epoch}/{max_epochs} val {val_loss:.4f}   ", end="", file=sys.stderr)

    def trial(self, number: int, label: str, outcome: str, seconds: float) -> None:
        prefix = "\r" if self.tty else ""
        print(f"{prefix}[{number + 1}/{self.total}]  {label}: {outcome}  ({seconds:.1f}s)", file=sys.stderr)


def make_objective(cfg: RunConfig, tune_cfg: TuneConfig, data: Windows, parent_id: str, progress: Progress):
    """The Optuna objective: sample, train all seeds in one nested MLflow run, return the objective."""

    def objective(trial: optuna.Trial) -> float:
        model_cfg = sample_model(trial, cfg.model, tune_cfg.max_rate)
        trial_cfg = dataclasses.replace(cfg, model=model_cfg)
        label = run_label(model_cfg, trial.number)
        started = time.perf_counter()
        # parent_run_id explicitly: MLflow's active-run stack is per thread.
        child = mlflow.start_run(run_name=label, nested=True, parent_run_id=parent_id)
        curves = EpochLogger(child.info.run_id)
        mlflow.log_params({**trial_cfg.flat(), "trial_number": trial.number})
        mlflow.set_tags(
            {
                "optuna.study_name": trial.study.study_name,
                "optuna.trial_number": str(trial.number),
                "dropout_effective": str(dropout_effective(model_cfg)).lower(),
            }
        )
        state, status, outcome = "FAIL", "FAILED", "failed"

        def on_epoch(epoch: int, stats: list[EpochStats]) -> None:
            metrics = epoch_metrics(stats)
            curves.log(metrics, step=epoch)
            progress.epoch(label, epoch, cfg.train.max_epochs, metrics["val_loss"])
            trial.report(metrics["val_loss"], epoch)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}: mean val loss {metrics['val_loss']:.4f}")

        try:
            runs = train_seeds(model_cfg, cfg.train, data, on_epoch)
            summary = summarize(runs, cfg.objective, data.naive_loss("val"))
            mlflow.log_metrics(summary)
            state, status = "COMPLETE", "FINISHED"
            outcome = (
                f"objective {summary['objective']:.4f} (mean {summary['val_loss_mean']:.4f} "
                f"+ {cfg.objective.penalty:g}·std {summary['val_loss_std']:.4f})"
            )
            return summary["objective"]
        except optuna.TrialPruned as exc:
            state, status, outcome = "PRUNED", "FINISHED", str(exc)
            raise
        except DivergedError as exc:
            outcome = f"failed: {exc}"
            mlflow.set_tag("fail_reason", str(exc))
            trial.set_user_attr("fail_reason", str(exc))
            raise
        finally:
            curves.flush()
            mlflow.set_tag("trial_state", state)
            mlflow.end_run(status)
            progress.trial(trial.number, label, outcome, time.perf_counter() - started)

    return objective


def tune(tune_cfg: TuneConfig, cfg: RunConfig, data: Windows, study: optuna.Study) -> TuneResult:
    """Run the study inside the active (parent) MLflow run, then retrain and log the best config."""
    parent = mlflow.active_run()
    log_params_once({**fixed_options(cfg), "n_trials": tune_cfg.n_trials, "max_rate": tune_cfg.max_rate})
    mlflow.set_tags(
        {
            "pipeline.kind": "study",
            "optuna.study_name": study.study_name,
            "optuna.storage": storage_url(tune_cfg),
            "types": ",".join(applicable_types(cfg.model.model, cfg.model.num_layers)),
        }
    )
    objective = make_objective(cfg, tune_cfg, data, parent.info.run_id, Progress(tune_cfg.n_trials))
    study.optimize(objective, n_trials=tune_cfg.n_trials, catch=(DivergedError,))

    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        counts = {s.name.lower(): sum(t.state == s for t in study.trials) for s in optuna.trial.TrialState}
        raise NoResultError(
            f"no trial completed in study {study.study_name!r} "
            f"({counts['pruned']} pruned, {counts['fail']} failed); nothing to retrain or register"
        )
    best = study.best_trial
    best_cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, **{k: best.params.get(k, 0.0) for k in TUNED})
    )
    mlflow.log_metrics({"best_trial_objective": best.value, "best_trial_number": best.number})
    final, model_uri = fit_and_log(
        best_cfg,
        data,
        "best_config.yaml",
        study_name=study.study_name,
        best_trial=best.number,
        best_trial_objective=best.value,
    )
    return TuneResult(study, best_cfg, final, model_uri)
