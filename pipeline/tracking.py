"""MLflow plumbing shared by the stages that log: store location, run lifecycle, params, configs.

The default store is a SQLite database `mlflow.db` in the working directory (MLflow's file store is
deprecated, and an old `./mlruns` folder would silently switch MLflow to it); `MLFLOW_TRACKING_URI`
overrides. Under `mlflow run`, `MLFLOW_RUN_ID` is set and `mlflow.start_run()` resumes the project's
run, which then is our parent run: no duplicate top-level run.

Every top-level run carries its provenance as tags: the project's git commit and whether the tree had
uncommitted changes (`git_commit`, `git_dirty`; where MLflow recorded `mlflow.source.git.commit` itself,
as `mlflow run` does when it launches us, `git_commit` is that same commit) and the versions of the
packages that decide the numbers (`version.torch`, `version.mlflow`, ..., `version.python`, and this
package's own). The price frame a run trained on is logged as an MLflow dataset input (`log_dataset`)
with a digest of every row.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shlex
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.entities import Metric, Run
from mlflow.tracking import MlflowClient

from pipeline.config import RunConfig, coerce, dump_yaml, load_yaml
from pipeline.errors import InputError
from pipeline.ingest import Series, pooled_params


def configure_tracking() -> str:
    """Point MLflow at `MLFLOW_TRACKING_URI`, or at ./mlflow.db; return the URI."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return uri


PROJECT_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dropout-stability"  # the distribution name in pyproject.toml
VERSIONED = ("torch", "mlflow", "optuna", "pandas", "numpy", PACKAGE)


def git_tags(root: Path = PROJECT_ROOT) -> dict[str, str]:
    """{git_commit, git_dirty} of the project checkout; {} where it is not a git checkout (or no git).

    Dirty means `git status --porcelain` lists anything: a modified, staged or untracked (not ignored)
    file, i.e. the code that ran may differ from the commit.
    """
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": str(bool(status.strip())).lower()}


def version_tags() -> dict[str, str]:
    """{version.<distribution>: installed version} for the packages that decide the numbers, and Python's."""
    tags = {"version.python": platform.python_version()}
    for name in VERSIONED:
        try:
            tags[f"version.{name}"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            tags[f"version.{name}"] = "not installed"
    return tags


def provenance_tags() -> dict[str, str]:
    return {**git_tags(), **version_tags()}


def provenance_of(tags: dict[str, str]) -> dict[str, str]:
    """The provenance tags (`provenance_tags`'s keys) among a run's tags."""
    return {k: v for k, v in tags.items() if k in ("git_commit", "git_dirty") or k.startswith("version.")}


@contextmanager
def tracked_run(name: str, tags: dict[str, str] | None = None) -> Iterator[Run]:
    """Start (or, under `mlflow run`, resume) a top-level run tagged with its provenance; end it FINISHED,
    FAILED or KILLED.

    Whatever happens inside, the run is never left RUNNING.
    """
    provenance = provenance_tags()
    run = mlflow.start_run(run_name=name, tags={**provenance, **(tags or {})})
    launched = run.data.tags.get("mlflow.source.git.commit")
    if "git_commit" in provenance and launched and launched != provenance["git_commit"]:
        # `mlflow run` recorded the commit it launched; a commit made since does not change the code running
        mlflow.set_tag("git_commit", launched)
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


def frame_digest(frame: pd.DataFrame) -> str:
    """An 8-hex-digit digest of every row (dates, values, column names and dtypes).

    MLflow's own pandas digest hashes only the first 10,000 rows, so a corrected price late in a long
    daily series would keep the digest of the old data.
    """
    md5 = hashlib.md5(usedforsecurity=False)
    md5.update(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())
    md5.update(repr([(str(column), str(dtype)) for column, dtype in frame.dtypes.items()]).encode())
    return md5.hexdigest()[:8]


def log_dataset(frame: pd.DataFrame, name: str, source: str, context: str = "training") -> str:
    """Log `frame` (the price series) as a dataset input of the active run; return its digest.

    The UI lists it under the run's Datasets with its name, digest, schema and row count. `source` is a
    file path (recorded as that file, absolute), a URL, or any other description (e.g. `yfinance:^GSPC`),
    recorded as text. The dates become a `Date` column, so they are part of the schema.
    """
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.exceptions import MlflowException

    resolved = CodeDatasetSource(tags={"source": source})
    if Path(source).is_file() or "://" in source:
        with warnings.catch_warnings(), suppress(MlflowException):  # an unknown URL scheme stays text
            # a local path matches MLflow's "" and "file" schemes alike: it says so, and either is right
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            resolved = resolve_dataset_source(str(Path(source).resolve()) if Path(source).is_file() else source)
    digest = frame_digest(frame)
    table = frame.reset_index()
    dataset = mlflow.data.from_pandas(table, source=resolved, name=name, digest=digest)
    mlflow.log_input(dataset, context=context)
    return digest


def log_data(series: list[Series]) -> None:
    """Log what a run trained on: `data_*` params, every series' data-quality record as
    `data_quality.json`, and each price frame as a dataset input (named by its ticker or file)."""
    log_params_once({**pooled_params(series), "data_digest": data_digest(series)})
    log_text_artifact(json.dumps([one.report.as_dict() for one in series], indent=2), "data_quality.json")
    for one in series:
        log_dataset(one.frame, name=one.name, source=one.report.source)


def data_digest(series: list[Series]) -> str:
    """One 8-hex-digit digest of every series' name and rows: the same digest means the same training data."""
    text = ",".join(f"{one.name}:{frame_digest(one.frame)}" for one in series)
    return hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()[:8]


def reusable_run(params: dict[str, Any], git: dict[str, str]) -> tuple[Run | None, str]:
    """A FINISHED `train` run with the same params (compared by what they mean) on the same commit of a clean
    tree, as MLflow's multistep workflow example reuses a step.

    Out: (that run, ""), or (None, why an earlier run of the same config and data is not reused: the tree is
    dirty, so the code that would run is not the commit's, or it ran on another commit), or (None, "").
    """
    query = "tags.`pipeline.kind` = 'train' and attributes.status = 'FINISHED'"
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=query, output_format="list")
    same = [run for run in runs if all(same_param(run.data.params.get(k), v) for k, v in params.items())]
    if not same:
        return None, ""
    if git.get("git_dirty") != "false":
        where = "this checkout has uncommitted changes" if git else "this code is not a git checkout"
        return None, f"run {same[0].info.run_id} trained this config on this data, but {where}: training again"
    for run in same:
        if run.data.tags.get("git_commit") == git["git_commit"] and run.data.tags.get("git_dirty") == "false":
            return run, ""
    commit = same[0].data.tags.get("git_commit", "unknown")[:12]
    return None, f"run {same[0].info.run_id} trained this config on this data at commit {commit}: training again"


def same_param(logged: str | None, value: Any) -> bool:
    """Whether a logged param string means `value`. `mlflow run` logs each -P value as typed ("0.20" for
    0.2) and strings shell-quoted ("'^GSPC'"), so the string is unquoted and read as `value`'s type."""
    if logged is None:
        return False
    try:
        words = shlex.split(logged)
        return coerce(words[0] if len(words) == 1 else logged, value, "param") == value
    except (InputError, ValueError):  # unbalanced quotes, or not a value of that type
        return False


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
