"""The objective and instability measures on small inputs computed by hand."""

import math

import pytest

from pipeline.errors import InputError
from pipeline.stability import (
    ObjectiveConfig,
    batch_loss_noise,
    check_objective_config,
    coefficient_of_variation,
    convergence,
    epoch_jitter,
    objective,
    seed_spread,
    summarize,
)
from pipeline.train import EpochStats


def test_objective_pools_last_k_of_every_seed():
    # Seed A's last 2 values are 2, 3; seed B has a single epoch: 4. Pooled: [2, 3, 4].
    score = objective([[1.0, 2.0, 3.0], [4.0]], ObjectiveConfig(penalty=1.0, last_k=2))
    std = math.sqrt(((2 - 3) ** 2 + 0 + (4 - 3) ** 2) / 3)  # population std = 0.8165
    assert score.val_mean == pytest.approx(3.0)
    assert score.val_std == pytest.approx(std)
    assert score.value == pytest.approx(3.0 + std)
    assert score.n_values == 3


def test_objective_penalty_scales_the_spread():
    score = objective([[1.0, 3.0]], ObjectiveConfig(penalty=2.5, last_k=5))
    assert score.val_mean == pytest.approx(2.0)
    assert score.val_std == pytest.approx(1.0)
    assert score.value == pytest.approx(2.0 + 2.5 * 1.0)


def test_spread_of_a_single_value_is_zero_not_nan():
    score = objective([[0.7]], ObjectiveConfig(penalty=1.0, last_k=3))
    assert score.val_std == 0.0
    assert score.value == pytest.approx(0.7)
    assert seed_spread([0.4]) == 0.0
    assert epoch_jitter([0.4], last_k=5) == 0.0


def test_objective_rejects_bad_last_k():
    with pytest.raises(ValueError, match="last_k must be at least 1"):
        objective([[1.0]], ObjectiveConfig(last_k=0))


def test_epoch_jitter_is_std_of_epoch_changes_over_last_k():
    # Last 4 values 5, 3, 4, 4 -> changes -2, 1, 0.
    changes = [-2.0, 1.0, 0.0]
    mean = sum(changes) / 3
    expected = math.sqrt(sum((c - mean) ** 2 for c in changes) / 3)
    assert epoch_jitter([9.0, 5.0, 3.0, 4.0, 4.0], last_k=4) == pytest.approx(expected)


def test_seed_spread_and_coefficient_of_variation():
    assert seed_spread([1.0, 3.0]) == pytest.approx(1.0)
    assert coefficient_of_variation([2.0, 4.0, 6.0]) == pytest.approx(math.sqrt(8 / 3) / 4.0)
    assert coefficient_of_variation([0.0, 0.0]) == 0.0


def test_batch_loss_noise_removes_the_trend():
    # A straight falling line has no noise around its centred moving average.
    line = [10.0 - i for i in range(9)]
    assert batch_loss_noise(line, width=3) == (pytest.approx(0.0), pytest.approx(0.0))
    # Alternating 6, 4: the centred average of 3 at the inner points is 16/3 or 14/3, so the residuals
    # are -4/3, +4/3, -4/3, +4/3, -4/3: mean -4/15, population std sqrt(16/9 - 16/225) = sqrt(384) / 15.
    zigzag = [6.0, 4.0, 6.0, 4.0, 6.0, 4.0, 6.0]
    noise, relative = batch_loss_noise(zigzag, width=3)
    assert noise == pytest.approx(math.sqrt(384) / 15)
    assert relative == pytest.approx(noise / (sum(zigzag) / 7))


def test_batch_loss_noise_is_relative_to_the_loss_level():
    low = batch_loss_noise([1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0], width=3)
    high = batch_loss_noise([10.0, 20.0, 10.0, 20.0, 10.0, 20.0, 10.0], width=3)
    assert high[0] == pytest.approx(10 * low[0])
    assert high[1] == pytest.approx(low[1])


def test_batch_loss_noise_of_too_few_batches_is_the_plain_std():
    assert batch_loss_noise([1.0, 3.0], width=5)[0] == pytest.approx(1.0)


def test_convergence_of_a_moving_curve():
    fit = convergence([1.0, 0.5, 0.404, 0.4, 0.41], train_curve=[2.0, 1.5, 1.0, 0.9, 0.5], tolerance=0.01)
    assert fit.best_epoch == 4
    assert fit.val_flat is False
    assert fit.epochs_to_within == 3  # 0.404 <= 0.4 * 1.01
    assert fit.train_loss_drop == pytest.approx((2.0 - 0.5) / 2.0)


def test_convergence_says_so_when_the_curve_is_flat():
    fit = convergence([0.3700, 0.3702, 0.3699], train_curve=[1.0, 1.0, 1.0], tolerance=0.01)
    assert fit.val_flat is True
    assert fit.epochs_to_within is None
    assert fit.best_epoch == 3


class FakeRun:
    """The parts of a SeedRun that `summarize` reads, with hand-chosen numbers."""

    def __init__(self, val, train, batch_losses, grad_norms):
        self.history = [
            EpochStats(
                seed=0,
                epoch=e + 1,
                train_loss=t,
                train_loss_std=0.0,
                grad_norm=0.0,
                val_loss=v,
                batch_losses=batch_losses,
                grad_norms=grad_norms,
            )
            for e, (v, t) in enumerate(zip(val, train, strict=True))
        ]
        self.val_curve = list(val)
        self.best_val = min(val)
        self.best_epoch = val.index(self.best_val) + 1


def test_summarize_on_hand_made_runs():
    a = FakeRun(val=[1.0, 0.5, 0.6], train=[2.0, 1.0, 0.8], batch_losses=[1.0, 1.0, 1.0], grad_norms=[1.0, 3.0])
    b = FakeRun(val=[0.9, 0.7, 0.7], train=[1.0, 0.9, 0.5], batch_losses=[2.0, 2.0, 2.0], grad_norms=[2.0, 2.0])
    m = summarize([a, b], ObjectiveConfig(penalty=1.0, last_k=2), naive_val_loss=0.75)
    pooled = [0.5, 0.6, 0.7, 0.7]  # last 2 val losses of each seed
    mean = sum(pooled) / 4
    std = math.sqrt(sum((v - mean) ** 2 for v in pooled) / 4)
    assert m["objective"] == pytest.approx(mean + std)
    assert m["best_val_loss_mean"] == pytest.approx(0.6)
    assert m["seed_spread_best_val"] == pytest.approx(0.1)
    assert m["seed_spread_final_val"] == pytest.approx(0.05)
    assert m["batch_loss_noise"] == pytest.approx(0.0)  # constant batch losses
    # Gradient norms over the last 2 epochs: a -> [1, 3, 1, 3] (CV 1/2); b -> constant (CV 0).
    assert m["grad_noise_cv"] == pytest.approx(0.25)
    assert m["best_epoch_mean"] == pytest.approx(2.0)
    assert m["train_loss_drop"] == pytest.approx(((2.0 - 0.8) / 2.0 + (1.0 - 0.5) / 1.0) / 2)
    # Gap at the best epoch: a: 0.5 - 1.0; b: 0.7 - 0.9.
    assert m["generalisation_gap"] == pytest.approx(((0.5 - 1.0) + (0.7 - 0.9)) / 2)
    assert m["best_val_vs_naive"] == pytest.approx(0.6 / 0.75)
    assert m["val_flat_fraction"] == 0.0
    assert m["epochs_to_within_1pct"] == pytest.approx(2.0)


def test_objective_can_penalise_another_instability_measure():
    a = FakeRun(val=[1.0, 0.5, 0.6], train=[2.0, 1.0, 0.8], batch_losses=[1.0, 1.0, 1.0], grad_norms=[1.0, 3.0])
    b = FakeRun(val=[0.9, 0.7, 0.7], train=[1.0, 0.9, 0.5], batch_losses=[2.0, 2.0, 2.0], grad_norms=[2.0, 2.0])
    cfg = ObjectiveConfig(penalty=2.0, last_k=2, instability="seed_spread_best_val")
    m = summarize([a, b], cfg, naive_val_loss=1.0)
    assert m["objective"] == pytest.approx(m["val_loss_mean"] + 2.0 * 0.1)  # best vals 0.5, 0.7: spread 0.1
    default = summarize([a, b], ObjectiveConfig(penalty=2.0, last_k=2), naive_val_loss=1.0)
    assert default["objective"] == pytest.approx(default["val_loss_mean"] + 2.0 * default["val_loss_std"])


def test_unknown_instability_measure_is_refused():
    with pytest.raises(InputError, match="unknown instability measure 'wobble': choose one of val_loss_std, "):
        check_objective_config(ObjectiveConfig(instability="wobble"))
