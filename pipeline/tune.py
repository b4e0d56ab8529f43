"""Stage 6 — tune: an Optuna study over dropout type and rate, every trial a nested MLflow run.

In:  a `TuneConfig`, the fixed `RunConfig` (data, windows, model size, training, objective) and its
     `Windows`.
Out: the finished study, and in MLflow one parent run per study (the project's run under `mlflow run`)
     with one child run per trial (params, per-epoch curves with step = epoch, the objective and its
     parts, the trial's state), then on the parent: `trials.csv` and `trials.png` (every trial of the
     study), and the best config retrained, tested and logged (`best_config.yaml` and the model).

Search space: `dropout_type` over the family's applicable types; `dropout_rate` uniform in
[0, max_rate], sampled only when the type is not `none`. TPE sampler; median pruning on the mean
validation loss across seeds after each epoch. A trial whose loss diverges ends FAIL with its reason
and the study goes on. Models never see Optuna: the objective samples plain values and calls `train`.

Scale-out (docs/scale-out.md): the study lives in an Optuna RDB storage, created once by the main
process before any worker starts (several processes creating a fresh SQLite schema at once race).
`workers` > 1 runs that many spawned processes, each `study.optimize` with `n_trials` on the shared
storage, every trial's run nested under the one parent by explicit `parent_run_id` (MLflow's active-run
stack is per thread and per process); the main process waits, then writes the table and retrains the
best once. The parent's id is a study user attribute, so `join` processes on other machines (same
storage, same tracking server) add trials under the same parent and do nothing else. Storage heartbeats
fail a trial whose worker died, and its run is ended FAILED, so nothing is left RUNNING.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from multiprocessing import current_process, get_context
from pathlib import Path
from typing import Any

import mlflow
import optuna
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from sqlalchemy.exc import SQLAlchemyError

from pipeline.config import RunConfig, coerce
from pipeline.errors import InputError, NoResultError
from pipeline.final import FinalResult, fit_and_log
from pipeline.ingest import ticker_names
from pipeline.models import ModelConfig, applicable_types, dropout_effective
from pipeline.stability import summarize
from pipeline.tracking import EpochLogger, log_params_once, provenance_of, read_config
from pipeline.train import DivergedError, EpochStats, epoch_metrics, train_validation
from pipeline.trials import log_trials
from pipeline.windows import Windows

TUNED = ("dropout_type", "dropout_rate")  # what the study samples; everything else is fixed
PARENT_ATTR = "mlflow_parent_run_id"  # study user attribute: the run every trial's run nests under
TRACKING_ATTR = "mlflow_tracking_uri"  # study user attribute: where that run lives
HEARTBEAT_S = 60  # a running trial writes a heartbeat to the storage this often


@dataclass
class TuneConfig:
    """The study."""

    n_trials: int = 10  # per worker process: `workers` processes run workers × n_trials trials
    study_name: str = ""  # empty: a new study "<model>-<ticker>-<time>"; an existing name resumes it
    storage: str = ""  # Optuna storage URL; empty: sqlite:///optuna.db in the working directory
    max_rate: float = 0.6  # upper bound of the sampled dropout rate
    workers: int = 1  # processes running trials at once on the shared storage (one torch thread each)
    join: bool = False  # only run trials of an existing study, under its parent run (a worker elsewhere)
    warm_start: str = ""  # comma-separated earlier configs (YAML, runs:/ URI or study name) tried first


def check_tune_config(cfg: TuneConfig) -> None:
    """Refuse a study that could not run, before any study or run is created."""
    if cfg.n_trials < 1:
        raise InputError(f"n_trials must be at least 1, got {cfg.n_trials}")
    if cfg.workers < 1:
        raise InputError(f"workers must be at least 1, got {cfg.workers}")
    if not 0 < cfg.max_rate < 1:
        raise InputError(f"max_rate must be in (0, 1), got {cfg.max_rate}")
    if cfg.join and not cfg.study_name:
        raise InputError("--join needs the --study-name (and --storage) of the study to join")


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
    """'<model>-<data>-<time>', the data being the CSV's stem, the ticker, or the pooled tickers joined by +."""
    tickers = "+".join(ticker_names(cfg.ingest)) or cfg.ingest.ticker
    ticker = Path(cfg.ingest.csv).stem if cfg.ingest.csv else tickers.replace("^", "")
    return f"{cfg.model.model}-{ticker}-{datetime.now():%Y%m%d-%H%M%S}"


def fixed_options(cfg: RunConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.flat().items() if k not in TUNED}


def storage_url(tune_cfg: TuneConfig) -> str:
    return tune_cfg.storage or f"sqlite:///{Path.cwd() / 'optuna.db'}"


LOST = "its worker process stopped sending heartbeats (killed or lost)"
INTERRUPTED = "interrupted (Ctrl-C or SIGINT)"


def end_lost_trial_run(study: optuna.Study, trial: optuna.trial.FrozenTrial, reason: str = LOST) -> None:
    """End the run of a trial whose process died FAILED, saying why. Also the storage's callback for a
    trial failed for lack of heartbeats."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if run_id:
        client = MlflowClient()
        client.set_tag(run_id, "trial_state", "FAIL")
        client.set_tag(run_id, "fail_reason", reason)
        client.set_terminated(run_id, "FAILED")


def fail_trials_of(study: optuna.Study, worker: str, reason: str) -> None:
    """FAIL the RUNNING trials of a dead worker (`host:pid`, the trial's `worker` attribute) and end their
    runs FAILED, at once rather than after the heartbeat's grace period."""
    lost = [
        t
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        if t.user_attrs.get("worker") == worker
    ]
    for trial in lost:
        optuna.trial.Trial(study, trial._trial_id).set_user_attr("fail_reason", reason)
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        end_lost_trial_run(study, trial, reason)


def make_storage(url: str, heartbeat: int = HEARTBEAT_S) -> optuna.storages.RDBStorage:
    """The study's storage, with heartbeats: a trial silent for 2 × `heartbeat` seconds is failed (and its
    run ended) by the next process that starts a trial, or by the main process before it writes the table.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=heartbeat, heartbeat_stale_trial_callback=end_lost_trial_run
        )


def load_study(tune_cfg: TuneConfig, create: bool = True, seed: int | None = None) -> optuna.Study:
    """The study by name, with our sampler and pruner (every process builds its own: they are not stored).

    `create`: make it if missing; otherwise a missing study is refused (and no SQLite file is made).
    `seed`: the sampler's, so that the same study run again proposes the same trials (None: unseeded).
    """
    storage = storage_url(tune_cfg)
    if not create and storage.startswith("sqlite:///") and not Path(storage.removeprefix("sqlite:///")).is_file():
        raise InputError(f"no study {tune_cfg.study_name!r}: there is no Optuna storage {storage}")
    # We print our own progress lines, with the reason of each failed trial; Optuna would add a traceback.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    options = {
        "study_name": tune_cfg.study_name,
        "sampler": optuna.samplers.TPESampler(n_startup_trials=4, seed=seed),
        "pruner": optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2),
    }
    try:
        if create:
            return optuna.create_study(
                storage=make_storage(storage), direction="minimize", load_if_exists=True, **options
            )
        return optuna.load_study(storage=make_storage(storage), **options)
    except KeyError:
        raise InputError(
            f"no study {tune_cfg.study_name!r} in {storage} "
            f"(list its studies with `optuna studies --storage {storage}`)"
        ) from None
    except (ValueError, ImportError, SQLAlchemyError, optuna.exceptions.StorageInternalError) as exc:
        raise InputError(f"cannot open Optuna storage {storage!r}: {str(exc).splitlines()[0]}") from None


def open_study(tune_cfg: TuneConfig, cfg: RunConfig) -> optuna.Study:
    """Create the study, or load it by name (only load it to join); refuse a study run with other fixed
    options. The sampler is seeded with the train seed: a study (one process) is reproducible; a joining
    worker, on another machine, is not seeded."""
    study = load_study(tune_cfg, create=not tune_cfg.join, seed=None if tune_cfg.join else cfg.train.seed)
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


def study_config(study_name: str, storage: str = "") -> RunConfig:
    """The config of a stored study's best trial: the study's fixed options and the trial's dropout type and
    rate. InputError for a missing study, one not made by this pipeline, or one with no completed trial."""
    url = storage or storage_url(TuneConfig())
    study = load_study(TuneConfig(study_name=study_name, storage=url), create=False)
    fixed = study.user_attrs.get("fixed_options")
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if fixed is None or not completed:
        why = "was not made by this pipeline" if fixed is None else "has no completed trial"
        raise InputError(f"study {study_name!r} in {url} {why}: no best config to read")
    best = study.best_trial
    options = {**fixed, "dropout_type": best.params["dropout_type"], "dropout_rate": best.params.get("dropout_rate", 0)}
    defaults = RunConfig().flat()
    source = f"study {study_name!r}"
    return RunConfig().with_options({k: coerce(v, defaults[k], k, source) for k, v in options.items() if k in defaults})


def read_any_config(spec: str, storage: str = "") -> RunConfig:
    """A saved config: a YAML path, an MLflow artifact URI (`runs:/<id>/best_config.yaml`), or the name of an
    Optuna study in `storage` (its best trial)."""
    if "://" in spec or spec.startswith("runs:/") or spec.endswith((".yaml", ".yml")) or Path(spec).exists():
        return read_config(spec)
    return study_config(spec, storage)


def warm_start_trials(tune_cfg: TuneConfig, cfg: RunConfig) -> list[dict[str, Any]]:
    """The dropout type and rate of each `warm_start` config, as trial params to enqueue (e.g. the best
    configs of earlier studies when moving to a new ticker). A type this family does not take, or a rate
    above `max_rate`, is refused."""
    trials = []
    for spec in (item.strip() for item in tune_cfg.warm_start.split(",") if item.strip()):
        model = read_any_config(spec, tune_cfg.storage).model
        if model.dropout_type not in applicable_types(cfg.model.model, cfg.model.num_layers):
            raise InputError(f"warm start {spec}: dropout type {model.dropout_type!r} is not in this study's space")
        if model.dropout_rate > tune_cfg.max_rate:
            raise InputError(f"warm start {spec}: rate {model.dropout_rate} is above max_rate {tune_cfg.max_rate}")
        params: dict[str, Any] = {"dropout_type": model.dropout_type}
        if model.dropout_type != "none":
            params["dropout_rate"] = model.dropout_rate
        trials.append(params)
    return trials


def enqueue(study: optuna.Study, trials: list[dict[str, Any]]) -> None:
    """Queue `trials` to run first; one the study has already tried (or queued) is not queued again."""
    for params in trials:
        study.enqueue_trial(params, skip_if_exists=True)


def sample_model(trial: optuna.Trial, base: ModelConfig, max_rate: float) -> ModelConfig:
    """The trial's model config: the fixed one with a sampled dropout type and rate."""
    kind = trial.suggest_categorical("dropout_type", list(applicable_types(base.model, base.num_layers)))
    rate = trial.suggest_float("dropout_rate", 0.0, max_rate) if kind != "none" else 0.0
    return dataclasses.replace(base, dropout_type=kind, dropout_rate=rate)


class Progress:
    """Terminal progress: an updating epoch line on a TTY, one line per trial everywhere, counted per
    process ("worker 2 [3/5]"; the label names the study's trial number)."""

    def __init__(self, total: int, worker: str = "") -> None:
        self.total = total
        self.done = 0
        self.prefix = f"{worker} " if worker else ""
        self.tty = not worker and sys.stderr.isatty()  # workers share the terminal: no updating line

    def epoch(self, label: str, epoch: int, max_epochs: int, val_loss: float) -> None:
        if self.tty:
            print(f"\r  {label}: epoch {epoch}/{max_epochs} val {val_loss:.4f}   ", end="", file=sys.stderr)

    def trial(self, number: int, label: str, outcome: str, seconds: float) -> None:
        self.done += 1
        prefix = "\r" if self.tty else ""
        line = f"{self.prefix}[{self.done}/{self.total}]  {label}: {outcome}  ({seconds:.1f}s)"
        print(prefix + line, file=sys.stderr)


def make_objective(cfg: RunConfig, tune_cfg: TuneConfig, data: Windows, parent_id: str, progress: Progress):
    """The Optuna objective: sample, train all seeds in one nested MLflow run, return the objective.

    The trial keeps its run's id, its process and its summary as user attributes (`mlflow_run_id`,
    `worker`, `metrics`), so the study alone rebuilds the trials table, whichever process ran the trial.
    """
    parent = MlflowClient().get_run(parent_id)
    experiment_id = parent.info.experiment_id  # children next to their parent
    provenance = provenance_of(parent.data.tags)  # on every trial: the compare view of trials shows it

    def objective(trial: optuna.Trial) -> float:
        model_cfg = sample_model(trial, cfg.model, tune_cfg.max_rate)
        trial_cfg = dataclasses.replace(cfg, model=model_cfg)
        label = run_label(model_cfg, trial.number)
        started = time.perf_counter()
        # parent_run_id explicitly: MLflow's active-run stack is per thread (and per process).
        child = mlflow.start_run(run_name=label, nested=True, parent_run_id=parent_id, experiment_id=experiment_id)
        trial.set_user_attr("mlflow_run_id", child.info.run_id)
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        curves = EpochLogger(child.info.run_id)
        mlflow.log_params({**trial_cfg.flat(), "trial_number": trial.number})
        mlflow.set_tags(
            {
                **provenance,
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
            runs = train_validation(model_cfg, cfg.train, data, on_epoch)
            summary = summarize(runs, cfg.objective, data.naive_validation_loss())
            summary["instability_term"] = summary[cfg.objective.instability]  # the part weighted by λ
            mlflow.log_metrics(summary)
            trial.set_user_attr("metrics", summary)
            state, status = "COMPLETE", "FINISHED"
            outcome = (
                f"objective {summary['objective']:.4f} (mean {summary['val_loss_mean']:.4f} "
                f"+ {cfg.objective.penalty:g}·{cfg.objective.instability} {summary['instability_term']:.4f})"
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
        except KeyboardInterrupt:  # Optuna sets the trial FAIL and re-raises; MLflow's word for this is KILLED
            status, outcome = "KILLED", "interrupted"
            mlflow.set_tag("fail_reason", INTERRUPTED)
            trial.set_user_attr("fail_reason", INTERRUPTED)
            raise
        finally:
            curves.flush()
            mlflow.set_tag("trial_state", state)
            mlflow.end_run(status)
            progress.trial(trial.number, label, outcome, time.perf_counter() - started)

    return objective


def _worker(tune_cfg: TuneConfig, cfg: RunConfig, data: Windows, parent_id: str, tracking_uri: str, seed: int) -> None:
    """One worker process: `n_trials` trials of the shared study, each a run nested under the parent; its
    sampler seeded with `seed` (one per worker, or they would all propose the same first trials)."""
    import torch

    torch.set_num_threads(cfg.train.threads)
    os.environ.pop("MLFLOW_RUN_ID", None)  # never resume the parent here: every trial is a new child run
    mlflow.set_tracking_uri(tracking_uri)
    study = load_study(tune_cfg, create=False, seed=seed)
    progress = Progress(tune_cfg.n_trials, worker=current_process().name.replace("tune-", ""))
    objective = make_objective(cfg, tune_cfg, data, parent_id, progress)
    try:
        study.optimize(objective, tune_cfg.n_trials, catch=(DivergedError,))
    except KeyboardInterrupt:  # its trial and run are ended; the main process says "interrupted" once
        sys.exit(130)


def run_trials(tune_cfg: TuneConfig, cfg: RunConfig, data: Windows, study: optuna.Study, parent_id: str) -> None:
    """`n_trials` trials here, or in each of `workers` spawned processes sharing the study's storage."""
    if tune_cfg.workers == 1:
        objective = make_objective(cfg, tune_cfg, data, parent_id, Progress(tune_cfg.n_trials))
        study.optimize(objective, n_trials=tune_cfg.n_trials, catch=(DivergedError,))
        return
    shared = dataclasses.replace(tune_cfg, storage=storage_url(tune_cfg))  # the same file whatever the cwd
    job = (shared, cfg, data, parent_id, mlflow.get_tracking_uri())
    workers = [
        get_context("spawn").Process(target=_worker, args=(*job, cfg.train.seed + i + 1), name=f"tune-worker {i + 1}")
        for i in range(tune_cfg.workers)
    ]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join()
    finally:  # on Ctrl-C each worker ends its own trial and run first; stop any that does not
        for worker in workers:
            worker.join(timeout=30)
            if worker.is_alive():
                worker.terminate()
                worker.join()
    failed = [worker for worker in workers if worker.exitcode]
    for worker in failed:  # killed (e.g. out of memory) or crashed: its trial would stay RUNNING
        why = f"its worker process ended with exit code {worker.exitcode} during the trial"
        fail_trials_of(study, f"{socket.gethostname()}:{worker.pid}", why)
    if failed:
        exits = ", ".join(f"{worker.name}: exit code {worker.exitcode}" for worker in failed)
        raise NoResultError(f"{len(failed)} of {len(workers)} tune workers failed ({exits}); see above")


def join(tune_cfg: TuneConfig, cfg: RunConfig, data: Windows, study: optuna.Study) -> str:
    """Run trials of a study started elsewhere, nested under its parent run; no table, no retrain.

    Returns the parent's run id. The tracking store must be the study's (one server for every machine).
    """
    parent_id = study.user_attrs.get(PARENT_ATTR)
    if not parent_id:
        raise InputError(
            f"study {study.study_name!r} has no parent run to join: start it first "
            "(`mlflow run .` or `python -m pipeline tune` with the same --study-name and --storage)"
        )
    try:
        MlflowClient().get_run(parent_id)
    except MlflowException:
        raise InputError(
            f"the parent run {parent_id} of study {study.study_name!r} is not in {mlflow.get_tracking_uri()}; "
            f"set MLFLOW_TRACKING_URI to the study's store, {study.user_attrs.get(TRACKING_ATTR)}"
        ) from None
    run_trials(tune_cfg, cfg, data, study, parent_id)
    return parent_id


def tune(tune_cfg: TuneConfig, cfg: RunConfig, data: Windows, study: optuna.Study) -> TuneResult:
    """Run the study inside the active (parent) MLflow run, log the trials table, then retrain and log the
    best config (once, here, whatever the number of workers)."""
    parent = mlflow.active_run()
    log_params_once(
        {
            **fixed_options(cfg),
            "n_trials": tune_cfg.n_trials,
            "max_rate": tune_cfg.max_rate,
            "workers": tune_cfg.workers,
        }
    )
    mlflow.set_tags(
        {
            "pipeline.kind": "study",
            "optuna.study_name": study.study_name,
            "optuna.storage": storage_url(tune_cfg),
            "types": ",".join(applicable_types(cfg.model.model, cfg.model.num_layers)),
        }
    )
    # Before any trial: workers (here or joining from elsewhere) find the parent through the study.
    study.set_user_attr(PARENT_ATTR, parent.info.run_id)
    study.set_user_attr(TRACKING_ATTR, mlflow.get_tracking_uri())
    try:
        run_trials(tune_cfg, cfg, data, study, parent.info.run_id)
    finally:  # the table of what ran, also when a worker failed or the study was interrupted
        log_trials(study)

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
