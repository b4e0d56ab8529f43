"""Stage 4 — stability: instability measures and the variance-penalised objective.

In:  loss curves from `train` (per seed: validation loss per epoch, per-batch training losses and
     gradient norms of an epoch), as plain sequences or as `SeedRun`s.
Out: plain numbers. Every spread is a population standard deviation (ddof=0), so the spread of a single
     value is 0, never NaN.

Objective (what `tune` minimises), with V = the validation losses of the last K epochs of every seed
pooled together (K = `last_k`, fewer if a seed stopped earlier) and λ = `penalty`:

    objective = mean(V) + λ · std(V)

A config whose validation loss is low but jumps between epochs or between seeds pays for it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.train import SeedRun


@dataclass
class ObjectiveConfig:
    """The loss-variance-penalised objective."""

    penalty: float = 1.0  # λ: weight of the spread of validation losses
    last_k: int = 5  # epochs per seed whose validation losses enter the objective


@dataclass(frozen=True)
class Objective:
    value: float  # mean + penalty * std
    val_mean: float
    val_std: float
    n_values: int


def objective(val_curves: Sequence[Sequence[float]], cfg: ObjectiveConfig) -> Objective:
    """The objective over the last `cfg.last_k` validation losses of each seed's curve."""
    if cfg.last_k < 1:
        raise ValueError(f"last_k must be at least 1, got {cfg.last_k}")
    values = np.concatenate([np.asarray(curve[-cfg.last_k :], dtype=np.float64) for curve in val_curves])
    if values.size == 0:
        raise ValueError("no validation losses to score")
    mean, std = float(values.mean()), float(values.std())
    return Objective(mean + cfg.penalty * std, mean, std, int(values.size))


def epoch_jitter(val_curve: Sequence[float], last_k: int) -> float:
    """Std of the epoch-to-epoch changes of the validation loss over the last `last_k` epochs (0 if < 2)."""
    tail = np.asarray(val_curve[-last_k:], dtype=np.float64)
    return float(np.diff(tail).std()) if tail.size >= 2 else 0.0


def seed_spread(values: Sequence[float]) -> float:
    """Std across seeds of one number per seed (e.g. each seed's best validation loss)."""
    return float(np.std(np.asarray(values, dtype=np.float64)))


def coefficient_of_variation(values: Sequence[float]) -> float:
    """std / mean; used for gradient noise (per-batch gradient norms of an epoch). 0 for a zero mean."""
    array = np.asarray(values, dtype=np.float64)
    mean = array.mean()
    return float(array.std() / mean) if mean != 0 else 0.0


def summarize(runs: Sequence[SeedRun], cfg: ObjectiveConfig) -> dict[str, float]:
    """The objective, its parts and the instability measures of one config trained over several seeds."""
    score = objective([run.val_curve for run in runs], cfg)
    return {
        "objective": score.value,
        "val_loss_mean": score.val_mean,
        "val_loss_std": score.val_std,
        "best_val_loss_mean": float(np.mean([run.best_val for run in runs])),
        "seed_spread_best_val": seed_spread([run.best_val for run in runs]),
        "seed_spread_final_val": seed_spread([run.val_curve[-1] for run in runs]),
        "epoch_jitter": float(np.mean([epoch_jitter(run.val_curve, cfg.last_k) for run in runs])),
        "batch_loss_std_last": float(np.mean([run.history[-1].train_loss_std for run in runs])),
        "grad_noise_cv": float(np.mean([coefficient_of_variation(run.history[-1].grad_norms) for run in runs])),
        "epochs_trained_mean": float(np.mean([len(run.history) for run in runs])),
    }
