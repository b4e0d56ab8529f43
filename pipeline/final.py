"""Stage 7 — final model: retrain a config, test it against the naive forecast, log it to MLflow.

In:  a `RunConfig` (e.g. the tuned best config) and its `Windows`.
Out: `FinalResult` (the best seed's model, the objective and instability measures, test losses) and,
     in the active MLflow run: summary metrics, the PyTorch model (signature and input example) and the
     config as a YAML artifact next to it.

The test split is touched only here, once per final model. The naive forecast is "tomorrow's return is
zero"; in the scaled units the models see, that is the constant (0 - mean) / std of train returns.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from torch import nn

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
    )


def final_metrics(result: FinalResult) -> dict[str, float]:
    return {
        **result.summary,
        "test_loss": result.test_loss,
        "naive_test_loss": result.naive_test_loss,
        "test_skill": result.test_skill,
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
    return {**extra, **{k: round(v, 6) for k, v in final_metrics(result).items()}}


def fit_and_log(
    cfg: RunConfig, data: Windows, config_name: str, on_epoch: EpochHook | None = None, **record: Any
) -> tuple[FinalResult, str]:
    """`fit_final`, then log its metrics, model and config (with the result) to the active run."""
    result = fit_final(cfg, data, on_epoch)
    mlflow.log_metrics(final_metrics(result))
    model_uri = log_final_model(result, data)
    log_config(cfg, config_name, extra=result_record(result, model_uri=model_uri, **record))
    return result, model_uri
