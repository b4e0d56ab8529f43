"""MLflow plumbing shared by the stages that log: store location, run lifecycle, params, configs.

The default store is a SQLite database `mlflow.db` in the working directory (MLflow's file store is
deprecated, and an old `./mlruns` folder would silently switch MLflow to it); `MLFLOW_TRACKING_URI`
overrides. Under `mlflow run`, `MLFLOW_RUN_ID` is set and `mlflow.start_run()` resumes the project's
run, which then is our parent run: no duplicate top-level run.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Metric, Run
from mlflow.tracking import MlflowClient

from pipeline.config import RunConfig, dump_yaml, load_yaml
from pipeline.errors import InputError


def configure_tracking() -> str:
    """Point MLflow at `MLFLOW_TRACKING_URI`, or at ./mlflow.db; return the URI."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return uri


@contextmanager
def tracked_run(name: str, tags: dict[str, str] | None = None) -> Iterator[Run]:
    """Start (or, under `mlflow run`, resume) a top-level run; end it FINISHED, FAILED or KILLED.

    Whatever happens inside, the run is never left RUNNING.
    """
    run = mlflow.start_run(run_name=name, tags=tags)
    try:
        yield run
    except KeyboardInterrupt:
        mlflow.end_run("KILLED")
        raise
    except BaseException:
        mlflow.end_run("FAILED")
        raise
    mlflow.end_run("FINISHED")


def log_params_once(params: dict[str, Any]) -> None:
    """Log params on the active run, skipping keys it already has.

    `mlflow run` logs every -P parameter itself, as the string the user typed; logging the same key
    again in another string form ("1" vs "1.0") would fail the run.
    """
    run = mlflow.active_run()
    existing = MlflowClient().get_run(run.info.run_id).data.params
    fresh = {k: v for k, v in params.items() if k not in existing}
    if fresh:
        mlflow.log_params(fresh)


def log_text_artifact(text: str, name: str, run_id: str | None = None) -> None:
    """Write `text` to an artifact file `name` of the active run (or of `run_id`)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        if run_id is None:
            mlflow.log_artifact(str(path))
        else:
            MlflowClient().log_artifact(run_id, str(path))


def log_config(cfg: RunConfig, name: str, extra: dict[str, Any] | None = None) -> None:
    """Log the whole config as a YAML artifact (and `extra`, e.g. the result, under its own key)."""
    data: dict[str, Any] = cfg.to_dict()
    if extra:
        data["result"] = extra
    log_text_artifact(dump_yaml(data), name)


def read_config(spec: str) -> RunConfig:
    """A `RunConfig` from a local YAML path or an MLflow artifact URI (`runs:/<id>/best_config.yaml`)."""
    if "://" in spec or spec.startswith("runs:/"):
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=spec)
        except Exception as exc:  # MLflow raises several types for a missing run or artifact
            raise InputError(f"cannot fetch config {spec}: {str(exc).splitlines()[0]}") from None
        return RunConfig.from_dict(load_yaml(Path(local)), source=spec)
    return RunConfig.from_dict(load_yaml(Path(spec)), source=spec)


class EpochLogger:
    """Per-epoch metrics for one run, written in batches: at most one store write every `interval` seconds,
    and the rest at `flush()`.

    One write to a SQLite store costs ~15 ms here, about 10% of a small CNN's epoch; batching brings that
    to ~1% while the UI still sees curves grow during a long trial.
    """

    def __init__(self, run_id: str, interval: float = 5.0) -> None:
        self.run_id = run_id
        self.interval = interval
        self.pending: list[Metric] = []
        self.last_write = time.monotonic()

    def log(self, metrics: dict[str, float], step: int) -> None:
        now_ms = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), now_ms, step) for key, value in metrics.items()]
        if time.monotonic() - self.last_write >= self.interval:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            MlflowClient().log_batch(self.run_id, metrics=self.pending)
            self.pending = []
        self.last_write = time.monotonic()
