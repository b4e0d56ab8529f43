"""Training: it learns what is learnable, it is reproducible per seed, it stops on divergence."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.models import ModelConfig
from pipeline.train import (
    DivergedError,
    EpochStats,
    SeedRun,
    TrainConfig,
    epoch_metrics,
    mse,
    train_seeds,
    train_validation,
)
from pipeline.windows import WindowConfig, make_windows


def ar1_prices(n: int = 1500, phi: float = 0.8, seed: int = 0) -> pd.DataFrame:
    """Close prices whose daily log return follows r_t = phi * r_{t-1} + noise: predictable, R² ≈ phi²."""
    rng = np.random.default_rng(seed)
    returns = np.zeros(n)
    for t in range(1, n):
        returns[t] = phi * returns[t - 1] + rng.normal(0, 0.01)
    dates = pd.bdate_range("2000-01-03", periods=n, name="Date")
    return pd.DataFrame({"Close": 100 * np.exp(np.cumsum(returns))}, index=dates)


@pytest.fixture(scope="module")
def ar1_windows():
    return make_windows(ar1_prices(), WindowConfig(window=10))


def test_training_learns_a_learnable_series(ar1_windows):
    runs = train_seeds(
        ModelConfig(model="lstm", hidden_size=16), TrainConfig(max_epochs=8, seeds=1, lr=5e-3), ar1_windows
    )
    run = runs[0]
    first, last = run.history[0], run.history[-1]
    assert last.train_loss < 0.6 * first.train_loss
    # Scaled returns have variance ~1 on train; an AR(1) with phi=0.8 leaves 1 - 0.64 = 0.36 unexplained.
    val_inputs, val_targets = ar1_windows.split("val")
    naive_loss = ar1_windows.naive_loss("val")
    assert run.best_val < 0.6 * naive_loss
    assert mse(run.best_model(), val_inputs, val_targets) == pytest.approx(run.best_val)


def test_a_seed_gives_the_same_run_alone_or_beside_other_seeds(ar1_windows):
    model_cfg = ModelConfig(model="rnn", hidden_size=8, dropout_type="standard", dropout_rate=0.3)
    cfg = TrainConfig(max_epochs=2, seeds=2, seed=5)
    together = train_seeds(model_cfg, cfg, ar1_windows)
    alone = SeedRun(model_cfg, cfg, ar1_windows, seed=6)
    alone.step()
    alone.step()
    assert together[1].seed == 6
    assert together[1].val_curve == alone.val_curve
    assert [s.batch_losses for s in together[1].history] == [s.batch_losses for s in alone.history]
    assert together[0].val_curve != together[1].val_curve


def test_early_stopping_and_epoch_stats(ar1_windows):
    cfg = TrainConfig(max_epochs=30, patience=1, seeds=1, lr=0.05)
    run = train_seeds(ModelConfig(model="cnn", hidden_size=8), cfg, ar1_windows)[0]
    epochs = len(run.history)
    assert run.done
    assert epochs == cfg.max_epochs or epochs - run.best_epoch == cfg.patience
    stats = run.history[-1]
    n_batches = math.ceil(len(ar1_windows.starts["train"]) / cfg.batch_size)
    assert len(stats.batch_losses) == len(stats.grad_norms) == n_batches
    assert stats.train_loss == pytest.approx(float(np.mean(stats.batch_losses)), rel=1e-6)
    assert stats.train_loss_std == pytest.approx(float(np.std(stats.batch_losses)), rel=1e-5)
    assert stats.grad_norm == pytest.approx(float(np.mean(stats.grad_norms)), rel=1e-6)
    assert run.best_val == min(run.val_curve)


def test_non_finite_loss_raises_diverged(ar1_windows):
    broken = make_windows(ar1_prices(), WindowConfig(window=10))
    broken.features[100, 0] = float("nan")  # one bad training row
    with pytest.raises(DivergedError, match=r"non-finite training loss at epoch 1, batch \d+ \(seed 0\)"):
        train_seeds(ModelConfig(model="rnn", hidden_size=4), TrainConfig(max_epochs=2, seeds=1), broken)


def test_epoch_metrics_are_means_over_seeds_plus_each_seed():
    stats = [
        EpochStats(seed=0, epoch=3, train_loss=1.0, train_loss_std=0.2, grad_norm=4.0, val_loss=0.5),
        EpochStats(seed=1, epoch=3, train_loss=3.0, train_loss_std=0.4, grad_norm=2.0, val_loss=0.7),
    ]
    assert epoch_metrics(stats) == pytest.approx(
        {
            "train_loss": 2.0,
            "train_loss_std": 0.3,
            "grad_norm": 3.0,
            "val_loss": 0.6,
            "val_loss_seed0": 0.5,
            "val_loss_seed1": 0.7,
        }
    )


def test_walk_forward_trains_every_seed_on_every_fold():
    data = make_windows(ar1_prices(600), WindowConfig(window=10, folds=3))
    model_cfg = ModelConfig(model="rnn", hidden_size=4)
    cfg = TrainConfig(max_epochs=2, seeds=2, seed=7)
    epochs: list[list[EpochStats]] = []
    runs = train_validation(model_cfg, cfg, data, lambda _epoch, stats: epochs.append(stats))
    assert [(run.fold, run.seed) for run in runs] == [(1, 7), (1, 8), (2, 7), (2, 8), (3, 7), (3, 8)]
    for run, fold in zip(runs, [f for f in data.folds for _ in range(2)], strict=True):
        assert run.data is fold
        # Validated on its own fold: the best weights give the logged best loss on that fold's val part.
        assert mse(run.best_model(), *fold.split("val")) == pytest.approx(run.best_val)
    # Seed 7 starts from the same weights on every fold; the folds' train parts then make them differ.
    first, last = (SeedRun(model_cfg, cfg, data.folds[k], 7).model.state_dict() for k in (0, 2))
    assert all(torch.equal(first[name], last[name]) for name in first)
    assert runs[0].val_curve != runs[2].val_curve
    assert sorted(epoch_metrics(epochs[0])) == sorted(
        ["train_loss", "train_loss_std", "grad_norm", "val_loss"]
        + [f"val_loss_fold{f}_seed{s}" for f in (1, 2, 3) for s in (7, 8)]
    )
    assert epoch_metrics(epochs[0])["val_loss_fold2_seed8"] == runs[3].history[0].val_loss


def test_without_folds_train_validation_is_train_seeds(ar1_windows):
    model_cfg, cfg = ModelConfig(model="rnn", hidden_size=4), TrainConfig(max_epochs=1, seeds=2)
    a = train_validation(model_cfg, cfg, ar1_windows)
    b = train_seeds(model_cfg, cfg, ar1_windows)
    assert [run.fold for run in a] == [None, None]
    assert [run.val_curve for run in a] == [run.val_curve for run in b]
