"""The main job against a real `mlflow server` over HTTP: SQLite backend, proxied artifacts, model registry.

Starts `mlflow server` in its own process group (it forks workers) on a free port, waits for
`GET /health`, runs `mlflow run . --env-manager local` with `MLFLOW_TRACKING_URI=http://...`, then reads
the runs back through `MlflowClient` and the REST API, and stops the whole group whatever happens.
"""

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipeline.models import applicable_types

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e
# A PATH with this venv and the system's bin folders only: no conda, no pyenv (CASES K12).
PATH = os.pathsep.join([str(Path(sys.executable).parent), "/usr/bin", "/bin"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(url: str, body: dict | None = None) -> tuple[int, str]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def stop(server: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, then SIGKILL to whatever is left of it."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real tracking server with a SQLite store and an artifact folder it serves; yields its URL."""
    tmp = tmp_path_factory.mktemp("server")
    port = free_port()
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(
        [
            shutil.which("mlflow", path=PATH),
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp / 'mlflow.db'}",
            "--artifacts-destination",
            str(tmp / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        cwd=tmp,
        env={**os.environ, "PATH": PATH},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stop() reaches the workers it forks
    )
    url = f"http://127.0.0.1:{port}"
    try:
        started, deadline = time.monotonic(), time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"mlflow server exited: {(tmp / 'server.log').read_text()[-3000:]}"
            try:
                if http(f"{url}/health") == (200, "OK"):
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no /health after 120 s: {(tmp / 'server.log').read_text()[-3000:]}"
            time.sleep(0.5)
        print(f"mlflow server up in {time.monotonic() - started:.1f}s")
        yield url, tmp
    finally:
        stop(proc)
        log.close()


@pytest.fixture(scope="module")
def main_job(server):
    url, tmp = server
    work = tmp / "work"
    work.mkdir()
    started = time.monotonic()
    result = subprocess.run(
        [
            shutil.which("mlflow", path=PATH),
            "run",
            str(ROOT),
            "--env-manager",
            "local",
            *("-P", "model=rnn", "-P", "n_trials=2", "-P", "seeds=1", "-P", "max_epochs=1", "-P", "window=10"),
            *("-P", f"storage=sqlite:///{work / 'optuna.db'}"),
        ],
        cwd=work,
        env={**os.environ, "PATH": PATH, "MLFLOW_TRACKING_URI": url},
        capture_output=True,
        text=True,
        timeout=900,
    )
    print(f"mlflow run against the server: {time.monotonic() - started:.1f}s")
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(url)
    runs = client.search_runs(["0"], max_results=100)
    return url, tmp, work, client, runs, result


def test_server_is_the_store_no_local_files(main_job):
    _, tmp, work, _, _, _ = main_job
    assert not (work / "mlflow.db").exists() and not (work / "mlruns").exists()  # nothing fell back to local
    stored = {p.name for p in (tmp / "artifacts").rglob("*") if p.is_file()}
    assert {"trials.csv", "trials.png", "best_config.yaml", "index.html"} <= stored  # uploaded through the server


def test_one_parent_with_nested_trials_over_http(main_job):
    _, _, _, client, runs, result = main_job
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert {k: parent.data.params[k] for k in ("model", "n_trials", "seeds", "max_epochs", "window")} == {
        "model": "rnn",
        "n_trials": "2",
        "seeds": "1",
        "max_epochs": "1",
        "window": "10",
    }
    assert parent.data.tags["pipeline.kind"] == "study"
    # our provenance tags agree with what `mlflow run` records itself
    assert parent.data.tags["git_commit"] == parent.data.tags["mlflow.source.git.commit"]
    assert parent.data.tags["version.mlflow"] == mlflow.__version__
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 == len(runs) - 1
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.params["dropout_type"] in applicable_types("rnn", num_layers=1)
        assert child.data.params["window"] == "10" and child.data.params["seeds"] == "1"
        assert child.info.run_name.startswith(f"rnn · {child.data.params['dropout_type']} · ")
        assert child.info.run_name.endswith(f" · trial {child.data.params['trial_number']}")
        if child.data.tags["trial_state"] == "COMPLETE":
            metrics = child.data.metrics
            assert metrics["objective"] == pytest.approx(metrics["val_loss_mean"] + metrics["instability_term"])
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")]
        assert steps == [1]
    assert f"parent run {parent.info.run_id}" in result.stdout + result.stderr
    url = main_job[0]
    assert f"  compare trials: open {url} in a browser\n" in result.stdout  # not `mlflow ui` on an http URI


def test_trials_table_and_best_config_download_over_http(main_job, tmp_path):
    url, _, _, _, runs, _ = main_job
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    table = mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="trials.csv", dst_path=str(tmp_path), tracking_uri=url
    )
    text = Path(table).read_text()
    assert text.startswith("trial,state,dropout_type,dropout_rate,objective,val_loss_mean,val_loss_std,")
    rows = list(csv.DictReader(text.splitlines()))
    children = {r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert [r["trial"] for r in rows] == ["0", "1"] and {r["run_id"] for r in rows} == children
    config = mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="best_config.yaml", dst_path=str(tmp_path), tracking_uri=url
    )
    saved = yaml.safe_load(Path(config).read_text())
    assert saved["window"]["window"] == 10 and saved["train"]["seeds"] == 1


def test_parent_records_the_prices_as_a_dataset_input(main_job):
    from pipeline.ingest import IngestConfig, load_prices
    from pipeline.tracking import frame_digest

    _, _, _, _, runs, _ = main_job
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    inputs = parent.inputs.dataset_inputs
    assert len(inputs) == 1
    assert inputs[0].dataset.digest == frame_digest(load_prices(IngestConfig(ticker="^GSPC")))
    assert [(t.key, t.value) for t in inputs[0].tags] == [("mlflow.data.context", "training")]


def test_rest_api_search_finds_the_trials(main_job):
    url, _, _, _, runs, _ = main_job
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    status, body = http(
        f"{url}/api/2.0/mlflow/runs/search",
        {"experiment_ids": ["0"], "filter": f"tags.mlflow.parentRunId = '{parent.info.run_id}'"},
    )
    assert status == 200, body
    found = json.loads(body)["runs"]
    assert len(found) == 2
    for run in found:
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        metrics = {m["key"] for m in run["data"].get("metrics", [])}
        assert params["model"] == "rnn" and params["max_epochs"] == "1"
        assert {"val_loss", "train_loss"} <= metrics
    status, body = http(f"{url}/api/2.0/mlflow/runs/get?run_id={parent.info.run_id}")
    assert status == 200 and json.loads(body)["run"]["info"]["status"] == "FINISHED"


def test_registered_champion_resolves_over_http(main_job):
    url, _, _, client, runs, _ = main_job
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    version = client.get_model_version_by_alias("dropout-rnn", "champion")
    assert version.run_id == parent.info.run_id
    query = urllib.parse.urlencode({"name": "dropout-rnn", "alias": "champion"})
    status, body = http(f"{url}/api/2.0/mlflow/registered-models/alias?{query}")
    assert status == 200 and json.loads(body)["model_version"]["version"] == version.version
