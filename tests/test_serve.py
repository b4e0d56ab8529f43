"""The pyfunc forecaster and the registry: values computed by hand, exact messages, the champion rule.

One tiny model (rnn, window 10, hidden 4, one epoch, one seed) is trained, logged and registered once per
module in a throw-away SQLite store; every test reads from it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import serve
from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.errors import InputError
from pipeline.final import fit_and_log
from pipeline.ingest import load_prices
from pipeline.models import applicable_types, build_model
from pipeline.windows import make_windows

ROOT = Path(__file__).resolve().parent.parent
CSV = ROOT / "data" / "GSPC_1999-2018_daily.csv"
CFG = RunConfig().with_options({"window": 10, "hidden_size": 4, "max_epochs": 1, "seeds": 1, "model": "rnn"})
CHAMPION = "models:/dropout-rnn@champion"


@pytest.fixture(scope="module")
def logged(tracking_uri, tmp_path_factory):
    """Train, log and register the tiny model once; artifacts go to a temporary folder, not ./mlruns."""
    artifacts = tmp_path_factory.mktemp("artifacts")
    experiment = mlflow.create_experiment("serve", artifact_location=artifacts.as_uri())
    data = make_windows(load_prices(CFG.ingest), CFG.window)
    with mlflow.start_run(experiment_id=experiment) as run:
        result, model_uri = fit_and_log(CFG, data, "config.yaml")
    return {"result": result, "uri": model_uri, "data": data, "run_id": run.info.run_id, "experiment": experiment}


@pytest.fixture(scope="module")
def pyfunc(logged):
    return mlflow.pyfunc.load_model(CHAMPION)


def raw_rows(until: str | None = None, rows: int = 60) -> pd.DataFrame:
    """The shipped CSV as pandas reads it (Date as text, Adj Close present), last `rows` rows up to `until`."""
    frame = pd.read_csv(CSV)
    if until is not None:
        frame = frame[frame["Date"] <= until]
    return frame.tail(rows).reset_index(drop=True)


def by_hand(logged, start: int) -> float:
    """The trained model on the window starting at feature row `start`, unscaled with the scaler's mean_/scale_."""
    data, model = logged["data"], logged["result"].model.eval()
    with torch.no_grad():
        scaled = float(model(data.inputs(torch.tensor([start])))[0])
    return scaled * float(data.scaler.scale_[0]) + float(data.scaler.mean_[0])


def test_forecast_equals_the_torch_model_on_the_same_window(logged, pyfunc):
    data = logged["data"]
    start = int(data.starts["test"][-1])  # the last test sample: window ends 2018-12-28, target 2018-12-31
    last_day = f"{data.dates[start + data.window - 1]:%Y-%m-%d}"
    assert last_day == "2018-12-28"
    out = pyfunc.predict(raw_rows(until=last_day))
    expected = by_hand(logged, start)
    assert list(out.columns) == ["date", "last_close", "log_return", "close"]
    assert out["date"].tolist() == ["2018-12-28"]
    assert out["last_close"].iloc[0] == 2485.73999
    # Exactly: the same float64 features, the same float32 scaling and the same weights as in training.
    assert out["log_return"].iloc[0] == expected
    assert out["close"].iloc[0] == 2485.73999 * math.exp(expected)


def test_layouts_and_float32_give_the_same_forecast(pyfunc):
    frame = raw_rows()
    # Prices on a 1/64 grid and volumes on a 1024 grid are exact in float32: any difference would be ours.
    for column in ("Open", "High", "Low", "Close", "Adj Close"):
        frame[column] = (frame[column] * 64).round() / 64
    frame["Volume"] = (frame["Volume"] / 1024).round() * 1024
    wide = frame.astype({c: "float64" for c in ("Open", "High", "Low", "Close", "Adj Close", "Volume")})
    narrow = frame.astype({c: "float32" for c in ("Open", "High", "Low", "Close", "Adj Close", "Volume")})
    assert narrow["Close"].dtype == np.float32
    reference = pyfunc.predict(wide)
    indexed = wide.assign(Date=pd.to_datetime(wide["Date"])).set_index("Date")  # a Date index, as yfinance gives
    for other in (narrow, indexed, wide.drop(columns="Adj Close"), wide.iloc[::-1]):  # any row order: sorted
        pd.testing.assert_frame_equal(pyfunc.predict(other), reference)
    # Any spelling of the names, through the model class itself (MLflow's schema matches names exactly).
    lower = wide.rename(columns=lambda c: c.lower().replace(" ", "_"))
    pd.testing.assert_frame_equal(pyfunc.unwrap_python_model().predict(None, lower), reference)
    # A yfinance download as it comes: (Price, Ticker) columns in yfinance's order, a Date index.
    download = indexed[["Close", "High", "Low", "Open", "Volume"]]
    download.columns = pd.MultiIndex.from_product([download.columns, ["^GSPC"]], names=["Price", "Ticker"])
    pd.testing.assert_frame_equal(pyfunc.unwrap_python_model().predict(None, download), reference)
    assert reference["date"].iloc[0] == "2018-12-31"


def test_an_adj_close_model_forecasts_from_the_adjusted_close(pyfunc):
    forecaster = pyfunc.unwrap_python_model()
    adjusted = dataclasses.replace(forecaster.settings, price_column="Adj Close")
    assert adjusted.required_columns() == ["Open", "High", "Low", "Close", "Adj Close", "Volume"]
    assert dataclasses.replace(adjusted, feature_names=["close"]).required_columns() == ["Adj Close"]
    assert forecaster.settings.required_columns() == ["Open", "High", "Low", "Close", "Volume"]
    frame = raw_rows()
    halved = frame.assign(**{"Adj Close": frame["Close"] / 2})  # every bar scaled by 1/2: the same returns
    reference = serve.forecast(forecaster.model, forecaster.settings, frame).iloc[0]
    out = serve.forecast(forecaster.model, adjusted, halved).iloc[0]
    assert out["log_return"] == reference["log_return"]
    assert out["last_close"] == reference["last_close"] / 2 and out["close"] == reference["close"] / 2


def test_too_few_rows_missing_close_and_bad_prices_are_named(pyfunc):
    with pytest.raises(InputError) as few:
        pyfunc.predict(raw_rows(rows=10))
    assert str(few.value) == (
        "model input: 10 daily rows; the model needs at least 11 "
        "(a window of 10 returns, each against the previous close)"
    )
    pyfunc.predict(raw_rows(rows=11))  # exactly window + 1 rows is enough
    with pytest.raises(MlflowException, match=r"Model is missing inputs \['Close'\]"):
        pyfunc.predict(raw_rows().drop(columns="Close"))
    with pytest.raises(InputError) as no_close:  # the model class itself says which columns it needs
        pyfunc.unwrap_python_model().predict(None, raw_rows().drop(columns=["Close", "Adj Close"]))
    assert str(no_close.value) == (
        "model input: no Close column (the model's features close, open, high, low, volume need Open, High, Low, "
        "Close, Volume; found: Date, Open, High, Low, Volume)"
    )
    bad = raw_rows()
    bad.loc[50, "Close"] = 0.0
    with pytest.raises(InputError) as zero:
        pyfunc.predict(bad)
    assert str(zero.value) == f"model input: non-positive price on {bad.loc[50, 'Date']} (log returns need prices > 0)"


def test_version_tags_carry_dropout_objective_data_range_and_test_loss(logged):
    client, result, data = MlflowClient(), logged["result"], logged["data"]
    assert logged["uri"] == "models:/dropout-rnn/1"
    version = client.get_model_version("dropout-rnn", "1")
    tags = version.tags
    scale, mean = float(data.scaler.scale_[0]), float(data.scaler.mean_[0])
    train, test = data.target_dates("train"), data.target_dates("test")
    assert {k: tags[k] for k in ("family", "dropout_type", "dropout_rate", "dropout_effective", "window")} == {
        "family": "rnn",
        "dropout_type": "none",
        "dropout_rate": "0.0",
        "dropout_effective": "false",
        "window": "10",
    }
    assert float(tags["objective"]) == result.summary["objective"]
    assert (tags["objective_penalty"], tags["objective_instability"]) == ("1.0", "val_loss_std")
    assert (tags["data_source"], tags["price_column"]) == ("^GSPC", "Close")
    assert tags["train_first_date"] == f"{train[0]:%Y-%m-%d}" and tags["train_last_date"] == f"{train[-1]:%Y-%m-%d}"
    assert tags["test_first_date"] == f"{test[0]:%Y-%m-%d}" and tags["test_last_date"] == "2018-12-31"
    assert tags["train_last_date"] < tags["test_first_date"]
    assert float(tags["test_loss"]) == result.test_loss
    # The compared loss is the test MSE in log-return units: check it against an unscaled MSE by hand.
    inputs, targets = data.split("test")
    with torch.no_grad():
        predictions = result.model.eval()(inputs)
    mse = float((((predictions * scale + mean) - (targets * scale + mean)).double() ** 2).mean())
    assert float(tags["test_mse_log_return"]) == pytest.approx(mse, rel=1e-4)
    assert tags["run_id"] == logged["run_id"] == version.run_id
    assert str(client.get_model_version_by_alias("dropout-rnn", "champion").version) == "1"
    assert tags["champion_decision"] == "no champion yet: version 1 is champion"
    assert result.registration == serve.Registration("dropout-rnn", "1", True, "no champion yet: version 1 is champion")
    # The config artifact names the registered version, the forecaster and the PyTorch model.
    path = mlflow.artifacts.download_artifacts(run_id=logged["run_id"], artifact_path="config.yaml")
    record = yaml.safe_load(Path(path).read_text())["result"]
    assert record["registered_model"] == "models:/dropout-rnn/1"
    assert mlflow.pytorch.load_model(record["model_uri"])(torch.zeros(2, 10, 5)).shape == (2,)


def test_input_example_is_the_last_train_rows(logged):
    folder = Path(mlflow.artifacts.download_artifacts(logged["uri"]))
    example = json.loads((folder / "input_example.json").read_text())
    assert example["columns"] == ["Date", "Open", "High", "Low", "Close", "Volume"]
    dates = [row[0] for row in example["data"]]
    last_train = f"{logged['data'].target_dates('train')[-1]:%Y-%m-%d}"
    assert len(dates) == 11 and dates[-1] == last_train
    assert dates == raw_rows(until=last_train, rows=11)["Date"].tolist()


def test_logged_signature_names_every_input_column_and_requires_what_the_features_need(logged):
    signature = mlflow.models.get_model_info(logged["uri"]).signature
    inputs = {spec.name: (spec.type.to_dict(), spec.required) for spec in signature.inputs.inputs}
    assert list(inputs) == ["Date", "Open", "High", "Low", "Close", "Adj Close", "Volume"]
    required = [name for name, (_, needed) in inputs.items() if needed]
    assert required == ["Open", "High", "Low", "Close", "Volume"]  # Date: a column or the index; Adj Close optional
    assert {kind["type"] for kind, _ in inputs.values()} == {"any"}  # int64 volumes and float64 prices accepted
    assert [(spec.name, spec.type.name) for spec in signature.outputs.inputs] == [
        ("date", "string"),
        ("last_close", "double"),
        ("log_return", "double"),
        ("close", "double"),
    ]


def test_champion_moves_only_when_better_on_the_same_test_period(logged):
    client, name = MlflowClient(), "dropout-champion-rule"
    base = client.get_model_version("dropout-rnn", "1").tags
    mse, period = float(base["test_mse_log_return"]), f"^GSPC {base['test_first_date']}..2018-12-31"

    def register(**changes):
        tags = {k: v for k, v in base.items() if k != "champion_decision"}
        tags.update({k: repr(v) if isinstance(v, float) else v for k, v in changes.items()})
        registration = serve.register(logged["uri"], name, tags)
        champion = str(client.get_model_version_by_alias(name, "champion").version)
        assert client.get_model_version(name, registration.version).tags["champion_decision"] == registration.reason
        return registration, champion

    reg, champion = register()
    assert (reg.version, reg.champion, champion) == ("1", True, "1")
    reg, champion = register(test_mse_log_return=2 * mse)
    assert (reg.champion, champion) == (False, "1")
    assert reg.reason == f"test MSE {2 * mse:.6g} >= {mse:.6g} of champion version 1 on {period}: " + (
        "champion stays version 1"
    )
    reg, champion = register(test_mse_log_return=mse)  # a tie keeps the champion
    assert (reg.champion, champion) == (False, "1")
    reg, champion = register(test_mse_log_return=mse / 2)
    assert (reg.version, reg.champion, champion) == ("4", True, "4")
    assert reg.reason == f"test MSE {mse / 2:.6g} < {mse:.6g} of champion version 1 on {period}: version 4 is champion"
    reg, champion = register(test_mse_log_return=mse / 100, test_first_date="2017-01-03")
    assert (reg.champion, champion) == (False, "4")
    assert reg.reason == (
        f"not compared with champion version 4: different test data (test_first_date 2017-01-03 vs "
        f"{base['test_first_date']}); champion stays version 4"
    )
    reg, champion = register(test_mse_log_return=mse / 100, data_source="MSFT")
    assert (reg.champion, champion) == (False, "4")
    assert "different test data (data_source MSFT vs ^GSPC)" in reg.reason


def test_predict_cli_prints_the_forecast_for_the_day_after_the_last_row(logged, tmp_path, capsys):
    data = logged["data"]
    expected = by_hand(logged, len(data.dates) - data.window)  # the last 10 feature rows, up to 2018-12-31
    path = tmp_path / "prices.csv"
    raw_rows().to_csv(path, index=False)
    assert main(["predict", "--model", CHAMPION, "--csv", str(path)]) == 0
    line, err = capsys.readouterr()
    assert err == ""  # no progress bars or warnings around the one line
    price = 2506.850098 * math.exp(expected)
    assert line == (
        f"forecast for the day after 2018-12-31: log return {expected:+.6f}, implied Close {price:.2f} (last 2506.85)\n"
    )
    # The same file with lower-case names and no Adj Close: the CLI renames columns as ingest does.
    raw_rows().drop(columns="Adj Close").rename(columns=str.lower).to_csv(tmp_path / "lower.csv", index=False)
    assert main(["predict", "--model", "models:/dropout-rnn/1", "--csv", str(tmp_path / "lower.csv")]) == 0
    assert capsys.readouterr().out == line
    # The same rows as `to_csv()` of a recent yfinance download writes them: Price / Ticker / Date header lines.
    download = raw_rows().drop(columns="Adj Close").set_index("Date")[["Close", "High", "Low", "Open", "Volume"]]
    download.columns = pd.MultiIndex.from_product([download.columns, ["^GSPC"]], names=["Price", "Ticker"])
    download.to_csv(tmp_path / "download.csv")
    assert (tmp_path / "download.csv").read_text().splitlines()[:3] == [
        "Price,Close,High,Low,Open,Volume",
        "Ticker,^GSPC,^GSPC,^GSPC,^GSPC,^GSPC",
        "Date,,,,,",
    ]
    assert main(["predict", "--model", CHAMPION, "--csv", str(tmp_path / "download.csv")]) == 0
    assert capsys.readouterr().out == line


@pytest.mark.parametrize(
    ("model", "csv", "message"),
    [
        ("models:/no-such-model@champion", "prices", "error: cannot load model models:/no-such-model@champion: "),
        (CHAMPION, "/no/such/prices.csv", "error: CSV file not found: /no/such/prices.csv"),
        (CHAMPION, "short", "error: model input: 5 daily rows; the model needs at least 11 (a window of 10 returns"),
        (CHAMPION, "no-close", "Model is missing inputs ['Close']."),
        ("torch", "prices", " is not a price forecaster (those are logged as 'forecaster' by train and tune)"),
    ],
    ids=["bad model", "missing file", "too few rows", "no close", "not a forecaster"],
)
def test_predict_cli_bad_input_is_one_line_exit_2(logged, tmp_path, capsys, model, csv, message):
    files = {
        "prices": raw_rows(),
        "short": raw_rows(rows=5),
        "no-close": raw_rows().drop(columns=["Close", "Adj Close"]),
    }
    if csv in files:
        files[csv].to_csv(tmp_path / "in.csv", index=False)
        csv = str(tmp_path / "in.csv")
    if model == "torch":
        path = mlflow.artifacts.download_artifacts(run_id=logged["run_id"], artifact_path="config.yaml")
        model = yaml.safe_load(Path(path).read_text())["result"]["model_uri"]
        capsys.readouterr()  # the download's progress bar
    assert main(["predict", "--model", model, "--csv", csv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_rebuilt_weights_give_the_same_output_for_every_dropout_type():
    x = torch.randn(3, 10, 5)
    for family in ("rnn", "lstm", "cnn"):
        for kind in applicable_types(family, num_layers=2):
            cfg = RunConfig().with_options(
                {"model": family, "dropout_type": kind, "dropout_rate": 0.3, "num_layers": 2, "hidden_size": 4}
            )
            torch.manual_seed(0)
            model = build_model(cfg.model, 5).eval()
            settings = serve.ForecastSettings(10, ["close", "open", "high", "low", "volume"], "Close", [0.0] * 5,
                                              [1.0] * 5, vars(cfg.model).copy())  # fmt: skip
            torch.manual_seed(1)  # other initial weights: only the state dict can make them agree
            rebuilt = settings.build(model.state_dict())
            assert torch.equal(rebuilt(x), model(x)), (family, kind)


def write_recent_csv(folder: Path) -> Path:
    path = folder / "prices.csv"
    raw_rows().to_csv(path, index=False)
    return path


def test_mlflow_models_predict_on_the_registered_champion(logged, tracking_uri, tmp_path):
    data = logged["data"]
    expected = by_hand(logged, len(data.dates) - data.window)
    mlflow_cli = shutil.which("mlflow", path=str(Path(sys.executable).parent))
    out = tmp_path / "predictions.json"
    csv = write_recent_csv(tmp_path)
    args = ["models", "predict", "-m", CHAMPION, "-i", str(csv), "-t", "csv", "--env-manager", "local", "-o", str(out)]
    result = subprocess.run(
        [mlflow_cli, *args],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = json.loads(out.read_text())["predictions"]
    assert row["date"] == "2018-12-31" and row["last_close"] == 2506.850098
    assert row["log_return"] == expected and row["close"] == 2506.850098 * math.exp(expected)


LOAD_ELSEWHERE = """
import sys
# Forget the editable install of this repository: `pipeline` must come from the model's own code.
sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
try:
    import pipeline
    print("importable before loading:", pipeline.__file__)
except ModuleNotFoundError:
    pass
import mlflow
import pandas as pd
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
import pipeline
print(pipeline.__file__)
print(repr(float(model.predict(pd.read_csv(sys.argv[3]))["log_return"].iloc[0])))
"""


def test_the_forecaster_loads_without_this_repository(logged, tracking_uri, tmp_path):
    expected = float(mlflow.pyfunc.load_model(CHAMPION).predict(raw_rows())["log_return"].iloc[0])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-c", LOAD_ELSEWHERE, tracking_uri, CHAMPION, str(write_recent_csv(tmp_path))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    package, value = result.stdout.strip().splitlines()[-2:]
    assert "importable before loading" not in result.stdout
    assert not Path(package).resolve().is_relative_to(ROOT) and Path(package).parent.parent.name == "code"
    assert float(value) == expected
