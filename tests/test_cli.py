"""Bad input: one clear line, exit code 2, no traceback, no MLflow run left RUNNING."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main

ROOT = Path(__file__).resolve().parent.parent

BAD_INPUT = [
    (["tune", "--model", "xyz"], "unknown model 'xyz': choose one of rnn, lstm, cnn"),
    (["train", "--dropout-type", "foo"], "unknown dropout type 'foo'"),
    (["train", "--dropout-rate", "1.5", "--dropout-type", "standard"], "dropout rate must be in [0, 1), got 1.5"),
    (["train", "--dropout-rate", "-0.1"], "dropout rate must be in [0, 1), got -0.1"),
    (["tune", "--window", "5000"], "window 5000 is too long for the series: its train part has 3521 rows"),
    (["tune", "--window", "100000"], "window 100000 is too long for the series: it has 5031 days in all"),
    (["tune", "--window", "abc"], "--window: window must be int, got 'abc'"),
    (["tune", "--csv", "/no/such/prices.csv"], "CSV file not found: /no/such/prices.csv"),
    (["tune", "--csv", "/tmp"], "/tmp is a folder, not a CSV file"),
    (
        ["ingest", "--ticker", ".hidden"],
        "invalid ticker '.hidden': use letters, digits and ^ = . _ - only, not starting",
    ),
    (["train", "--model", "cnn", "--dropout-type", "weight_drop"], "does not apply to the cnn family"),
    (["train", "--dropout-type", "builtin", "--dropout-rate", "0.3"], "needs num_layers >= 2"),
    (["train", "--config", "/no/such/config.yaml"], "config file not found: /no/such/config.yaml"),
    (["tune", "--n-trials", "0"], "n_trials must be at least 1, got 0"),
    (["tune", "--max-rate", "1.5"], "max_rate must be in (0, 1), got 1.5"),
    (["tune", "--seeds", "0"], "seeds must be at least 1, got 0"),
    (["train", "--max-epochs", "0"], "max_epochs must be at least 1, got 0"),
    (["train", "--lr", "-1"], "lr must be positive, got -1.0"),
    (["sweep", "--max-epochs", "0"], "max_epochs must be at least 1, got 0"),
    (["tune", "--instability", "wobble"], "unknown instability measure 'wobble'"),
    (["tune", "--penalty", "-1"], "penalty must be a finite number >= 0, got -1.0"),
    (["tune", "--penalty", "nan"], "penalty must be a finite number >= 0, got nan"),
    (["report", "--run-id", "abc", "--out", "/etc/passwd"], "--out /etc/passwd is a file, not a folder"),
    (["sweep", "--model", "cnn", "--types", "zoneout"], "does not apply to the cnn family"),
    (["sweep", "--seeds", "1", "--model", "xyz"], "unknown model 'xyz': choose one of rnn, lstm, cnn, or all"),
    (["ingest", "--ticker", "../../etc/passwd"], "invalid ticker '../../etc/passwd'"),
    (["train", "--config", "no-such-study"], "no study 'no-such-study': there is no Optuna storage sqlite:///"),
    (["tune", "--warm-start", "no-such-study"], "no study 'no-such-study': there is no Optuna storage sqlite:///"),
    (["tune", "--embargo", "0"], "embargo must be at least 1 window between parts, got 0"),
    (["tune", "--folds", "1"], "folds must be 0 (one validation split) or at least 2, got 1"),
    (["tune", "--folds", "400"], "walk-forward fold 1 of 400: window 30 is too long for the series: its val part"),
    (["sweep", "--folds", "3"], "folds (walk-forward validation) applies to tune's objective; a sweep uses one split"),
    (["sweep", "--seeds", "1"], "a sweep needs at least 2 seeds for paired comparisons, got 1"),
    (["tune", "--tickers", "^GSPC,MSFT,^GSPC"], "tickers listed more than once: ^GSPC"),
    (["tune", "--tickers", "^GSPC,MSFT", "--csv", "prices.csv"], "give either --csv or --tickers, not both"),
    (["tune", "--tickers", "^GSPC,NO-SUCH-TICKER-XYZ"], "no data for ticker 'NO-SUCH-TICKER-XYZ'"),
]


@pytest.mark.parametrize(("argv", "message"), BAD_INPUT, ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    assert message in err[0]
    # Input errors surface before any run or study is created.
    assert not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "optuna.db").exists()


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{cwd / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_unknown_ticker_offline_is_one_line_exit_2(tmp_path):
    # No network here (and an unknown ticker is an empty answer anyway): no cache, so a clear refusal.
    result = run_cli(["ingest", "--ticker", "NO-SUCH-TICKER-XYZ"], tmp_path)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2
    assert len(lines) == 1 and lines[0].startswith("error: no data for ticker 'NO-SUCH-TICKER-XYZ'"), lines
    assert "Traceback" not in result.stderr
    assert not any(ROOT.joinpath("data", "cache").glob("NO-SUCH-TICKER-XYZ*"))


def test_argparse_errors_are_one_line_exit_2(tmp_path):
    result = run_cli(["tune", "--no-such-option", "1"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unrecognized arguments: --no-such-option 1 (see python -m pipeline --help)"
    ]


def test_types_lists_each_familys_search_space(capsys):
    recurrent = (
        "none, standard, head, spatial, variational, weight_drop, recurrent, recurrent_shared, zoneout, "
        "builtin (num_layers >= 2)"
    )
    assert main(["types"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"rnn: {recurrent}",
        f"lstm: {recurrent}",
        "cnn: none, standard, head, spatial, variational",
    ]


def test_ingest_prints_a_summary_line(capsys):
    assert main(["ingest", "--ticker", "MSFT"]) == 0
    assert capsys.readouterr().out.strip() == (
        "MSFT: 7983 rows kept of 7983 read, 1986-03-13 .. 2017-11-10, columns Open, High, Low, Close, Volume; "
        "cleaned: nothing; 1 large move flagged (1987-10-19)"
    )


def test_train_preset_of_the_articles_builtin_rnn_is_flagged_as_no_dropout(capsys, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main(["train", "--preset", "article-rnn-builtin", "--max-epochs", "1", "--seeds", "1"]) == 0
    err = capsys.readouterr().err
    assert "warning: this config (rnn · builtin · p=0.30 · no effective dropout) applies no dropout" in err
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["dropout_effective"] == "false"
    assert run.data.tags["preset"] == "article-rnn-builtin"
    assert run.data.tags["mlflow.runName"] == "rnn · builtin · p=0.30 · no effective dropout"
    assert (run.data.params["dropout_type"], run.data.params["num_layers"], run.data.params["as_written"]) == (
        "builtin",
        "1",
        "True",
    )


def test_ingest_of_several_tickers_prints_one_line_each(capsys):
    assert main(["ingest", "--tickers", "MSFT,^GSPC"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(":")[0] for line in lines] == ["MSFT", "^GSPC"]
    assert lines[1].startswith("^GSPC: 5031 rows kept of 5031 read, 1999-01-04 .. 2018-12-31")


def test_tune_pools_tickers_with_walk_forward_folds_and_logs_what_it_trained_on(tmp_path):
    """Two shipped tickers pooled, a 2-fold walk-forward objective: the trial validates on both folds, and
    the parent run records both series (params, data_quality.json, dataset inputs)."""
    import json

    from mlflow.tracking import MlflowClient

    args = ["tune", "--tickers", "^GSPC,MSFT", "--folds", "2", "--window", "10", "--n-trials", "1"]
    result = run_cli([*args, "--seeds", "1", "--max-epochs", "1", "--hidden-size", "4"], tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    trial = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    params = parent.data.params
    assert (params["data_source"], params["data_series"]) == ("^GSPC,MSFT", "2")
    assert params["data_rows_kept"] == str(5031 + 7983)
    assert (params["data_first_date"], params["data_last_date"]) == ("1986-03-13", "2018-12-31")
    assert (params["tickers"], params["folds"]) == ("^GSPC,MSFT", "2")
    quality_file = client.download_artifacts(parent.info.run_id, "data_quality.json", str(tmp_path))
    quality = json.loads(Path(quality_file).read_text())
    assert [(q["source"], q["rows_kept"]) for q in quality] == [("^GSPC", 5031), ("MSFT", 7983)]
    assert sorted(d.dataset.name for d in parent.inputs.dataset_inputs) == ["MSFT", "^GSPC"]
    assert {"val_loss_fold1_seed0", "val_loss_fold2_seed0"} <= set(trial.data.metrics)
    assert trial.data.metrics["val_loss"] == pytest.approx(
        (trial.data.metrics["val_loss_fold1_seed0"] + trial.data.metrics["val_loss_fold2_seed0"]) / 2
    )


def test_train_reuses_an_earlier_run_of_the_same_config_data_and_commit(tmp_path):
    """Like MLflow's multistep example: same params (as strings) and the same clean commit -> reuse the run.
    Runs from a committed copy of the project, so that the tree is clean whatever state this checkout is in."""
    import shutil

    from mlflow.tracking import MlflowClient

    copy = tmp_path / "project"
    shutil.copytree(ROOT / "pipeline", copy / "pipeline", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data", copy / "data", ignore=shutil.ignore_patterns("cache"))
    for name in ("MLproject", "conda.yaml"):
        shutil.copy(ROOT / name, copy / name)
    (copy / ".gitignore").write_text("mlflow.db\nmlartifacts/\nmlruns/\n__pycache__/\noptuna.db\nreports/\n")
    git = ["git", "-C", str(copy), "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "snapshot"]):
        subprocess.run([*git, *command], check=True, capture_output=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{copy / 'mlflow.db'}", "PYTHONPATH": str(copy)}
    args = [sys.executable, "-m", "pipeline", "train", "--window", "10", "--max-epochs", "1", "--seeds", "1"]

    def train(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*args, *extra], cwd=copy, env=env, capture_output=True, text=True, timeout=300)

    first = train()
    assert first.returncode == 0, first.stderr[-2000:]
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert (run.data.tags["git_dirty"], run.data.tags["pipeline.kind"]) == ("false", "train")
    again = train()
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.startswith(f"reusing run {run.info.run_id} (")
    assert "same config, data and commit, nothing retrained" in again.stdout
    assert len(client.search_runs([run.info.experiment_id])) == 1  # nothing new trained or logged
    other = train("--seeds", "2")  # another config: trained
    forced = train("--force", "true")  # the same config, forced: trained
    assert other.returncode == forced.returncode == 0
    assert "reusing" not in other.stdout + forced.stdout
    assert len(client.search_runs([run.info.experiment_id])) == 3
    # Under `mlflow run`, MLflow logs each -P value as typed ("0.0020"), and its own run is the stage's run.
    # A later `mlflow run` of the same config spelled otherwise (0.002) reuses it: its run is pointed at
    # the earlier one and ends FINISHED, with nothing trained.
    path = os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])

    def project(lr: str) -> subprocess.CompletedProcess:
        options = ["-P", "window=10", "-P", "max_epochs=1", "-P", "seeds=1", "-P", f"lr={lr}", "-P", "ticker=^GSPC"]
        command = [str(Path(sys.executable).parent / "mlflow"), "run", ".", "-e", "train", "--env-manager", "local"]
        return subprocess.run(
            [*command, *options], cwd=copy, env={**env, "PATH": path}, capture_output=True, text=True, timeout=300
        )

    typed = project("0.0020")
    assert typed.returncode == 0 and "reusing" not in typed.stdout, typed.stderr[-2000:]
    (earlier,) = client.search_runs([run.info.experiment_id], "params.lr = '0.0020'")
    assert earlier.data.tags["pipeline.kind"] == "train"  # trained: the project's run is the stage's run
    spelled = project("0.002")
    assert spelled.returncode == 0, spelled.stderr[-2000:]
    assert spelled.stdout.startswith(f"reusing run {earlier.info.run_id} (")
    (reused,) = client.search_runs([run.info.experiment_id], "tags.`pipeline.kind` = 'train-reused'")
    assert reused.info.status == "FINISHED" and reused.data.tags["reused_run_id"] == earlier.info.run_id
    assert len(client.search_runs([run.info.experiment_id])) == 5  # 3 trained + 1 by mlflow run + 1 reused
    # Uncommitted changes: the same config is trained again, and the user is told why it was not reused.
    (copy / "notes.txt").write_text("scratch\n")
    dirty = train()
    assert dirty.returncode == 0 and "reusing" not in dirty.stdout, dirty.stderr[-2000:]
    assert "this checkout has uncommitted changes: training again (--force true skips this check)" in dirty.stderr
    assert len(client.search_runs([run.info.experiment_id])) == 6


@pytest.mark.parametrize(
    ("logged", "value", "same"),
    [
        ("0.20", 0.2, True),
        ("0.2", 0.3, False),
        ("'^GSPC'", "^GSPC", True),  # mlflow run's shell quoting
        ("MSFT", "^GSPC", False),
        ("10.0", 10, True),
        ("10.5", 10, False),
        ("true", True, True),
        ("no", True, False),
        ("", 0.2, False),
        ("'a", "a", False),  # unbalanced quote
        (None, 1, False),  # never logged
    ],
)
def test_logged_params_are_compared_by_what_they_mean(logged, value, same):
    from pipeline.tracking import same_param

    assert same_param(logged, value) is same
