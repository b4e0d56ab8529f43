"""Tests of `pipeline.models`: every family x dropout type builds, trains, is stochastic only in training,
is exactly the plain model at rate 0, and every refused config says why (cases K4, K5, K6)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from pipeline.errors import InputError
from pipeline.models import (
    DROPOUT_TYPES,
    FAMILIES,
    PRESETS,
    ModelConfig,
    TemporalCNN,
    applicable_types,
    build_model,
    check_model_config,
    dropout_effective,
)
from pipeline.train import mse

N_FEATURES = 5


def layers_for(family: str) -> int:
    return 2 if family in ("rnn", "lstm") else 1


# Every (family, type) the search space can produce; builtin only exists with 2 recurrent layers.
CASES = [(family, kind) for family in FAMILIES for kind in applicable_types(family, layers_for(family))]
RECURRENT_CASES = [(family, kind) for family, kind in CASES if family != "cnn"]


def make(family: str, kind: str, rate: float = 0.5, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = ModelConfig(model=family, hidden_size=16, num_layers=layers_for(family), dropout_type=kind, dropout_rate=rate)
    return build_model(cfg, N_FEATURES)


def batch(seed: int = 100) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 30, N_FEATURES, generator=generator), torch.randn(8, generator=generator)


def test_cases_cover_every_type() -> None:
    assert {kind for _, kind in CASES} == set(DROPOUT_TYPES)
    assert len(CASES) == 10 + 10 + 5


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_forward_shape_and_finite_gradients(family: str, kind: str) -> None:
    model = make(family, kind).train()
    x, y = batch()
    out = model(x)
    assert out.shape == (8,)
    nn.functional.mse_loss(out, y).backward()
    params = [(name, param) for name, param in model.named_parameters() if param.requires_grad]
    assert params
    for name, param in params:
        assert param.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(param.grad).all(), f"{name} has a non-finite gradient"
        assert (param.grad != 0).any(), f"{name} has an all-zero gradient"


@pytest.mark.parametrize(("family", "kind"), [case for case in CASES if case[1] != "none"])
def test_train_mode_is_stochastic(family: str, kind: str) -> None:
    """K4: a dropout type must actually change the output in training."""
    model = make(family, kind).train()
    x, _ = batch()
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_eval_mode_is_deterministic(family: str, kind: str) -> None:
    model = make(family, kind).eval()
    x, _ = batch()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_none_is_deterministic_in_train_mode(family: str) -> None:
    model = make(family, "none").train()
    x, _ = batch()
    assert torch.equal(model(x), model(x))


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_rate_zero_is_exactly_the_no_dropout_model(family: str, kind: str) -> None:
    x, _ = batch()
    plain = make(family, "none", rate=0.0, seed=0).train()
    zero = make(family, kind, rate=0.0, seed=0).train()
    assert torch.equal(zero(x), plain(x))
    assert torch.equal(zero(x), zero(x))


# ---------------------------------------------------------------------------------------------- K6


@pytest.mark.parametrize(("family", "kind"), CASES)
def test_k6_validation_loss_is_deterministic_and_restores_train_mode(family: str, kind: str) -> None:
    model = make(family, kind).train()
    x, y = batch()
    first = mse(model, x, y)
    second = mse(model, x, y)
    assert math.isfinite(first)
    assert first == second
    assert model.training
    assert all(module.training for module in model.modules())
    # it is the eval-mode loss ...
    model.eval()
    with torch.no_grad():
        assert first == nn.functional.mse_loss(model(x), y).item()
    # ... and it leaves an eval model in eval mode
    assert mse(model, x, y) == first
    assert not model.training
    assert not any(module.training for module in model.modules())


@pytest.mark.parametrize(("family", "kind"), [case for case in CASES if case[1] != "none"])
def test_k6_dropout_still_on_after_validation(family: str, kind: str) -> None:
    model = make(family, kind).train()
    x, y = batch()
    mse(model, x, y)
    assert not torch.equal(model(x), model(x))


# ---------------------------------------------------------------------------------------------- check_model_config


def refusal(**fields: object) -> str:
    with pytest.raises(InputError) as caught:
        check_model_config(ModelConfig(**fields))
    return str(caught.value)


def test_unknown_model_is_named_and_choices_listed() -> None:
    message = refusal(model="gru")
    assert "unknown model 'gru'" in message
    assert "rnn, lstm, cnn" in message


def test_unknown_dropout_type_is_named_and_choices_listed() -> None:
    message = refusal(dropout_type="alpha")
    assert "unknown dropout type 'alpha'" in message
    assert ", ".join(DROPOUT_TYPES) in message


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5])
def test_rate_outside_unit_interval_is_refused(rate: float) -> None:
    message = refusal(dropout_type="standard", dropout_rate=rate)
    assert "[0, 1)" in message
    assert str(rate) in message


@pytest.mark.parametrize("rate", [0.0, 0.5, 0.99])
def test_rate_inside_unit_interval_is_accepted(rate: float) -> None:
    check_model_config(ModelConfig(model="lstm", dropout_type="standard", dropout_rate=rate))


@pytest.mark.parametrize("field", ["hidden_size", "num_layers", "kernel_size"])
def test_sizes_below_one_are_refused(field: str) -> None:
    assert "must be at least 1" in refusal(**{field: 0})


@pytest.mark.parametrize("kind", ["weight_drop", "recurrent", "zoneout", "builtin"])
def test_recurrent_only_types_are_refused_for_cnn(kind: str) -> None:
    message = refusal(model="cnn", num_layers=2, dropout_type=kind, dropout_rate=0.5)
    assert f"dropout type {kind!r} does not apply to the cnn family" in message
    assert "cnn takes: none, standard, head, spatial, variational" in message
    with pytest.raises(InputError):
        build_model(ModelConfig(model="cnn", num_layers=2, dropout_type=kind, dropout_rate=0.5), N_FEATURES)


@pytest.mark.parametrize("family", ["rnn", "lstm"])
def test_builtin_with_one_layer_is_refused(family: str) -> None:
    message = refusal(model=family, num_layers=1, dropout_type="builtin", dropout_rate=0.3)
    assert "num_layers >= 2" in message
    assert "would apply no dropout" in message


@pytest.mark.parametrize("family", ["rnn", "lstm"])
def test_builtin_with_two_layers_is_accepted_and_drops(family: str) -> None:
    cfg = ModelConfig(model=family, hidden_size=16, num_layers=2, dropout_type="builtin", dropout_rate=0.5)
    check_model_config(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, N_FEATURES).train()
    x, _ = batch()
    assert not torch.equal(model(x), model(x))


# ---------------------------------------------------------------------------------------------- applicable_types


def test_applicable_types_exact() -> None:
    recurrent_1 = (
        "none",
        "standard",
        "head",
        "spatial",
        "variational",
        "weight_drop",
        "recurrent",
        "recurrent_shared",
        "zoneout",
    )
    cnn = ("none", "standard", "head", "spatial", "variational")
    for family in ("rnn", "lstm"):
        assert applicable_types(family, 1) == recurrent_1
        assert applicable_types(family, 2) == (*recurrent_1, "builtin")
        assert applicable_types(family, 3) == (*recurrent_1, "builtin")
        assert applicable_types(family) == recurrent_1
    assert applicable_types("cnn", 1) == cnn
    assert applicable_types("cnn", 2) == cnn


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("num_layers", [1, 2])
def test_every_applicable_type_passes_the_check(family: str, num_layers: int) -> None:
    for kind in applicable_types(family, num_layers):
        check_model_config(ModelConfig(model=family, num_layers=num_layers, dropout_type=kind, dropout_rate=0.5))
    for kind in set(DROPOUT_TYPES) - set(applicable_types(family, num_layers)):
        with pytest.raises(InputError):
            check_model_config(ModelConfig(model=family, num_layers=num_layers, dropout_type=kind, dropout_rate=0.5))


# ---------------------------------------------------------------------------------------------- K4


def test_k4_recurrent_models_emit_no_rnn_warning() -> None:
    x, y = batch()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for family, kind in RECURRENT_CASES:
            model = make(family, kind).train()
            nn.functional.mse_loss(model(x), y).backward()
            model.eval()(x)
    from_rnn = [f"{w.filename}: {w.message}" for w in record if issubclass(w.category, UserWarning)]
    assert from_rnn == []


def test_k4_trap_single_layer_builtin_dropout_warns() -> None:
    with pytest.warns(UserWarning, match="num_layers") as record:
        torch.nn.RNN(5, 8, num_layers=1, dropout=0.3)
    assert any(w.filename.replace("\\", "/").endswith("torch/nn/modules/rnn.py") for w in record)


# ---------------------------------------------------------------------------------------------- CNN layout


def test_cnn_spatial_dropout_zeroes_whole_feature_map_channels() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(model="cnn", hidden_size=32, num_layers=2, dropout_type="spatial", dropout_rate=0.5)
    model = build_model(cfg, N_FEATURES).train()
    assert isinstance(model, TemporalCNN)
    drops = [module for module in model.modules() if isinstance(module, nn.Dropout1d)]
    assert len(drops) == 2
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    for drop in drops:
        drop.register_forward_hook(lambda module, args, out: captured.append((args[0].detach(), out.detach())))
    x = torch.randn(64, 30, N_FEATURES)
    model(x)
    assert len(captured) == 2
    for maps, out in captured:
        assert out.shape == (64, 32, 30)  # (B, channels, T)
        live = (maps != 0).any(dim=2)  # (B, C): channels with something to drop
        dropped = (out == 0).all(dim=2) & live
        kept = live & ~dropped
        # a kept channel is the whole input map scaled by 2; zeros there only where the map was zero
        assert torch.equal(out[kept], maps[kept] * 2)
        n = int(live.sum())
        assert n > 1000
        fraction = dropped.sum().item() / n
        assert abs(fraction - 0.5) <= 4 * math.sqrt(0.25 / n)


def test_cnn_standard_dropout_is_elementwise_not_channelwise() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(model="cnn", hidden_size=32, num_layers=1, dropout_type="standard", dropout_rate=0.5)
    model = build_model(cfg, N_FEATURES).train()
    drop = next(module for module in model.modules() if isinstance(module, nn.Dropout))
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    drop.register_forward_hook(lambda module, args, out: captured.append((args[0].detach(), out.detach())))
    model(torch.randn(16, 30, N_FEATURES))
    maps, out = captured[0]
    nonzero = maps != 0
    partly = ((out == 0) & nonzero).any(dim=2) & ((out != 0) & nonzero).any(dim=2)
    assert partly.float().mean().item() > 0.9


# ---------------------------------------------------------------------------------------------- RNN input layout


@pytest.mark.parametrize("family", ["rnn", "lstm"])
@pytest.mark.parametrize(("kind", "shared_in_time"), [("spatial", True), ("variational", True), ("standard", False)])
def test_recurrent_input_dropout_layout(family: str, kind: str, shared_in_time: bool) -> None:
    """K5 in the model: spatial/variational input masks are one per (sample, feature) for the whole window."""
    model = make(family, kind)
    model.train()
    captured: list[torch.Tensor] = []
    model.input_drop.register_forward_hook(lambda module, args, out: captured.append(out.detach()))
    batch_size, steps = 64, 30
    model(torch.ones(batch_size, steps, N_FEATURES))
    (out,) = captured
    assert out.shape == (batch_size, steps, N_FEATURES)
    assert set(out.unique().tolist()) == {0.0, 2.0}
    constant = (out == out[:, :1]).all(dim=1)  # (B, F)
    if shared_in_time:
        assert constant.all()
        fraction = (out[:, 0] == 0).float().mean().item()
        n = batch_size * N_FEATURES
        assert abs(fraction - 0.5) <= 4 * math.sqrt(0.25 / n)
    else:
        assert constant.float().mean().item() < 0.02


@pytest.mark.parametrize("family", ["rnn", "lstm"])
@pytest.mark.parametrize(("kind", "shared_in_time"), [("variational", True), ("standard", False)])
def test_recurrent_between_layer_dropout_layout(family: str, kind: str, shared_in_time: bool) -> None:
    model = make(family, kind)
    model.train()
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    model.between_drop.register_forward_hook(
        lambda module, args, out: captured.append((args[0].detach(), out.detach()))
    )
    model(torch.randn(32, 30, N_FEATURES))
    (hidden, out) = captured[0]
    assert out.shape == (32, 30, 16)
    assert (hidden != 0).all()
    kept = out != 0
    torch.testing.assert_close(out[kept], hidden[kept] * 2, rtol=1e-6, atol=0)
    constant = (kept == kept[:, :1]).all(dim=1)  # (B, H)
    if shared_in_time:
        assert constant.all()
    else:
        assert constant.float().mean().item() < 0.02


# ---------------------------------------------------------------------------------------------- head, presets


@pytest.mark.parametrize("family", FAMILIES)
def test_head_dropout_acts_only_on_the_heads_input(family: str) -> None:
    model = build_model(ModelConfig(model=family, dropout_type="head", dropout_rate=0.5), N_FEATURES).train()
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert len(drops) == 1 and drops[0] is model.output_drop
    seen = []
    model.head.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0]))
    x, _ = batch()
    model(x)
    model(x)
    before_head = seen[0]  # (B, H): zeros where dropped, kept units scaled by 2
    assert before_head.shape == (8, 32)
    assert not torch.equal(seen[0], seen[1])
    assert 0.3 < (before_head == 0).float().mean().item() < 0.7


def test_presets_reproduce_the_articles_examples() -> None:
    rnn = ModelConfig(**PRESETS["article-rnn"])
    assert (rnn.model, rnn.dropout_type, rnn.num_layers) == ("rnn", "head", 1) and dropout_effective(rnn)
    cnn = ModelConfig(**PRESETS["article-cnn"])
    assert (cnn.model, cnn.dropout_type) == ("cnn", "standard") and dropout_effective(cnn)
    builtin = ModelConfig(**PRESETS["article-rnn-builtin"])
    assert (builtin.dropout_type, builtin.num_layers, builtin.as_written) == ("builtin", 1, True)
    assert not dropout_effective(builtin)


def test_one_layer_builtin_as_written_is_bitwise_the_no_dropout_model() -> None:
    # The article's "RNN with built-in dropout": nn.RNN(dropout=0.3) with one layer. Built as written, it
    # must be exactly the `none` model in training mode too (PyTorch drops nothing), and emit no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.manual_seed(3)
        literal = build_model(ModelConfig(**PRESETS["article-rnn-builtin"]), N_FEATURES).train()
    torch.manual_seed(3)
    none = build_model(ModelConfig(model="rnn"), N_FEATURES).train()
    assert literal.layers[0].dropout == 0.3
    x, _ = batch()
    assert torch.equal(literal(x), none(x))


def test_dropout_effective_flags_runs_that_drop_nothing() -> None:
    assert not dropout_effective(ModelConfig(dropout_type="none"))
    assert not dropout_effective(ModelConfig(dropout_type="standard", dropout_rate=0.0))
    assert not dropout_effective(ModelConfig(dropout_type="builtin", num_layers=1, dropout_rate=0.5, as_written=True))
    assert dropout_effective(ModelConfig(dropout_type="builtin", num_layers=2, dropout_rate=0.5))
    assert dropout_effective(ModelConfig(dropout_type="zoneout", dropout_rate=0.1))
