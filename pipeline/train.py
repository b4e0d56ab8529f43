"""Stage 5 — train: fit one model config with several seeds, one epoch at a time.

In:  a `ModelConfig`, a `TrainConfig` and the `Windows` of `pipeline.windows`.
Out: one `SeedRun` per seed (per seed and walk-forward fold, for `train_validation` with folds), each
     holding its per-epoch `EpochStats`, its best validation loss and the weights of its best epoch.

The seeds advance in lockstep (epoch 1 of every seed, then epoch 2, ...), so that a caller can report
the mean validation loss across seeds after each epoch (Optuna prunes on it). Each seed keeps its own
random state: seed s gives the same initial weights, batch order and dropout masks whether it runs
alone or beside other seeds. Nothing here knows about MLflow or Optuna; `on_epoch` is the only hook.

Per epoch: Adam on MSE over shuffled mini-batches (gathered from the window view by index), then the
validation loss in eval mode (dropout off), after which the model is put back in training mode.
Training stops early when the validation loss has not improved for `patience` epochs, and raises
`DivergedError` as soon as a training loss is NaN or infinite.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from pipeline.errors import InputError
from pipeline.models import ModelConfig, build_model
from pipeline.windows import Windows


@dataclass
class TrainConfig:
    """Optimisation budget and seeds."""

    max_epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    patience: int = 5  # epochs without validation improvement before stopping
    seeds: int = 3  # seeds per config; seed values are seed, seed+1, ...
    seed: int = 0
    threads: int = 1  # torch intra-op threads; one per process is fastest for these small models


def check_train_config(cfg: TrainConfig) -> None:
    """Refuse budgets that cannot train anything, before any run starts."""
    for name in ("max_epochs", "batch_size", "patience", "seeds", "threads"):
        if getattr(cfg, name) < 1:
            raise InputError(f"{name} must be at least 1, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise InputError(f"lr must be positive, got {cfg.lr}")


class DivergedError(RuntimeError):
    """A training loss became NaN or infinite."""


@dataclass
class EpochStats:
    seed: int
    epoch: int
    train_loss: float  # mean of the per-batch losses
    train_loss_std: float  # std of the per-batch losses (population)
    grad_norm: float  # mean per-batch gradient norm
    val_loss: float
    fold: int | None = None  # walk-forward fold (1-based); None on the one train/val split
    batch_losses: list[float] = field(repr=False, default_factory=list)
    grad_norms: list[float] = field(repr=False, default_factory=list)


def mse(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean squared error of `model` in eval mode, restoring the mode it was in."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = nn.functional.mse_loss(model(inputs), targets).item()
    model.train(was_training)
    return loss


def grad_norm(model: nn.Module) -> float:
    """The global L2 norm of the gradients. `_foreach_norm` is what `clip_grad_norm_` uses inside; called
    directly it costs a third of `get_total_norm` per batch, which matters for small, fast models."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).item()


class SeedRun:
    """One model trained with one seed; `step()` runs one epoch."""

    def __init__(
        self, model_cfg: ModelConfig, train_cfg: TrainConfig, data: Windows, seed: int, fold: int | None = None
    ) -> None:
        self.cfg = train_cfg
        self.data = data
        self.seed = seed
        self.fold = fold
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.model = build_model(model_cfg, data.n_features)
            self.rng_state = torch.get_rng_state()  # dropout masks draw from here, epoch after epoch
        self.batch_order = torch.Generator().manual_seed(seed)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=train_cfg.lr)
        self.val_inputs, self.val_targets = data.split("val")
        self.history: list[EpochStats] = []
        self.best_val = math.inf
        self.best_epoch = 0
        self.best_state: dict[str, torch.Tensor] = copy.deepcopy(self.model.state_dict())
        self.done = False

    @property
    def name(self) -> str:
        """'seed 3', or 'fold 2 seed 3' on a walk-forward fold."""
        return f"seed {self.seed}" if self.fold is None else f"fold {self.fold} seed {self.seed}"

    @property
    def val_curve(self) -> list[float]:
        return [stats.val_loss for stats in self.history]

    def step(self) -> EpochStats:
        """Train one epoch, validate, update early stopping. Raises DivergedError on a non-finite loss."""
        epoch = len(self.history) + 1
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self.rng_state)
            losses, norms = self._train_epoch(epoch)
            self.rng_state = torch.get_rng_state()
        val_loss = mse(self.model, self.val_inputs, self.val_targets)
        if not math.isfinite(val_loss):
            raise DivergedError(f"non-finite validation loss at epoch {epoch} ({self.name})")
        losses_t, norms_t = torch.tensor(losses), torch.tensor(norms)
        stats = EpochStats(
            seed=self.seed,
            epoch=epoch,
            fold=self.fold,
            train_loss=losses_t.mean().item(),
            train_loss_std=losses_t.std(correction=0).item(),
            grad_norm=norms_t.mean().item(),
            val_loss=val_loss,
            batch_losses=losses,
            grad_norms=norms,
        )
        self.history.append(stats)
        if val_loss < self.best_val:
            self.best_val, self.best_epoch = val_loss, epoch
            self.best_state = copy.deepcopy(self.model.state_dict())
        self.done = epoch >= self.cfg.max_epochs or epoch - self.best_epoch >= self.cfg.patience
        return stats

    def _train_epoch(self, epoch: int) -> tuple[list[float], list[float]]:
        self.model.train()
        starts = self.data.starts["train"]
        order = starts[torch.randperm(len(starts), generator=self.batch_order)]
        losses, norms = [], []
        for batch in order.split(self.cfg.batch_size):
            inputs, targets = self.data.inputs(batch), self.data.targets(batch)  # (B, T, F), (B,)
            loss = nn.functional.mse_loss(self.model(inputs), targets)
            if not torch.isfinite(loss):
                raise DivergedError(f"non-finite training loss at epoch {epoch}, batch {len(losses) + 1} ({self.name})")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norms.append(grad_norm(self.model))
            self.optimizer.step()
            losses.append(loss.item())
        return losses, norms

    def best_model(self) -> nn.Module:
        """The model with the weights of its best validation epoch, in eval mode."""
        self.model.load_state_dict(self.best_state)
        return self.model.eval()


EpochHook = Callable[[int, list[EpochStats]], None]


def train_seeds(
    model_cfg: ModelConfig, train_cfg: TrainConfig, data: Windows, on_epoch: EpochHook | None = None
) -> list[SeedRun]:
    """Train `train_cfg.seeds` seeds in lockstep; call `on_epoch(epoch, stats of seeds still running)`.

    `on_epoch` may raise (e.g. Optuna's TrialPruned) to stop the whole config.
    """
    seeds = range(train_cfg.seed, train_cfg.seed + train_cfg.seeds)
    return run_lockstep([SeedRun(model_cfg, train_cfg, data, seed) for seed in seeds], train_cfg, on_epoch)


def train_validation(
    model_cfg: ModelConfig, train_cfg: TrainConfig, data: Windows, on_epoch: EpochHook | None = None
) -> list[SeedRun]:
    """What the objective scores: `train_seeds` on the one train/val split, or, with walk-forward folds,
    every seed on every fold (fold k's seed s starts from the same weights as on the other folds)."""
    if not data.folds:
        return train_seeds(model_cfg, train_cfg, data, on_epoch)
    seeds = range(train_cfg.seed, train_cfg.seed + train_cfg.seeds)
    runs = [SeedRun(model_cfg, train_cfg, fold, seed, k) for k, fold in enumerate(data.folds, 1) for seed in seeds]
    return run_lockstep(runs, train_cfg, on_epoch)


def run_lockstep(runs: list[SeedRun], train_cfg: TrainConfig, on_epoch: EpochHook | None) -> list[SeedRun]:
    """Advance every run one epoch at a time until all have stopped; `on_epoch` after each epoch."""
    torch.set_num_threads(train_cfg.threads)
    for epoch in range(1, train_cfg.max_epochs + 1):
        active = [run for run in runs if not run.done]
        if not active:
            break
        stats = [run.step() for run in active]
        if on_epoch is not None:
            on_epoch(epoch, stats)
    return runs


def epoch_metrics(stats: list[EpochStats]) -> dict[str, float]:
    """One epoch's numbers for logging: means over the seeds still running, and each seed's val loss."""
    count = len(stats)
    metrics = {
        name: sum(getattr(s, name) for s in stats) / count
        for name in ("train_loss", "train_loss_std", "grad_norm", "val_loss")
    }
    metrics.update({f"val_loss_{'' if s.fold is None else f'fold{s.fold}_'}seed{s.seed}": s.val_loss for s in stats})
    return metrics
