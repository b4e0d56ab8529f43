"""Stage 4 — stability: instability measures and the variance-penalised objective.

In:  loss curves from `train` (per seed: validation loss per epoch, per-batch training losses and
     gradient norms of an epoch), as plain sequences or as `SeedRun`s.
Out: plain numbers. Every spread is a population standard deviation (ddof=0), so the spread of a single
     value is 0, never NaN.

Objective (what `tune` minimises), with V = the validation losses of the last K epochs of every seed
pooled together (K = `last_k`, fewer if a seed stopped earlier) and λ = `penalty`:

    objective = mean(V) + λ · std(V)

`instability` can swap std(V) for another measure of `summarize` (e.g. seed_spread_best_val or
batch_loss_noise_rel): objective = mean(V) + λ · that measure.

A config whose validation loss is low but jumps between epochs or between seeds pays for it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import InputError
from pipeline.train import SeedRun


@dataclass
class ObjectiveConfig:
    """The loss-variance-penalised objective."""

    penalty: float = 1.0  # λ: weight of the instability term
    last_k: int = 5  # epochs per seed whose validation losses enter the objective
    instability: str = "val_loss_std"  # the instability term: one of INSTABILITY


# Measures (keys of `summarize`) the objective's penalty can use instead of the spread of V.
INSTABILITY = ("val_loss_std", "seed_spread_best_val", "epoch_jitter", "batch_loss_noise_rel", "grad_noise_cv")


def check_objective_config(cfg: ObjectiveConfig) -> None:
    if cfg.instability not in INSTABILITY:
        raise InputError(f"unknown instability measure {cfg.instability!r}: choose one of {', '.join(INSTABILITY)}")
    if cfg.last_k < 1:
        raise InputError(f"last_k must be at least 1, got {cfg.last_k}")
    if not (math.isfinite(cfg.penalty) and cfg.penalty >= 0):  # a negative λ would reward unstable configs
        raise InputError(f"penalty must be a finite number >= 0, got {cfg.penalty}")


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
    """std / mean; used for gradient noise (per-batch gradient norms). 0 for a zero mean."""
    array = np.asarray(values, dtype=np.float64)
    mean = array.mean()
    return float(array.std() / mean) if mean != 0 else 0.0


def batch_loss_noise(batch_losses: Sequence[float], width: int = 5) -> tuple[float, float]:
    """Noise of the per-batch training loss around its trend: (std of residuals, that std / mean loss).

    The trend is a centred moving average of `width` (odd) batches, so a loss that is still falling is
    not mistaken for noise; residuals exist for the batches with a full window around them. The relative
    value divides by the mean loss, so that a higher loss level is not mistaken for more noise. With
    fewer than `width` batches there is no trend to remove: the plain std is used.
    """
    losses = np.asarray(batch_losses, dtype=np.float64)
    if losses.size < width:
        residuals = losses - losses.mean()
    else:
        trend = np.convolve(losses, np.ones(width) / width, mode="valid")  # trend[i] centred on i + width // 2
        residuals = losses[width // 2 : width // 2 + trend.size] - trend
    noise = float(residuals.std())
    mean = losses.mean()
    return noise, noise / mean if mean != 0 else 0.0


@dataclass(frozen=True)
class Convergence:
    best_epoch: int  # 1-based epoch of the lowest validation loss
    train_loss_drop: float  # (first - last epoch train loss) / first: how far the training loss fell
    val_flat: bool  # the validation curve moved less than `tolerance` (relative range): nothing converged
    epochs_to_within: int | None  # first epoch within `tolerance` of the best val loss; None when flat


def convergence(val_curve: Sequence[float], train_curve: Sequence[float], tolerance: float = 0.01) -> Convergence:
    """Convergence of one seed's curves. "Within x% of best" is only meaningful when the validation curve
    moves; on a flat curve every epoch is within x% of the best, so it is reported as None."""
    val = np.asarray(val_curve, dtype=np.float64)
    best = float(val.min())
    flat = bool((val.max() - best) <= tolerance * abs(best))
    within = None if flat else int(np.argmax(val <= best * (1 + tolerance))) + 1
    first, last = train_curve[0], train_curve[-1]
    return Convergence(int(val.argmin()) + 1, (first - last) / first if first else 0.0, flat, within)


def summarize(runs: Sequence[SeedRun], cfg: ObjectiveConfig, naive_val_loss: float) -> dict[str, float]:
    """The objective, its parts and the instability measures of one config over its seeds (means over
    seeds unless the name says otherwise); `docs/metrics.md` gives each formula."""
    score = objective([run.val_curve for run in runs], cfg)
    tails = [run.history[-cfg.last_k :] for run in runs]  # the last K epochs of each seed
    noise = [batch_loss_noise([loss for stats in tail for loss in stats.batch_losses]) for tail in tails]
    fits = [convergence(run.val_curve, [s.train_loss for s in run.history]) for run in runs]
    best_val = [run.best_val for run in runs]
    within = [fit.epochs_to_within for fit in fits if fit.epochs_to_within is not None]
    metrics = {
        "objective": score.value,
        "val_loss_mean": score.val_mean,
        "val_loss_std": score.val_std,
        "best_val_loss_mean": float(np.mean(best_val)),
        "seed_spread_best_val": seed_spread(best_val),
        "seed_spread_final_val": seed_spread([run.val_curve[-1] for run in runs]),
        "epoch_jitter": float(np.mean([epoch_jitter(run.val_curve, cfg.last_k) for run in runs])),
        "batch_loss_noise": float(np.mean([n[0] for n in noise])),
        "batch_loss_noise_rel": float(np.mean([n[1] for n in noise])),
        "grad_noise_cv": float(
            np.mean([coefficient_of_variation([g for stats in tail for g in stats.grad_norms]) for tail in tails])
        ),
        "best_epoch_mean": float(np.mean([fit.best_epoch for fit in fits])),
        "train_loss_drop": float(np.mean([fit.train_loss_drop for fit in fits])),
        "val_flat_fraction": float(np.mean([fit.val_flat for fit in fits])),
        "generalisation_gap": float(
            np.mean([run.best_val - run.history[run.best_epoch - 1].train_loss for run in runs])
        ),
        "best_val_vs_naive": float(np.mean(best_val)) / naive_val_loss,
        "epochs_trained_mean": float(np.mean([len(run.history) for run in runs])),
    }
    if within:  # only seeds whose validation curve was not flat
        metrics["epochs_to_within_1pct"] = float(np.mean(within))
    # The default (val_loss_std) is exactly mean(V) + λ·std(V); other measures swap in their own spread.
    metrics["objective"] = score.val_mean + cfg.penalty * metrics[cfg.instability]
    return metrics
