"""The real MLflow project, end to end, on the shipped S&P 500 data with a tiny budget.

`mlflow run <repo> --env-manager local` runs the MLproject's command in a subprocess, exactly as a user
would; the store is a fresh SQLite database in a temporary folder.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.models import applicable_types

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


def mlflow_run(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    # A PATH with this venv (as after `. .venv/bin/activate`) and the system's bin folders only: no conda,
    # no pyenv, as on a fresh machine (CASES K12); the README's `--env-manager local` must be enough.
    path = os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])
    assert shutil.which("conda", path=path) is None and shutil.which("pyenv", path=path) is None
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "PATH": path}
    mlflow_cli = shutil.which("mlflow", path=path)
    return subprocess.run(
        [mlflow_cli, "run", str(ROOT), "--env-manager", "local", *args],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def runs(client: MlflowClient) -> list:
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.fixture(scope="module")
def main_job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    result = mlflow_run(
        tmp,
        "-P",
        "model=rnn",
        "-P",
        "n_trials=2",
        "-P",
        "seeds=1",
        "-P",
        "max_epochs=2",
        "-P",
        f"storage=sqlite:///{tmp / 'optuna.db'}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    return tmp, result, client


def test_main_job_logs_one_parent_with_nested_trials(main_job):
    _, result, client = main_job
    all_runs = runs(client)
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, "the project's run is the parent: no duplicate top-level run"
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["model"] == "rnn" and parent.data.params["n_trials"] == "2"
    assert parent.data.params["data_rows_kept"] == "5031" and parent.data.params["data_first_date"] == "1999-01-04"
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2
    for child in children:
        assert child.data.params["dropout_type"] in applicable_types("rnn", num_layers=1)
        assert child.data.tags["trial_state"] in ("COMPLETE", "PRUNED")
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")]
        assert steps == [1, 2]
    assert f"parent run {parent.info.run_id}" in result.stderr + result.stdout


def test_main_job_logs_the_model_and_best_config(main_job):
    _, _, client = main_job
    parent = next(r for r in runs(client) if "mlflow.parentRunId" not in r.data.tags)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "best_config.yaml" in artifacts
    assert "report/index.html" in {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    config_path = mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="best_config.yaml", tracking_uri=client._tracking_client.tracking_uri
    )
    saved = yaml.safe_load(Path(config_path).read_text())
    assert saved["ingest"]["ticker"] == "^GSPC" and saved["window"]["window"] == 30
    model_uri = saved["result"]["model_uri"]
    mlflow.set_tracking_uri(client._tracking_client.tracking_uri)
    model = mlflow.pytorch.load_model(model_uri)
    import torch

    assert model(torch.zeros(3, 30, 5)).shape == (3,)
    assert parent.data.metrics["naive_test_loss"] > 0


def test_train_entry_reuses_the_best_config(main_job):
    tmp, _, client = main_job
    parent = next(r for r in runs(client) if "mlflow.parentRunId" not in r.data.tags)
    result = mlflow_run(
        tmp, "-e", "train", "-P", f"config=runs:/{parent.info.run_id}/best_config.yaml", "-P", "max_epochs=1"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    new = [r for r in runs(client) if r.info.run_id != parent.info.run_id and "mlflow.parentRunId" not in r.data.tags]
    assert len(new) == 1 and new[0].info.status == "FINISHED"
    path = mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="best_config.yaml")
    best = yaml.safe_load(Path(path).read_text())
    assert new[0].data.params["dropout_type"] == best["model"]["dropout_type"]
    assert float(new[0].data.params["dropout_rate"]) == pytest.approx(best["model"]["dropout_rate"])
    assert new[0].data.params["max_epochs"] == "1"
    assert [m.step for m in client.get_metric_history(new[0].info.run_id, "val_loss")] == [1]
    assert "config.yaml" in {a.path for a in client.list_artifacts(new[0].info.run_id)}


def study_parent(client: MlflowClient):
    """The main job's study parent (the warm-start test adds a study on MSFT)."""
    studies = [r for r in runs(client) if r.data.tags.get("pipeline.kind") == "study"]
    (parent,) = [r for r in studies if r.data.params["ticker"] != "MSFT"]
    return parent


def newest_top_level_run(client: MlflowClient):
    top = [r for r in runs(client) if "mlflow.parentRunId" not in r.data.tags]
    return max(top, key=lambda r: r.info.start_time)


def test_main_job_registers_the_champion_on_a_fresh_store(main_job):
    _, _, client = main_job
    parent = study_parent(client)
    champion = client.get_model_version_by_alias("dropout-rnn", "champion")
    assert str(champion.version) == "1" and champion.run_id == parent.info.run_id
    assert champion.tags["champion_decision"] == "no champion yet: version 1 is champion"
    assert champion.tags["data_source"] == "^GSPC" and champion.tags["test_last_date"] == "2018-12-31"


def test_train_entry_takes_a_study_name_or_a_local_yaml(main_job):
    """`-P config=` as the name of a study in the Optuna storage (its best trial) or a local YAML path."""
    tmp, _, client = main_job
    storage = f"sqlite:///{tmp / 'optuna.db'}"
    (summary,) = optuna.get_all_study_summaries(storage)
    best = summary.best_trial.params
    parent = study_parent(client)
    local = tmp / "best.yaml"
    uri = client._tracking_client.tracking_uri
    saved = mlflow.artifacts.download_artifacts(f"runs:/{parent.info.run_id}/best_config.yaml", tracking_uri=uri)
    shutil.copy(saved, local)
    for config in (summary.study_name, str(local)):
        # force: the same config and data, trained before in this store, would otherwise be reused on a clean tree
        options = ["-P", f"config={config}", "-P", f"storage={storage}", "-P", "max_epochs=1", "-P", "force=true"]
        result = mlflow_run(tmp, "-e", "train", *options)
        assert result.returncode == 0, result.stderr[-3000:]
        run = newest_top_level_run(client)
        assert run.info.status == "FINISHED" and run.data.tags["pipeline.kind"] == "train"
        assert run.data.params["dropout_type"] == best["dropout_type"]
        assert float(run.data.params["dropout_rate"]) == pytest.approx(best.get("dropout_rate", 0.0))
        assert run.data.params["window"] == "30" and run.data.params["ticker"] == "^GSPC"  # the study's fixed options


def test_warm_start_on_another_ticker_tries_the_earlier_best_first(main_job):
    tmp, _, client = main_job
    storage = f"sqlite:///{tmp / 'optuna.db'}"
    (earlier,) = optuna.get_all_study_summaries(storage)
    budget = ["-P", "n_trials=1", "-P", "seeds=1", "-P", "max_epochs=1", "-P", f"storage={storage}"]
    result = mlflow_run(tmp, "-P", "ticker=MSFT", "-P", f"warm_start={earlier.study_name}", *budget)
    assert result.returncode == 0, result.stderr[-3000:]
    (new,) = [s for s in optuna.get_all_study_summaries(storage) if s.study_name != earlier.study_name]
    first = optuna.load_study(study_name=new.study_name, storage=storage).trials[0]
    assert first.params == earlier.best_trial.params
    assert newest_top_level_run(client).data.params["ticker"] == "MSFT"


def test_bad_input_under_mlflow_run_fails_cleanly(tmp_path):
    result = mlflow_run(tmp_path, "-P", "model=xyz", "-P", f"storage=sqlite:///{tmp_path / 'optuna.db'}")
    assert result.returncode != 0
    assert "error: unknown model 'xyz': choose one of rnn, lstm, cnn" in result.stderr
    assert "Traceback" not in result.stderr.split("error: unknown model")[0]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert [r.info.status for r in runs(client)] == ["FAILED"]
