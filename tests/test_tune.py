"""The study in MLflow: one parent, nested trials with curves, honest trial states, the best config."""

import dataclasses
from pathlib import Path

import mlflow
import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.config import RunConfig
from pipeline.errors import InputError, NoResultError
from pipeline.tracking import tracked_run
from pipeline.tune import Progress, TuneConfig, make_objective, open_study, tune

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
    _, result, _, _ = finished_study
    model = mlflow.pytorch.load_model(result.model_uri)
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
    assert not client.list_artifacts(parent.info.run_id)  # nothing retrained, logged or registered


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
    assert {f"report/{f.name}" for f in files} == {a.path for a in client.list_artifacts(parent_id, "report")}


def test_search_space_is_exactly_the_familys_applicable_types(finished_study):
    from pipeline.models import applicable_types

    _, result, _, _ = finished_study
    for trial in result.study.trials:
        assert trial.distributions["dropout_type"].choices == applicable_types("rnn", num_layers=1)
        if trial.params["dropout_type"] != "none":
            assert trial.distributions["dropout_rate"].low == 0.0 and trial.distributions["dropout_rate"].high == 0.6
