"""The study in MLflow: one parent, nested trials with curves, honest trial states, the best config; its
provenance and trials table; several worker processes on one study (CASES K9)."""

import csv
import dataclasses
import io
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import RunConfig
from pipeline.errors import InputError, NoResultError
from pipeline.models import ModelConfig
from pipeline.tracking import git_tags, log_dataset, tracked_run
from pipeline.trials import log_trials
from pipeline.tune import (
    Progress,
    TuneConfig,
    join,
    make_objective,
    make_storage,
    open_study,
    run_label,
    tune,
)

ROOT = Path(__file__).resolve().parent.parent

FIXED = {"model": "rnn", "hidden_size": 8, "seeds": 2, "max_epochs": 2, "last_k": 2}


def all_runs(client: MlflowClient) -> list:
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


@pytest.fixture(scope="module")
def finished_study(tracking_uri, gspc_windows, tmp_path_factory):
    storage = f"sqlite:///{tmp_path_factory.mktemp('optuna') / 'optuna.db'}"
    tune_cfg = TuneConfig(n_trials=3, study_name="unit-study", storage=storage)
    cfg = RunConfig().with_options(FIXED)
    study = open_study(tune_cfg, cfg)
    with tracked_run("unit-study") as parent:
        result = tune(tune_cfg, cfg, gspc_windows, study)
    return parent.info.run_id, result, MlflowClient(tracking_uri), tune_cfg


def test_parent_holds_the_study_and_no_trial_curves(finished_study):
    parent_id, result, client, _ = finished_study
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["optuna.study_name"] == "unit-study"
    params = parent.data.params
    assert {k: params[k] for k in ("model", "ticker", "window", "seeds", "penalty", "n_trials")} == {
        "model": "rnn",
        "ticker": "^GSPC",
        "window": "30",
        "seeds": "2",
        "penalty": "1.0",
        "n_trials": "3",
    }
    assert "val_loss" not in parent.data.metrics  # no per-trial curves on the parent
    assert parent.data.metrics["best_trial_objective"] == pytest.approx(result.study.best_value)
    for key in ("objective", "val_loss_mean", "val_loss_std", "test_loss", "naive_test_loss", "test_skill"):
        assert key in parent.data.metrics


def test_every_trial_is_a_nested_run_with_params_and_epoch_curves(finished_study):
    parent_id, result, client, _ = finished_study
    children = [r for r in all_runs(client) if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(children) == 3 == len(result.study.trials)
    for child in children:
        trial = result.study.trials[int(child.data.params["trial_number"])]
        assert child.info.status == "FINISHED"
        assert child.data.tags["trial_state"] == trial.state.name == "COMPLETE"
        assert child.data.params["dropout_type"] == trial.params["dropout_type"]
        assert float(child.data.params["dropout_rate"]) == pytest.approx(trial.params.get("dropout_rate", 0.0))
        assert child.data.params["hidden_size"] == "8"
        history = client.get_metric_history(child.info.run_id, "val_loss")
        assert [m.step for m in history] == [1, 2]
        assert child.data.metrics["objective"] == pytest.approx(trial.value)
        assert {"val_loss_seed0", "val_loss_seed1", "train_loss_std", "grad_norm"} <= set(child.data.metrics)
    assert not [r for r in all_runs(client) if r.info.status == "RUNNING"]


def test_best_config_artifact_reproduces_the_best_trial(finished_study):
    parent_id, result, _, _ = finished_study
    path = mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path="best_config.yaml")
    saved = yaml.safe_load(Path(path).read_text())
    best = result.study.best_trial
    assert saved["model"]["dropout_type"] == best.params["dropout_type"]
    assert saved["model"]["dropout_rate"] == pytest.approx(best.params.get("dropout_rate", 0.0))
    assert saved["result"]["best_trial"] == best.number
    assert RunConfig.from_dict(saved) == result.best_cfg


def test_logged_model_loads_and_forecasts(finished_study, gspc_windows):
    parent_id, result, _, _ = finished_study
    path = mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path="best_config.yaml")
    model = mlflow.pytorch.load_model(yaml.safe_load(Path(path).read_text())["result"]["model_uri"])  # torch's
    inputs, _ = gspc_windows.split("test")
    expected = result.final.model(inputs[:5])
    assert model(inputs[:5]).detach().numpy() == pytest.approx(expected.detach().numpy(), abs=1e-6)


def test_resuming_a_study_with_other_fixed_options_is_refused(finished_study):
    _, _, _, tune_cfg = finished_study
    other = RunConfig().with_options({**FIXED, "window": 20})
    with pytest.raises(InputError, match=r"study 'unit-study' was run with other options \(window: 30 -> 20\)"):
        open_study(tune_cfg, other)


def test_diverging_trials_fail_with_a_reason_and_the_study_goes_on(tracking_uri, gspc_windows, tmp_path):
    broken = dataclasses.replace(gspc_windows, features=gspc_windows.features.clone())
    broken.features[5, 0] = float("nan")  # a bad training row: every trial's loss turns NaN
    tune_cfg = TuneConfig(n_trials=3, study_name="diverging", storage=f"sqlite:///{tmp_path / 'o.db'}")
    cfg = RunConfig().with_options(FIXED)
    study = open_study(tune_cfg, cfg)
    expected = r"no trial completed in study 'diverging' \(0 pruned, 3 failed\)"
    with pytest.raises(NoResultError, match=expected), tracked_run("diverging") as parent:
        tune(tune_cfg, cfg, broken, study)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL] * 3
    assert all("non-finite training loss" in t.user_attrs["fail_reason"] for t in study.trials)
    client = MlflowClient(tracking_uri)
    assert client.get_run(parent.info.run_id).info.status == "FAILED"
    children = [r for r in all_runs(client) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 3
    assert all(c.info.status == "FAILED" and c.data.tags["trial_state"] == "FAIL" for c in children)
    assert all("objective" not in c.data.metrics for c in children)  # no NaN objective is ever logged
    # nothing retrained, logged or registered; only the table saying why
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} == {"trials.csv", "trials.png"}
    rows = read_trials_csv(client, parent.info.run_id)
    assert [(r["state"], r["objective"], r["epochs"]) for r in rows] == [("FAIL", "", "0")] * 3
    assert all("non-finite training loss at epoch 1" in r["fail_reason"] for r in rows)


def test_pruned_trials_are_logged_as_pruned(tracking_uri, gspc_windows, tmp_path):
    study = optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))  # prunes at the first report
    cfg = RunConfig().with_options(FIXED)
    with tracked_run("pruning") as parent:
        objective = make_objective(cfg, TuneConfig(), gspc_windows, parent.info.run_id, Progress(2))
        study.optimize(objective, n_trials=2)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.PRUNED] * 2
    client = MlflowClient(tracking_uri)
    children = [r for r in all_runs(client) if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(c.data.tags["trial_state"] for c in children) == ["PRUNED", "PRUNED"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")] == [1]


def test_study_report_shows_trials_and_optuna_plots(finished_study, tmp_path):
    from pipeline.report import build_report
    from tests.test_report import check_page

    parent_id, result, client, _ = finished_study
    files = build_report(parent_id, tmp_path)
    text = check_page(tmp_path)
    assert {f.name for f in files} >= {"index.html", "history.png", "slice.png"}
    assert "Trials by objective" in text
    assert f"{result.study.best_value:.4f}" in text  # the best trial's objective heads the table
    final, best = result.final, result.study.best_trial
    assert f"Best trial {best.number} ({best.params['dropout_type']}, rate " in text
    assert f"MSE {final.test_loss:.4f} against {final.naive_test_loss:.4f}" in text
    assert f"skill {final.test_skill:+.2%}" in text
    assert f"Forecaster: {final.registration.uri};" in text
    assert final.registration.reason in text
    assert "Estimated from 3 completed trials: with fewer than 20" in text
    tags = client.get_run(parent_id).data.tags
    assert (tags["registered_model"], tags["champion_decision"]) == (final.registration.uri, final.registration.reason)
    assert {f"report/{f.name}" for f in files} == {a.path for a in client.list_artifacts(parent_id, "report")}


def test_search_space_is_exactly_the_familys_applicable_types(finished_study):
    from pipeline.models import applicable_types

    _, result, _, _ = finished_study
    for trial in result.study.trials:
        assert trial.distributions["dropout_type"].choices == applicable_types("rnn", num_layers=1)
        if trial.params["dropout_type"] != "none":
            assert trial.distributions["dropout_rate"].low == 0.0 and trial.distributions["dropout_rate"].high == 0.6


# --- provenance, dataset, trial metrics and the trials table -----------------------------------------------


def read_trials_csv(client: MlflowClient, run_id: str) -> list[dict[str, str]]:
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="trials.csv", tracking_uri=client._tracking_client.tracking_uri
    )
    return list(csv.DictReader(io.StringIO(Path(path).read_text())))


def test_top_level_runs_carry_the_commit_and_package_versions(tracking_uri):
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    status = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain"], capture_output=True, text=True).stdout
    with tracked_run("provenance") as run:
        pass
    tags = MlflowClient(tracking_uri).get_run(run.info.run_id).data.tags
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert tags["git_commit"] == head.strip() and len(head.strip()) == 40
    assert tags["git_dirty"] == ("true" if status.strip() else "false")
    assert {k: v for k, v in tags.items() if k.startswith("version.")} == {
        "version.python": platform.python_version(),
        "version.torch": torch.__version__,
        "version.mlflow": mlflow.__version__,
        "version.optuna": optuna.__version__,
        "version.pandas": pd.__version__,
        "version.numpy": np.__version__,
        "version.dropout-stability": version,
    }


def test_git_tags_follow_the_checkout_and_are_absent_outside_one(tmp_path):
    assert git_tags(tmp_path) == {}  # not a git checkout: no made-up commit
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run([*git, "add", "a.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    head = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    assert git_tags(tmp_path) == {"git_commit": head, "git_dirty": "false"}
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_tags(tmp_path) == {"git_commit": head, "git_dirty": "true"}


def prices(rows: int) -> pd.DataFrame:
    index = pd.bdate_range("1980-01-01", periods=rows, name="Date")
    close = 100 * np.exp(np.cumsum(np.random.default_rng(0).normal(0, 0.01, rows)))
    return pd.DataFrame(
        {"Open": close, "High": close * 1.01, "Low": close * 0.99, "Close": close, "Volume": 1e6}, index=index
    )


def test_dataset_input_has_its_name_and_a_digest_of_every_price(tracking_uri, tmp_path):
    frame = prices(10_050)  # longer than the 10,000 rows MLflow's own pandas digest looks at
    changed = frame.copy()
    changed.iloc[-1, changed.columns.get_loc("Close")] += 0.01  # one price, in the last row
    csv_file = tmp_path / "prices.csv"
    frame.to_csv(csv_file)
    digests = {}
    for key, data, source in (
        ("same", frame, str(csv_file)),
        ("copy", frame.copy(), str(csv_file)),
        ("changed", changed, "yfinance:TEST"),
    ):
        with tracked_run(f"dataset-{key}") as run:
            digests[key] = log_dataset(data, "TEST daily prices", source)
        inputs = MlflowClient(tracking_uri).get_run(run.info.run_id).inputs.dataset_inputs
        assert len(inputs) == 1
        dataset = inputs[0].dataset
        assert dataset.name == "TEST daily prices" and dataset.digest == digests[key]
        assert [(t.key, t.value) for t in inputs[0].tags] == [("mlflow.data.context", "training")]
        assert yaml.safe_load(dataset.profile) == {"num_rows": 10_050, "num_elements": 60_300}
        names = [c["name"] for c in yaml.safe_load(dataset.schema)["mlflow_colspec"]]
        assert names == ["Date", "Open", "High", "Low", "Close", "Volume"]
        if source == str(csv_file):
            assert dataset.source_type == "local" and yaml.safe_load(dataset.source) == {"uri": str(csv_file)}
        else:
            assert dataset.source_type == "code" and yaml.safe_load(dataset.source) == {"tags": {"source": source}}
    assert digests["same"] == digests["copy"]
    assert digests["changed"] != digests["same"]
    assert len(digests["same"]) == 8


def test_trial_runs_carry_the_objective_parts_and_readable_names(finished_study):
    parent_id, result, client, _ = finished_study
    children = [r for r in all_runs(client) if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(children) == 3
    for child in children:
        trial = result.study.trials[int(child.data.params["trial_number"])]
        model = ModelConfig(
            model="rnn",
            hidden_size=8,
            dropout_type=trial.params["dropout_type"],
            dropout_rate=trial.params.get("dropout_rate", 0.0),
        )
        assert child.info.run_name == run_label(model, trial.number)
        assert child.info.run_name.startswith(f"rnn · {trial.params['dropout_type']} · ")
        assert child.info.run_name.endswith(f" · trial {trial.number}")
        metrics = child.data.metrics
        assert metrics["objective"] == pytest.approx(trial.value, rel=1e-12)
        assert metrics["instability_term"] == metrics["val_loss_std"]  # the default term, λ = 1
        assert metrics["objective"] == pytest.approx(metrics["val_loss_mean"] + 1.0 * metrics["instability_term"])
        assert trial.user_attrs["mlflow_run_id"] == child.info.run_id
    provenance = {k: v for k, v in client.get_run(parent_id).data.tags.items() if k.startswith(("git_", "version."))}
    assert len(provenance) == 2 + 7  # git_commit, git_dirty and 7 versions
    for child in children:
        assert {k: child.data.tags[k] for k in provenance} == provenance


def test_parent_carries_the_trials_table_of_the_study(finished_study):
    parent_id, result, client, _ = finished_study
    rows = read_trials_csv(client, parent_id)
    assert list(rows[0]) == [
        "trial",
        "state",
        "dropout_type",
        "dropout_rate",
        "objective",
        "val_loss_mean",
        "val_loss_std",
        "seed_spread_best_val",
        "epoch_jitter",
        "batch_loss_noise_rel",
        "grad_noise_cv",
        "instability_term",
        "epochs",
        "duration_s",
        "run_id",
        "worker",
        "fail_reason",
    ]
    trials = result.study.trials
    assert [int(r["trial"]) for r in rows] == [t.number for t in trials] == [0, 1, 2]
    children = {r.info.run_id: r for r in all_runs(client) if r.data.tags.get("mlflow.parentRunId") == parent_id}
    for row, trial in zip(rows, trials, strict=True):
        assert row["state"] == trial.state.name == "COMPLETE"
        assert row["dropout_type"] == trial.params["dropout_type"]
        assert float(row["dropout_rate"]) == trial.params.get("dropout_rate", 0.0)
        assert float(row["objective"]) == trial.value  # written at full precision
        child = children[row["run_id"]]
        assert child.data.params["trial_number"] == row["trial"]
        for part in ("val_loss_mean", "val_loss_std", "seed_spread_best_val", "epoch_jitter", "grad_noise_cv"):
            assert float(row[part]) == pytest.approx(child.data.metrics[part], rel=1e-12), part
        assert row["epochs"] == "2"  # max_epochs 2, patience 5: every trial runs both epochs
        assert float(row["duration_s"]) == pytest.approx(trial.duration.total_seconds(), abs=1e-3)
        assert row["worker"] == f"{socket.gethostname()}:{os.getpid()}"  # one process: this one
        assert row["fail_reason"] == ""


def test_parent_carries_the_trials_figure(finished_study, tmp_path):
    import matplotlib.image

    parent_id, _, client, _ = finished_study
    assert "trials.png" in {a.path for a in client.list_artifacts(parent_id)}
    path = mlflow.artifacts.download_artifacts(run_id=parent_id, artifact_path="trials.png", dst_path=str(tmp_path))
    image = matplotlib.image.imread(path)
    assert image.shape == (420, 1100, 4)  # 11 × 4.2 inches at 100 dpi
    assert image[..., :3].std() > 0.05  # not a blank page


def test_a_trial_whose_worker_died_ends_failed_in_optuna_and_mlflow(tracking_uri, tmp_path):
    """A worker killed mid-trial stops its heartbeats; the trial ends FAIL and its run FAILED, not RUNNING."""
    storage = make_storage(f"sqlite:///{tmp_path / 'o.db'}", heartbeat=1)
    study = optuna.create_study(study_name="lost", storage=storage)
    client = MlflowClient(tracking_uri)
    with tracked_run("lost") as parent:
        with pytest.warns(UserWarning, match="Heartbeat of storage is supposed to be used with Study.optimize"):
            trial = study.ask()  # a trial as a worker holds it, without the optimize loop around it
        child = client.create_run(parent.info.experiment_id, tags={"mlflow.parentRunId": parent.info.run_id})
        trial.set_user_attr("mlflow_run_id", child.info.run_id)
        study._storage.record_heartbeat(trial._trial_id)  # what a worker's heartbeat thread does
        time.sleep(3.5)  # grace 2 × heartbeat = 2 s, and SQLite now() has 1 s resolution: the "worker" is gone
        rows = log_trials(study)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.FAIL]
    lost = client.get_run(child.info.run_id)
    assert lost.info.status == "FAILED" and lost.data.tags["trial_state"] == "FAIL"
    assert lost.data.tags["fail_reason"] == "its worker process stopped sending heartbeats (killed or lost)"
    assert [(r["state"], r["objective"], r["run_id"]) for r in rows] == [("FAIL", "", child.info.run_id)]


# --- scale-out: several worker processes on one study (CASES K9) ------------------------------------------

TINY = {"model": "rnn", "hidden_size": 8, "seeds": 1, "max_epochs": 1, "last_k": 1}


@pytest.fixture(scope="module")
def two_workers(tracking_uri, gspc_windows, tmp_path_factory):
    storage = f"sqlite:///{tmp_path_factory.mktemp('k9') / 'optuna.db'}"
    tune_cfg = TuneConfig(n_trials=2, study_name="k9", storage=storage, workers=2)
    cfg = RunConfig().with_options(TINY)
    study = open_study(tune_cfg, cfg)  # the one process that creates the storage's schema and the study
    started = time.perf_counter()
    mlflow.set_experiment("scale-out")  # not the default experiment: workers must follow the parent into it
    try:
        with tracked_run("k9") as parent:
            result = tune(tune_cfg, cfg, gspc_windows, study)
    finally:
        mlflow.set_experiment("Default")
    return parent.info.run_id, result, MlflowClient(tracking_uri), tune_cfg, cfg, time.perf_counter() - started


def test_workers_share_one_study_under_one_parent(two_workers):
    parent_id, result, client, _, _, seconds = two_workers
    print(f"2 workers × 2 trials, retrain and table: {seconds:.1f}s")
    study = optuna.load_study(study_name="k9", storage=result.study._storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 4  # 2 × 2, none RUNNING
    workers = [t.user_attrs["worker"] for t in study.trials]
    assert len(set(workers)) == 2 and all(workers.count(w) == 2 for w in workers)  # two processes, two each
    assert f"{socket.gethostname()}:{os.getpid()}" not in workers  # the main process ran none of them
    runs = [r for r in all_runs(client) if r.data.tags.get("optuna.study_name") == "k9"]
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert [p.info.run_id for p in parents] == [parent_id]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id]
    assert len(children) == 4 == len(runs) - 1
    assert {c.info.run_id for c in children} == {t.user_attrs["mlflow_run_id"] for t in study.trials}
    assert {c.info.experiment_id for c in children} == {parents[0].info.experiment_id} != {"0"}
    assert sorted(int(c.data.params["trial_number"]) for c in children) == [0, 1, 2, 3]
    assert all(c.info.status == "FINISHED" and c.data.tags["trial_state"] == "COMPLETE" for c in children)
    assert not [r for r in all_runs(client) if r.info.status == "RUNNING"]
    assert study.user_attrs["mlflow_parent_run_id"] == parent_id


def test_workers_retrain_and_tabulate_once_in_the_main_process(two_workers):
    parent_id, result, client, _, _, _ = two_workers
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.params["workers"] == "2"
    assert [m.value for m in client.get_metric_history(parent_id, "best_trial_objective")] == [result.study.best_value]
    assert len(client.get_metric_history(parent_id, "test_loss")) == 1  # one retrain
    rows = read_trials_csv(client, parent_id)
    assert [(r["trial"], r["state"]) for r in rows] == [(str(i), "COMPLETE") for i in range(4)]
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"best_config.yaml", "trials.csv", "trials.png"}


def test_join_adds_trials_under_the_same_parent_and_nothing_else(two_workers, gspc_windows):
    parent_id, _, client, tune_cfg, cfg, _ = two_workers
    joiner = dataclasses.replace(tune_cfg, n_trials=1, workers=1, join=True)
    before = {r.info.run_id for r in all_runs(client)}
    assert join(joiner, cfg, gspc_windows, open_study(joiner, cfg)) == parent_id
    assert mlflow.active_run() is None
    new = [r for r in all_runs(client) if r.info.run_id not in before]
    assert len(new) == 1 and new[0].data.tags["mlflow.parentRunId"] == parent_id
    assert new[0].info.experiment_id == client.get_run(parent_id).info.experiment_id != "0"  # next to its parent
    assert new[0].data.params["trial_number"] == "4" and new[0].info.status == "FINISHED"
    assert len(client.get_metric_history(parent_id, "test_loss")) == 1  # no second retrain


def test_join_refuses_a_missing_study_or_parent(two_workers, gspc_windows, tmp_path):
    _, _, _, tune_cfg, cfg, _ = two_workers
    missing = dataclasses.replace(tune_cfg, study_name="nope", join=True)
    with pytest.raises(InputError, match=r"^no study 'nope' in sqlite:///.*optuna\.db \(list its studies with `optuna"):
        open_study(missing, cfg)
    orphan = dataclasses.replace(tune_cfg, study_name="orphan", join=False)
    study = open_study(orphan, cfg)  # created, but no main process ever started its parent run
    with pytest.raises(InputError, match=r"^study 'orphan' has no parent run to join: start it first"):
        join(dataclasses.replace(orphan, join=True), cfg, gspc_windows, study)
    k9 = open_study(dataclasses.replace(tune_cfg, join=True), cfg)
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(elsewhere)
    try:
        expected = rf"^the parent run \w{{32}} of study 'k9' is not in {elsewhere}; set MLFLOW_TRACKING_URI to the"
        with pytest.raises(InputError, match=expected):
            join(dataclasses.replace(tune_cfg, join=True), cfg, gspc_windows, k9)
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["--workers", "0"], {}, "error: workers must be at least 1, got 0"),
        (["--join", "true"], {}, "error: --join needs the --study-name (and --storage) of the study to join"),
        (
            ["--join", "true", "--study-name", "s", "--storage", "sqlite:///none.db"],
            {},
            "error: no study 's': there is no Optuna storage sqlite:///none.db",
        ),
        (
            ["--join", "true", "--study-name", "s"],
            {"MLFLOW_RUN_ID": "abc"},
            "error: --join adds trials to a study's parent run: use `python -m pipeline tune`, not `mlflow run`",
        ),
    ],
)
def test_tune_command_refuses_bad_scale_out_options_before_any_run(argv, env, message, capsys, monkeypatch, tmp_path):
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["tune", *argv]) == 2
    assert capsys.readouterr().err.strip() == message
    assert not list(tmp_path.iterdir())  # no study, no store


# --- reusing a study: its best config, and warm starts ------------------------------------------------


def test_a_study_name_reads_as_its_best_trials_config(finished_study):
    from pipeline.tune import read_any_config, study_config

    _, result, _, tune_cfg = finished_study
    best = result.study.best_trial
    cfg = study_config("unit-study", tune_cfg.storage)
    assert cfg.model.dropout_type == best.params["dropout_type"]
    assert cfg.model.dropout_rate == pytest.approx(best.params.get("dropout_rate", 0.0), abs=0)
    assert cfg == result.best_cfg  # fixed options read back with their types (hidden_size 8, seeds 2, ...)
    assert read_any_config("unit-study", tune_cfg.storage) == cfg


def test_study_config_refusals_name_the_problem(finished_study, tmp_path):
    from pipeline.tune import study_config

    storage = finished_study[3].storage
    with pytest.raises(InputError, match=r"^no study 'other' in sqlite:///"):
        study_config("other", storage)
    missing = f"sqlite:///{tmp_path / 'none.db'}"
    with pytest.raises(InputError) as err:
        study_config("unit-study", missing)
    assert str(err.value) == f"no study 'unit-study': there is no Optuna storage {missing}"
    assert not (tmp_path / "none.db").exists()
    optuna.create_study(study_name="foreign", storage=storage)
    with pytest.raises(InputError, match=r"study 'foreign' in .* was not made by this pipeline: no best config"):
        study_config("foreign", storage)


def test_warm_start_enqueues_earlier_best_configs_first(finished_study, tmp_path):
    from pipeline.tune import enqueue, warm_start_trials

    _, result, _, tune_cfg = finished_study
    config_file = tmp_path / "zoneout.yaml"
    config_file.write_text("model: {model: rnn, dropout_type: zoneout, dropout_rate: 0.2}\n")
    new = TuneConfig(study_name="warm", storage=tune_cfg.storage, warm_start=f"unit-study,{config_file}")
    cfg = RunConfig().with_options(FIXED)
    trials = warm_start_trials(new, cfg)
    best = result.study.best_trial.params
    assert trials[0] == best and trials[1] == {"dropout_type": "zoneout", "dropout_rate": 0.2}
    study = open_study(new, cfg)
    enqueue(study, trials)
    enqueue(study, trials)  # again (a resumed study): nothing is queued twice
    waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    assert [t.system_attrs["fixed_params"] for t in waiting] == trials  # two queued, not four
    # The first trials of the study then run exactly these configs.
    first = study.ask()
    from pipeline.tune import sample_model

    model = sample_model(first, cfg.model, new.max_rate)
    assert (model.dropout_type, model.dropout_rate) == (best["dropout_type"], best.get("dropout_rate", 0.0))


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("model: {model: cnn, dropout_type: zoneout, dropout_rate: 0.2}", "dropout type 'zoneout' is not in"),
        ("model: {model: rnn, dropout_type: standard, dropout_rate: 0.9}", "rate 0.9 is above max_rate 0.6"),
    ],
)
def test_warm_start_refuses_what_the_study_cannot_try(tmp_path, yaml_text, message):
    from pipeline.tune import warm_start_trials

    path = tmp_path / "c.yaml"
    path.write_text(yaml_text + "\n")
    cfg = RunConfig().with_options({"model": "cnn" if "cnn" in yaml_text else "rnn"})
    with pytest.raises(InputError, match=message):
        warm_start_trials(TuneConfig(warm_start=str(path)), cfg)


def tune_until_running(tmp_path: Path, name: str, options: list[str], trials: int):
    """Start `python -m pipeline tune` (study `name`, a slow model, stores in tmp_path) and wait until
    `trials` of its trials are RUNNING with their worker recorded. Returns (storage, env, process, trials)."""
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("MLFLOW_RUN_ID", None)
    slow = ["--n-trials", "1", "--seeds", "1", "--patience", "30", "--hidden-size", "128", *options]
    command = [sys.executable, "-m", "pipeline", "tune", "--study-name", name, "--storage", storage, *slow]
    process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    running: list = []
    deadline = time.monotonic() + 120
    while len(running) < trials and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:  # not created yet
            continue
        running = [t for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)) if "worker" in t.user_attrs]
    assert len(running) == trials, f"{trials} trial(s) should be running"
    return storage, env, process, running


def test_a_killed_worker_fails_its_trial_and_run_at_once_and_the_table_is_still_written(tmp_path):
    """kill -9 of one of two worker processes mid-trial: the main process fails that trial and ends its run
    FAILED (no waiting for the heartbeat's grace period), writes the trials table and exits 1."""
    storage, env, main, running = tune_until_running(tmp_path, "killed", ["--workers", "2", "--max-epochs", "20"], 2)
    victim = running[0]
    os.kill(int(victim.user_attrs["worker"].rsplit(":", 1)[1]), signal.SIGKILL)
    err = main.communicate(timeout=300)[1]
    assert main.returncode == 1, err.decode()[-2000:]
    assert "error: 1 of 2 tune workers failed (tune-worker" in err.decode() and "exit code -9" in err.decode()
    trials = {t.number: t for t in optuna.load_study(study_name="killed", storage=storage).trials}
    reason = "its worker process ended with exit code -9 during the trial"
    assert trials[victim.number].state == optuna.trial.TrialState.FAIL
    assert trials[victim.number].user_attrs["fail_reason"] == reason
    (survivor,) = [t for n, t in trials.items() if n != victim.number]
    assert survivor.state == optuna.trial.TrialState.COMPLETE
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = all_runs(client)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    lost = client.get_run(victim.user_attrs["mlflow_run_id"])
    assert lost.info.status == "FAILED" and lost.data.tags["fail_reason"] == reason
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FAILED"
    rows = read_trials_csv(client, parent.info.run_id)
    assert sorted((r["state"], r["fail_reason"]) for r in rows) == [("COMPLETE", ""), ("FAIL", reason)]


def test_default_study_names_say_which_data():
    from pipeline.tune import default_study_name

    for options, data in [
        ({}, "GSPC"),
        ({"ticker": "MSFT"}, "MSFT"),
        ({"tickers": "^GSPC, MSFT,"}, "GSPC+MSFT"),
        ({"csv": "/data/my prices.csv"}, "my prices"),
    ]:
        name = default_study_name(RunConfig().with_options({"model": "lstm", **options}))
        assert name.startswith(f"lstm-{data}-") and len(name) == len(f"lstm-{data}-") + 15, name


def test_ctrl_c_ends_the_trial_and_runs_and_says_interrupted_once(tmp_path):
    """SIGINT mid-trial (what Ctrl-C sends): exit 130 with one line, no traceback; the trial FAIL with its
    reason, its run and the parent KILLED, the trials table written."""
    storage, env, main, _ = tune_until_running(tmp_path, "stopped", ["--max-epochs", "30"], 1)
    time.sleep(1.0)  # inside an epoch
    main.send_signal(signal.SIGINT)
    err = main.communicate(timeout=120)[1].decode()
    assert main.returncode == 130, err[-2000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "interrupted"
    (trial,) = optuna.load_study(study_name="stopped", storage=storage).trials
    assert trial.state == optuna.trial.TrialState.FAIL
    assert trial.user_attrs["fail_reason"] == "interrupted (Ctrl-C or SIGINT)"
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = {r.info.run_id: r for r in all_runs(client)}
    child = runs[trial.user_attrs["mlflow_run_id"]]
    assert child.info.status == "KILLED" and child.data.tags["fail_reason"] == "interrupted (Ctrl-C or SIGINT)"
    (parent,) = [r for r in runs.values() if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "KILLED"
    assert [(r["state"], r["fail_reason"]) for r in read_trials_csv(client, parent.info.run_id)] == [
        ("FAIL", "interrupted (Ctrl-C or SIGINT)")
    ]


def test_a_study_run_again_proposes_and_scores_the_same_trials(tracking_uri, gspc_windows, tmp_path):
    """The sampler is seeded with the train seed: the same study run twice gives the same trials, values
    included (training is seeded too); another seed proposes others."""
    from pipeline.tune import run_trials

    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    results = {}
    for name, seed in (("again-1", 0), ("again-2", 0), ("other-seed", 1)):
        cfg = RunConfig().with_options({**FIXED, "seeds": 1, "max_epochs": 1, "seed": seed})
        tune_cfg = TuneConfig(n_trials=6, study_name=name, storage=storage)
        study = open_study(tune_cfg, cfg)
        with tracked_run(name) as parent:
            run_trials(tune_cfg, cfg, gspc_windows, study, parent.info.run_id)
        results[name] = [(t.params, t.value) for t in study.trials]
    assert results["again-1"] == results["again-2"]
    assert len({params["dropout_type"] for params, _ in results["again-1"]}) > 1  # not one proposal repeated
    assert [p for p, _ in results["other-seed"]] != [p for p, _ in results["again-1"]]
