"""Stage 7 — final model: retrain a config, test it against the naive forecast, log and register it.

In:  a `RunConfig` (e.g. the tuned best config) and its `Windows`.
Out: `FinalResult` (the best seed's model, the objective and instability measures, test losses, the
     registry decision) and, in the active MLflow run: summary metrics, the PyTorch model `model`
     (signature and input example), the pyfunc forecaster `forecaster` (`pipeline.serve`: price rows in,
     next-day forecast out), registered as `dropout-<family>`, and the config as a YAML artifact.

The test split is touched only here, once per final model. The naive forecast is "tomorrow's return is
zero"; in the scaled units the models see, that is the constant (0 - mean) / std of train returns.
Losses are in those scaled units, except `test_mse_log_return` (× the train std of close returns², the
first ticker's when several are pooled): in log-return units, what the registry's champion alias is decided on.

Both models are kept: the forecaster is what people use (raw prices in, a return and a price out, no
scaler to carry around); the PyTorch model (`mlflow.pytorch.load_model`) is the plain `nn.Module` on
scaled windows for torch users (and what `best_config.yaml`'s `model_uri` names); its torch.export takes
2-3 s per job here, the forecaster ~0.2 s to log and ~0.1 s to register.
"""

from __future__ import annotations

import sys
import warnings
from dataclasses import dataclass
from typing import Any

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from torch import nn

from pipeline import serve
from pipeline.config import RunConfig
from pipeline.stability import summarize
from pipeline.tracking import log_config
from pipeline.train import EpochHook, SeedRun, mse, train_seeds
from pipeline.windows import Windows


@dataclass
class FinalResult:
    model: nn.Module  # the seed with the lowest best validation loss, at its best epoch, eval mode
    runs: list[SeedRun]
    summary: dict[str, float]  # objective, its parts and instability measures over all seeds
    test_loss: float
    naive_test_loss: float
    close_scale: float = 1.0  # the scaler's std of train close returns: scaled losses x close_scale² = log-return²
    registration: serve.Registration | None = None  # set by `fit_and_log` when it registers the forecaster

    @property
    def test_mse_log_return(self) -> float:
        """Test MSE in log-return units, comparable across models with different scalers."""
        return self.test_loss * self.close_scale**2

    @property
    def test_skill(self) -> float:
        """1 - test / naive: above 0 means the model beats the zero-return forecast on test."""
        return 1.0 - self.test_loss / self.naive_test_loss


def fit_final(cfg: RunConfig, data: Windows, on_epoch: EpochHook | None = None) -> FinalResult:
    """Train `cfg` with all its seeds, keep the best seed's best epoch, evaluate it on test."""
    runs = train_seeds(cfg.model, cfg.train, data, on_epoch)
    best = min(runs, key=lambda run: run.best_val)
    model = best.best_model()
    inputs, targets = data.split("test")
    return FinalResult(
        model=model,
        runs=runs,
        summary=summarize(runs, cfg.objective, data.naive_loss("val")),
        test_loss=mse(model, inputs, targets),
        naive_test_loss=data.naive_loss("test"),
        close_scale=float(data.scaler.scale_[data.feature_names.index("close")]),
    )


def final_metrics(result: FinalResult) -> dict[str, float]:
    return {
        **result.summary,
        "test_loss": result.test_loss,
        "naive_test_loss": result.naive_test_loss,
        "test_skill": result.test_skill,
        "test_mse_log_return": result.test_mse_log_return,
    }


def log_final_model(result: FinalResult, data: Windows) -> str:
    """Log the model to the active run as `model`; return its URI.

    torch.export (MLflow's default `pt2` format) needs an input example; the signature it yields fixes
    the window length and feature count and keeps the batch size dynamic.
    """
    example = data.inputs(data.starts["test"][:2]).numpy().astype(np.float32)  # (2, window, F)
    with warnings.catch_warnings():
        # torch.export notes that nn.RNN refreshes its `_flat_weights` list while tracing; harmless.
        warnings.filterwarnings("ignore", message=r"The tensor attributes .*_flat_weights")
        info = mlflow.pytorch.log_model(
            result.model.eval(),
            name="model",
            input_example=example,
            # Listing requirements skips MLflow's slow inference of them (~20 s -> ~1.5 s).
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"],
        )
    return info.model_uri


def result_record(result: FinalResult, **extra: Any) -> dict[str, Any]:
    """What to store next to the config: the metrics, rounded for reading, plus `extra`."""
    rounded = {k: round(v, 6) for k, v in final_metrics(result).items()}
    rounded["test_mse_log_return"] = float(f"{result.test_mse_log_return:.6g}")  # ~1e-4: keep 6 digits
    return {**extra, **rounded}


def fit_and_log(
    cfg: RunConfig,
    data: Windows,
    config_name: str,
    on_epoch: EpochHook | None = None,
    **record: Any,
) -> tuple[FinalResult, str]:
    """`fit_final`, then log its metrics, both models and the config (with the result) to the active run,
    and register the forecaster as `dropout-<family>` (`record` also goes into the version's tags).

    Returns the result and the URI to use: the registered version (`models:/dropout-rnn/3`), or the
    forecaster's own URI when the registry refused (e.g. a tracking server without one).
    """
    result = fit_final(cfg, data, on_epoch)
    metrics = final_metrics(result)
    mlflow.log_metrics(metrics)
    torch_uri = log_final_model(result, data)
    model_uri = serve.log_forecaster(result.model, cfg, data)
    tags = serve.version_tags(cfg, data, metrics, mlflow.active_run().info.run_id, **record)
    try:
        result.registration = serve.register(model_uri, serve.registered_name(cfg.model.model), tags)
    except MlflowException as exc:  # e.g. a tracking server without a model registry
        print(f"warning: the forecaster is logged but not registered: {exc}", file=sys.stderr)
    registered = result.registration.uri if result.registration else ""
    # On the run too, so the UI's run page and the study report say where the model went and why.
    decision = result.registration.reason if result.registration else "not registered"
    mlflow.set_tags({"registered_model": registered or "none", "champion_decision": decision})
    extra = result_record(result, model_uri=torch_uri, forecaster_uri=model_uri, registered_model=registered, **record)
    log_config(cfg, config_name, extra=extra)
    return result, registered or model_uri
