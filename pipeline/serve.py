"""Stage 8 — serve: the final model as a next-day forecaster people can load, and its place in the registry.

In:  a trained model, its `RunConfig` and its `Windows` (feature settings and the fitted scaler).
Out: in the active run, the MLflow pyfunc model `forecaster`, registered as `dropout-<family>` with
     version tags (dropout, objective, data range, test loss); the alias `champion` is moved to the new
     version only when it beats the champion on the same test period.

The forecaster takes a DataFrame of the most recent daily prices and returns one row: the date of the
last input row, the forecast log return of the next day's close (unscaled) and the implied price
`last_close · exp(log_return)`. Input layouts are those `ingest` reads: dates as a `Date` column or a
Date index, column names in any spelling, Adj Close present or not, any numeric dtype; the rows are
cleaned by ingest's `clean_prices` (`clean_prices_with_report`) and turned into features by
`windows.make_features`, so serving computes exactly what training saw. It needs at least `window + 1`
rows (each return is against the previous close) and uses the last `window + 1`.

What it bundles, so that it loads outside this repository:
- `settings.json`: window, feature names, price column, the scaler's mean and scale per feature and
  the `ModelConfig`. The scaler is `Windows.scaler`, fitted on the train part; with several pooled
  tickers that is the first ticker's scaler, so the forecaster is calibrated for that ticker.
- `weights.pt`: the model's state dict; `load_context` rebuilds the module with `models.build_model`.
- the `pipeline` package itself (`code_paths`), for cleaning, features and the model classes, and a
  three-line model file (MLflow's "models from code") instead of a pickled instance.

Signature: named columns (Date, Open, High, Low, Close, Adj Close, Volume), each of MLflow type `Any`;
the ones the model's features need are required. `Any`, not `double`: MLflow refuses int64 -> double
(a CSV's Volume column, or whole-number prices) and float64 for a float32 spec; the values are
checked and converted to float64 by ingest's cleaning instead, with messages naming the bad cell.
MLflow matches signature names exactly and drops other columns, so through `mlflow.pyfunc` and
`mlflow models predict` the columns must be spelled as in the signature (`python -m pipeline predict`
renames them first; `PriceForecaster.predict` itself accepts any spelling).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types.schema import AnyType, ColSpec, Schema
from torch import nn

from pipeline.cache import flatten_download
from pipeline.clean import ALIASES, canonical_price_column, clean_prices, column_key, read_price_csv
from pipeline.config import RunConfig
from pipeline.errors import InputError
from pipeline.models import ModelConfig, build_model, dropout_effective
from pipeline.windows import Windows, make_features

ALIAS = "champion"
ARTIFACT = "forecaster"  # the pyfunc model's name in the run
SOURCE = "model input"  # how cleaning messages name the data
INPUT_COLUMNS = ("Date", "Open", "High", "Low", "Close", "Adj Close", "Volume")
FEATURE_COLUMN = {"open": "Open", "high": "High", "low": "Low", "volume": "Volume"}  # close: the price column
# The test period two versions must share before their test MSEs are compared.
SAME_TEST = ("data_source", "price_column", "test_first_date", "test_last_date")


def registered_name(family: str) -> str:
    return f"dropout-{family}"


# --- settings and the forecast itself ------------------------------------------------------------


@dataclass
class ForecastSettings:
    """What turns price rows into the model's input, and its output back into a return."""

    window: int
    feature_names: list[str]
    price_column: str  # "Close" or "Adj Close": the close that features and forecast refer to
    scaler_mean: list[float]  # per feature, StandardScaler.mean_ of the train part
    scaler_scale: list[float]  # per feature, StandardScaler.scale_
    model: dict[str, Any]  # asdict(ModelConfig)

    @classmethod
    def from_training(cls, cfg: RunConfig, data: Windows) -> ForecastSettings:
        return cls(
            window=data.window,
            feature_names=list(data.feature_names),
            price_column=canonical_price_column(cfg.ingest.price_column),
            scaler_mean=[float(v) for v in data.scaler.mean_],
            scaler_scale=[float(v) for v in data.scaler.scale_],
            model=asdict(cfg.model),
        )

    def required_columns(self) -> list[str]:
        """The price columns the features need (Adj Close models also need Close to adjust Open/High/Low)."""
        needed = {self.price_column} | {FEATURE_COLUMN[f] for f in self.feature_names if f in FEATURE_COLUMN}
        if self.price_column == "Adj Close" and needed & {"Open", "High", "Low"}:
            needed.add("Close")
        return [c for c in INPUT_COLUMNS if c in needed]

    def build(self, state_dict: dict[str, torch.Tensor]) -> nn.Module:
        model = build_model(ModelConfig(**self.model), len(self.feature_names))
        model.load_state_dict(state_dict)
        return model.eval()

    def unscale(self, scaled: float) -> float:
        """A scaled close-return forecast -> log return (the scaler of the `close` feature, inverted)."""
        k = self.feature_names.index("close")
        return scaled * self.scaler_scale[k] + self.scaler_mean[k]


def canonical_input(frame: pd.DataFrame) -> pd.DataFrame:
    """Rename date and price columns to their canonical spelling and drop the rest; a date column
    (any spelling), else a date index, becomes the `Date` index; a yfinance download's (Price, Ticker)
    columns are flattened. Values are left as they are."""
    frame = flatten_download(frame, SOURCE)
    dates = [c for c in frame.columns if column_key(c) == "date"]
    if dates:
        frame = frame.set_index(dates[0])
    elif not isinstance(frame.index, pd.DatetimeIndex) and column_key(frame.index.name) != "date":
        raise InputError(f"{SOURCE}: no dates: give a Date column or a Date index")
    frame.index.name = "Date"
    names: dict[Any, str] = {}
    for column in frame.columns:
        name = ALIASES.get(column_key(column))
        if name and name not in names.values():
            names[column] = name
    return frame[list(names)].rename(columns=names)


def forecast(model: nn.Module, settings: ForecastSettings, frame: pd.DataFrame) -> pd.DataFrame:
    """The next-day forecast after the last row of `frame`: date, last close, log return, implied close."""
    raw = canonical_input(frame)
    missing = [c for c in settings.required_columns() if c not in raw.columns]
    if missing:
        raise InputError(
            f"{SOURCE}: no {', '.join(missing)} column (the model's features {', '.join(settings.feature_names)} "
            f"need {', '.join(settings.required_columns())}; found: {', '.join(map(str, frame.columns)) or 'none'})"
        )
    prices = clean_prices(raw, SOURCE, settings.price_column)
    window = settings.window
    if len(prices) < window + 1:
        raise InputError(
            f"{SOURCE}: {len(prices)} daily rows; the model needs at least {window + 1} "
            f"(a window of {window} returns, each against the previous close)"
        )
    features = make_features(prices.iloc[-(window + 1) :])[settings.feature_names]  # (window, F)
    # Same arithmetic as StandardScaler.transform in float64, then float32 as in `windows.make_windows`.
    scaled = (features.to_numpy(np.float64) - settings.scaler_mean) / settings.scaler_scale
    inputs = torch.from_numpy(scaled.astype(np.float32)).unsqueeze(0)  # (1, window, F)
    model.eval()
    with torch.no_grad():
        log_return = settings.unscale(float(model(inputs)[0]))
    last_close = float(prices["Close"].iloc[-1])
    return pd.DataFrame(
        {
            "date": [prices.index[-1].strftime("%Y-%m-%d")],
            "last_close": [last_close],
            "log_return": [log_return],
            "close": [last_close * math.exp(log_return)],
        }
    )


class PriceForecaster(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc: recent daily price rows in, the next day's forecast out (see the module docstring)."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        data = json.loads(Path(context.artifacts["settings"]).read_text())
        self.settings = ForecastSettings(**data)
        weights = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        self.model = self.settings.build(weights)

    def predict(
        self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        return forecast(self.model, self.settings, model_input)


# --- logging --------------------------------------------------------------------------------------


def signature(settings: ForecastSettings) -> ModelSignature:
    required = set(settings.required_columns())
    inputs = Schema([ColSpec(AnyType(), c, required=c in required) for c in INPUT_COLUMNS])
    numbers = [ColSpec("double", c) for c in ("last_close", "log_return", "close")]
    outputs = Schema([ColSpec("string", "date"), *numbers])
    return ModelSignature(inputs=inputs, outputs=outputs)


def requirements() -> list[str]:
    """Pinned requirements of the forecaster (listing them skips MLflow's ~20 s inference)."""
    names = ("torch", "mlflow", "pandas", "numpy", "scikit-learn")
    return [f"{name}=={version(name).split('+')[0]}" for name in names]


def input_example(cfg: RunConfig, data: Windows) -> pd.DataFrame:
    """The last `window + 1` price rows of the (first ticker's) train part, laid out as a CSV reads (Date as
    text)."""
    rows = data.prices.loc[: data.target_dates("train").max()].tail(data.window + 1)
    if canonical_price_column(cfg.ingest.price_column) == "Adj Close":
        rows = rows.assign(**{"Adj Close": rows["Close"]})  # cleaned rows are adjusted already: factor 1
    example = rows.reset_index()
    example["Date"] = example["Date"].dt.strftime("%Y-%m-%d")
    return example


def package_copy(folder: Path) -> Path:
    """A copy of the `pipeline` package without caches, for `code_paths`."""
    target = folder / "pipeline"
    shutil.copytree(Path(__file__).resolve().parent, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """Without MLflow's download progress bars (logging validates the input example by loading the model
    back; loading prints them too), which would bury the one line a command prints."""
    name, old = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
    os.environ[name] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# "Models from code": MLflow stores this file instead of a cloudpickle of the instance; loading runs it
# with the bundled `pipeline` package on sys.path.
MODEL_CODE = """from mlflow.models import set_model

from pipeline.serve import PriceForecaster

set_model(PriceForecaster())
"""


def log_forecaster(model: nn.Module, cfg: RunConfig, data: Windows) -> str:
    """Log the pyfunc forecaster to the active run as `forecaster`; return its model URI."""
    settings = ForecastSettings.from_training(cfg, data)
    with tempfile.TemporaryDirectory() as tmp, no_progress_bars():
        folder = Path(tmp)
        (folder / "settings.json").write_text(json.dumps(asdict(settings), indent=2))
        torch.save(model.state_dict(), folder / "weights.pt")
        (folder / "forecaster.py").write_text(MODEL_CODE)
        info = mlflow.pyfunc.log_model(
            name=ARTIFACT,
            python_model=str(folder / "forecaster.py"),
            artifacts={"settings": str(folder / "settings.json"), "weights": str(folder / "weights.pt")},
            code_paths=[str(package_copy(folder))],
            signature=signature(settings),
            input_example=input_example(cfg, data),
            pip_requirements=requirements(),
        )
    return info.model_uri


# --- registry -------------------------------------------------------------------------------------


@dataclass
class Registration:
    name: str
    version: str
    champion: bool  # whether this version holds the `champion` alias now
    reason: str  # why the alias moved or not, in words

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def data_source(cfg: RunConfig) -> str:
    """The data a model was trained and tested on: the CSV's absolute path, or the ticker(s)."""
    if cfg.ingest.csv:
        return str(Path(cfg.ingest.csv).resolve())
    return cfg.ingest.tickers or cfg.ingest.ticker


def version_tags(cfg: RunConfig, data: Windows, metrics: dict[str, float], run_id: str, **extra: Any) -> dict[str, str]:
    """Tags of a model version: dropout, objective, data range (target dates of each part), test losses.

    Numbers are written with `repr`, so comparing them later is exact.
    """
    train, test = data.target_dates("train").sort_values(), data.target_dates("test").sort_values()  # pooled: any order
    tags = {
        "family": cfg.model.model,
        "dropout_type": cfg.model.dropout_type,
        "dropout_rate": repr(float(cfg.model.dropout_rate)),
        "dropout_effective": str(dropout_effective(cfg.model)).lower(),
        "objective": repr(float(metrics["objective"])),
        "objective_penalty": repr(float(cfg.objective.penalty)),
        "objective_instability": cfg.objective.instability,
        "data_source": data_source(cfg),
        "price_column": canonical_price_column(cfg.ingest.price_column),
        "window": str(data.window),
        "train_first_date": f"{train[0]:%Y-%m-%d}",
        "train_last_date": f"{train[-1]:%Y-%m-%d}",
        "test_first_date": f"{test[0]:%Y-%m-%d}",
        "test_last_date": f"{test[-1]:%Y-%m-%d}",
        "test_loss": repr(float(metrics["test_loss"])),  # MSE in scaled units, as the run's metric
        "test_mse_log_return": repr(float(metrics["test_mse_log_return"])),  # what champions are compared on
        "naive_test_loss": repr(float(metrics["naive_test_loss"])),
        "run_id": run_id,
    }
    return {**tags, **{k: str(v) for k, v in extra.items()}}


def register(model_uri: str, name: str, tags: dict[str, str]) -> Registration:
    """Register `model_uri` as a new version of `name` with `tags`, then decide on the champion alias."""
    client = MlflowClient()
    registered = mlflow.register_model(model_uri, name, tags=tags)
    moved, reason = promote(client, name, str(registered.version), tags)
    client.set_model_version_tag(name, registered.version, "champion_decision", reason)
    return Registration(name, str(registered.version), moved, reason)


def promote(client: MlflowClient, name: str, new_version: str, tags: dict[str, str]) -> tuple[bool, str]:
    """Move `champion` to `new_version` if there is none, or if the new version's test MSE (in log-return
    units) is lower on the same data and test period. Returns (moved, why)."""
    champion = client.get_registered_model(name).aliases.get(ALIAS)
    if champion is None:
        client.set_registered_model_alias(name, ALIAS, new_version)
        return True, f"no champion yet: version {new_version} is champion"
    if str(champion) == new_version:
        return True, f"version {new_version} is champion"
    held = client.get_model_version(name, str(champion)).tags
    differs = [k for k in SAME_TEST if held.get(k) != tags.get(k)]
    if differs:
        what = "; ".join(f"{k} {tags.get(k)} vs {held.get(k, 'unknown')}" for k in differs)
        return False, (
            f"not compared with champion version {champion}: different test data ({what}); "
            f"champion stays version {champion}"
        )
    new, old = float(tags["test_mse_log_return"]), float(held["test_mse_log_return"])
    period = f"{tags['data_source']} {tags['test_first_date']}..{tags['test_last_date']}"
    if new < old:
        client.set_registered_model_alias(name, ALIAS, new_version)
        return True, (
            f"test MSE {new:.6g} < {old:.6g} of champion version {champion} on {period}: "
            f"version {new_version} is champion"
        )
    return False, (
        f"test MSE {new:.6g} >= {old:.6g} of champion version {champion} on {period}: champion stays version {champion}"
    )


# --- using a logged forecaster --------------------------------------------------------------------


def load_forecaster(model_uri: str) -> mlflow.pyfunc.PyFuncModel:
    """Load a forecaster logged by this module; InputError for a bad URI or another kind of model."""
    try:
        with no_progress_bars():
            model = mlflow.pyfunc.load_model(model_uri)
    except Exception as exc:  # MLflow raises several types for a missing model, alias, run or path
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot load model {model_uri}: {first}") from None
    try:
        ok = isinstance(model.unwrap_python_model(), PriceForecaster)
    except MlflowException:
        ok = False
    if not ok:
        raise InputError(f"{model_uri} is not a price forecaster (those are logged as '{ARTIFACT}' by train and tune)")
    return model


def read_input_csv(path: Path) -> pd.DataFrame:
    """A price CSV in any layout ingest reads, with columns renamed to the signature's spelling."""
    return canonical_input(read_price_csv(path).rename_axis("Date"))


def predict_frame(model: mlflow.pyfunc.PyFuncModel, frame: pd.DataFrame, source: str) -> pd.DataFrame:
    """`model.predict(frame)`, with MLflow's schema errors turned into one InputError line."""
    try:
        return model.predict(frame)
    except MlflowException as exc:  # keep MLflow's reason, not its dump of the whole input
        reason = str(exc).rsplit("Error: ", 1)[-1].strip().splitlines()[0]
        raise InputError(f"{source}: {reason}") from None


def forecast_line(row: pd.Series, price_column: str) -> str:
    return (
        f"forecast for the day after {row['date']}: log return {row['log_return']:+.6f}, "
        f"implied {price_column} {row['close']:.2f} (last {row['last_close']:.2f})"
    )


def registry_lines(registration: Registration | None, model_uri: str) -> str:
    """What the CLI prints about the registered forecaster (indented lines, no trailing newline)."""
    if registration is None:
        return f"  forecaster {model_uri} (not registered)"
    champion = f"models:/{registration.name}@{ALIAS}"
    return (
        f"  registered {registration.uri}: {registration.reason}\n"
        f"  forecast: python -m pipeline predict --model {champion} --csv <recent prices.csv>"
    )
