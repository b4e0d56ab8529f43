"""The objective and instability measures on small inputs computed by hand."""

import math

import pytest

from pipeline.stability import ObjectiveConfig, coefficient_of_variation, epoch_jitter, objective, seed_spread


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
