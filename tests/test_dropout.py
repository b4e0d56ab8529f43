"""Statistical tests of the dropout variants in `pipeline.dropout` (fastai style: CPU, fixed seeds).

Each test checks a property that a wrong implementation would break: the fraction dropped (within a
4-sigma binomial tolerance), which axis a mask is shared along, the 1/(1-p) scaling, eval/p=0 identity,
and for the recurrent variants the exact recurrence they compute.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.dropout import LockedDropout, LoopRecurrent, SpatialDropout, WeightDrop, dropout_mask
from pipeline.recurrent_loop import Recurrence


def assert_binomial(fraction: float, p: float, n: int, sigmas: float = 4.0) -> None:
    """`fraction` of `n` Bernoulli(p) draws is within `sigmas` standard deviations of p."""
    tolerance = sigmas * math.sqrt(p * (1 - p) / n)
    assert abs(fraction - p) <= tolerance, f"fraction {fraction:.4f} not within {tolerance:.4f} of p={p} (n={n})"


def rnn_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    """Messages of the UserWarnings in `record` (e.g. from torch/nn/modules/rnn.py)."""
    return [f"{w.filename}: {w.message}" for w in record if issubclass(w.category, UserWarning)]


# ---------------------------------------------------------------------------------------------- dropout_mask


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_dropout_mask_statistics(p: float) -> None:
    torch.manual_seed(0)
    n = 200_000
    mask = dropout_mask(torch.zeros(1), (400, 500), p)
    assert mask.shape == (400, 500)
    assert_binomial((mask == 0).float().mean().item(), p, n)
    kept = mask[mask != 0]
    assert torch.equal(kept, torch.full_like(kept, 1 / (1 - p)))  # exactly 1/(1-p), nothing else
    # E[mask] = 1; Var[mask entry] = p / (1-p).
    tolerance = 4 * math.sqrt(p / (1 - p) / n)
    assert abs(mask.mean().item() - 1) <= tolerance


def test_dropout_mask_takes_dtype_of_like() -> None:
    torch.manual_seed(0)
    mask = dropout_mask(torch.zeros(2, dtype=torch.float64), (3, 4), 0.5)
    assert mask.dtype == torch.float64
    assert set(mask.unique().tolist()) <= {0.0, 2.0}


# ---------------------------------------------------------------------------------------------- LockedDropout


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5])
def test_locked_dropout_mask_is_constant_along_time(p: float) -> None:
    torch.manual_seed(1)
    batch, steps, features = 100, 12, 40
    drop = LockedDropout(p).train()
    out = drop(torch.ones(batch, steps, features))  # out == the mask itself
    assert out.shape == (batch, steps, features)
    assert torch.equal(out, out[:, :1].expand_as(out)), "mask must be shared by every time step"
    assert_binomial((out[:, 0] == 0).float().mean().item(), p, batch * features)
    kept = out[out != 0]
    assert torch.equal(kept, torch.full_like(kept, 1 / (1 - p)))


def test_locked_dropout_scales_kept_values_of_a_random_input() -> None:
    torch.manual_seed(2)
    x = torch.rand(16, 9, 7) + 0.5  # no zeros in the input
    out = LockedDropout(0.3).train()(x)
    kept = out != 0
    assert torch.equal(kept, kept[:, :1].expand_as(kept))
    assert 0 < kept.float().mean().item() < 1
    torch.testing.assert_close(out[kept], x[kept] / 0.7, rtol=1e-6, atol=0)


def test_locked_dropout_eval_and_zero_rate_are_identity() -> None:
    torch.manual_seed(3)
    x = torch.randn(5, 8, 4)
    assert torch.equal(LockedDropout(0.5).eval()(x), x)
    assert torch.equal(LockedDropout(0.0).train()(x), x)


def test_locked_dropout_two_dimensional_input_gets_per_element_mask() -> None:
    torch.manual_seed(4)
    out = LockedDropout(0.5).train()(torch.ones(50, 6))
    assert out.shape == (50, 6)
    assert set(out.unique().tolist()) == {0.0, 2.0}


# ---------------------------------------------------------------------------------------------- SpatialDropout


def test_spatial_dropout_k5_whole_feature_for_whole_window() -> None:
    torch.manual_seed(0)
    out = SpatialDropout(0.5).train()(torch.ones(4, 10, 3))
    assert out.shape == (4, 10, 3)
    assert torch.equal(out, out[:, :1].expand_as(out)), "every (sample, feature) series must be constant in time"
    assert set(out.unique().tolist()) == {0.0, 2.0}


def test_spatial_dropout_fraction_of_dropped_channels() -> None:
    torch.manual_seed(1)
    batch, steps, features = 200, 20, 10
    out = SpatialDropout(0.3).train()(torch.ones(batch, steps, features))
    assert torch.equal(out, out[:, :1].expand_as(out))
    dropped = (out == 0).all(dim=1)  # (B, F)
    assert_binomial(dropped.float().mean().item(), 0.3, batch * features)
    kept = out[out != 0]
    assert torch.equal(kept, torch.full_like(kept, 1 / 0.7))


def test_spatial_dropout_refuses_two_dimensional_input() -> None:
    with pytest.raises(ValueError, match=r"\(batch, time, features\)") as caught:
        SpatialDropout(0.5).train()(torch.ones(4, 3))
    assert "(4, 3)" in str(caught.value)


def test_spatial_dropout_eval_is_identity() -> None:
    torch.manual_seed(2)
    x = torch.randn(4, 10, 3)
    assert torch.equal(SpatialDropout(0.5).eval()(x), x)
    assert torch.equal(SpatialDropout(0.0).train()(x), x)


def test_plain_dropout1d_on_batch_time_features_drops_time_steps() -> None:
    """The K5 trap: nn.Dropout1d treats dim 1 as channels, so on (B, T, F) it zeroes whole time steps."""
    torch.manual_seed(0)
    out = nn.Dropout1d(0.5).train()(torch.ones(4, 10, 3))
    assert torch.equal(out, out[:, :, :1].expand_as(out)), "constant along features: whole steps dropped"
    varies_in_time = (out != out[:, :1]).any(dim=1)  # (B, F)
    assert varies_in_time.all(), "with 10 steps at p=0.5 every series should see both kept and dropped steps"


def test_standard_dropout_varies_along_time() -> None:
    torch.manual_seed(0)
    batch, steps, features = 50, 10, 8
    out = nn.Dropout(0.5).train()(torch.ones(batch, steps, features))
    constant = (out == out[:, :1]).all(dim=1)  # (B, F): mask the same at every step
    # A fresh mask per step leaves a series constant with probability 2 * 0.5**10 ~ 0.002.
    assert constant.float().mean().item() < 0.02
    assert_binomial((out == 0).float().mean().item(), 0.5, batch * steps * features)


# ---------------------------------------------------------------------------------------------- WeightDrop

CELLS = [nn.RNN, nn.LSTM]


def make_weight_drop(cell: type[nn.RNNBase], p: float = 0.5, num_layers: int = 1, seed: int = 0) -> WeightDrop:
    torch.manual_seed(seed)
    return WeightDrop(cell(5, 16, num_layers=num_layers, batch_first=True), p)


@pytest.mark.parametrize("cell", CELLS)
def test_weight_drop_train_is_random_eval_is_the_plain_module(cell: type[nn.RNNBase]) -> None:
    model = make_weight_drop(cell)
    x = torch.randn(6, 12, 5)
    model.train()
    first, second = model(x)[0], model(x)[0]
    assert first.shape == (6, 12, 16)
    assert not torch.equal(first, second)
    model.eval()
    eval_first, eval_second = model(x)[0], model(x)[0]
    assert torch.equal(eval_first, eval_second)
    assert torch.equal(eval_first, model.module(x)[0])


@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_weight_drop_masks_only_hidden_to_hidden_weights(cell: type[nn.RNNBase], num_layers: int) -> None:
    """Capture the weights the wrapped module actually runs with (functional_call swaps them in)."""
    p = 0.5
    model = make_weight_drop(cell, p, num_layers).train()
    raw = {name: param.detach().clone() for name, param in model.module.named_parameters()}
    seen: dict[str, torch.Tensor] = {}

    def capture(module: nn.Module, args: tuple) -> None:
        seen.update({name: getattr(module, name).detach().clone() for name in raw})

    model.module.register_forward_pre_hook(capture)
    model(torch.randn(4, 7, 5))
    assert set(seen) == set(raw)
    for name, used in seen.items():
        if name.startswith("weight_hh"):
            zeroed = used == 0
            assert_binomial(zeroed.float().mean().item(), p, used.numel())
            assert torch.equal(used[~zeroed], raw[name][~zeroed] * 2)  # kept entries scaled by 1/(1-p)
        else:
            assert torch.equal(used, raw[name]), f"{name} must not be dropped"
    if num_layers == 2:
        assert not torch.equal(seen["weight_hh_l0"] == 0, seen["weight_hh_l1"] == 0)  # one mask per layer


@pytest.mark.parametrize("cell", CELLS)
def test_weight_drop_keeps_raw_weight_and_passes_gradients_through_mask(cell: type[nn.RNNBase]) -> None:
    model = make_weight_drop(cell).train()
    raw_param = model.module.weight_hh_l0
    before = {name: param.detach().clone() for name, param in model.module.named_parameters()}
    seen: dict[str, torch.Tensor] = {}
    model.module.register_forward_pre_hook(lambda module, args: seen.update(hh=module.weight_hh_l0.detach().clone()))
    out, _ = model(torch.randn(4, 9, 5))
    out.pow(2).sum().backward()
    # The stored parameter is the same object and was never written in place.
    assert model.module.weight_hh_l0 is raw_param
    assert isinstance(model.module.weight_hh_l0, nn.Parameter)
    for name, param in model.module.named_parameters():
        assert torch.equal(param.detach(), before[name]), f"{name} modified by forward/backward"
    grad = raw_param.grad
    assert grad is not None
    assert torch.isfinite(grad).all()
    dropped = seen["hh"] == 0
    assert (grad[dropped] == 0).all(), "a dropped weight gets no gradient"
    assert (grad[~dropped] != 0).float().mean().item() > 0.9, "kept weights get gradient through the mask"
    assert model.module.weight_ih_l0.grad is not None


@pytest.mark.parametrize("cell", CELLS)
def test_weight_drop_state_dict_round_trip(cell: type[nn.RNNBase]) -> None:
    model = make_weight_drop(cell, num_layers=2, seed=0)
    plain_keys = list(model.module.state_dict())
    assert list(model.state_dict()) == [f"module.{key}" for key in plain_keys]
    fresh = make_weight_drop(cell, num_layers=2, seed=1)
    x = torch.randn(3, 8, 5)
    assert not torch.equal(fresh.eval()(x)[0], model.eval()(x)[0])
    result = fresh.load_state_dict(model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh.eval()(x)[0], model.eval()(x)[0])


@pytest.mark.parametrize("cell", CELLS)
def test_weight_drop_emits_no_warnings(cell: type[nn.RNNBase]) -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        model = make_weight_drop(cell, num_layers=2).train()
        x = torch.randn(4, 6, 5)
        model(x)[0].sum().backward()
        model.eval()(x)
    assert rnn_warnings(record) == []


def test_weight_drop_zero_rate_is_the_plain_module() -> None:
    model = make_weight_drop(nn.LSTM, p=0.0).train()
    x = torch.randn(3, 5, 5)
    assert torch.equal(model(x)[0], model.module(x)[0])


# ---------------------------------------------------------------------------------------------- LoopRecurrent


def make_loop(cell: type[nn.RNNBase], kind: str, p: float, hidden: int = 8, seed: int = 0) -> LoopRecurrent:
    torch.manual_seed(seed)
    return LoopRecurrent(cell(5, hidden, batch_first=True), kind, p)


def rnn_step(module: nn.RNN, x_t: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """h_new = tanh(x_t W_ih^T + b_ih + b_hh + h W_hh^T), written out by hand."""
    return torch.tanh(x_t @ module.weight_ih_l0.T + module.bias_ih_l0 + module.bias_hh_l0 + h @ module.weight_hh_l0.T)


def lstm_step(module: nn.LSTM, x_t: torch.Tensor, h: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    gates = x_t @ module.weight_ih_l0.T + module.bias_ih_l0 + module.bias_hh_l0 + h @ module.weight_hh_l0.T
    i, f, g, o = gates.chunk(4, dim=1)
    c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c_new), c_new


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kind", ["recurrent", "zoneout"])
def test_loop_at_zero_rate_matches_fused_kernel(cell: type[nn.RNNBase], kind: str) -> None:
    loop = make_loop(cell, kind, 0.0).train()
    x = torch.randn(6, 15, 5)
    out, state = loop(x)
    assert out.shape == (6, 15, 8)
    assert state is None
    torch.testing.assert_close(out, loop.module(x)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_in_eval_matches_fused_kernel(cell: type[nn.RNNBase]) -> None:
    loop = make_loop(cell, "recurrent", 0.5).eval()
    x = torch.randn(6, 15, 5)
    torch.testing.assert_close(loop(x)[0], loop.module(x)[0], atol=1e-6, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kind", ["recurrent", "zoneout"])
def test_loop_train_is_random_and_differentiable(cell: type[nn.RNNBase], kind: str) -> None:
    loop = make_loop(cell, kind, 0.5).train()
    x = torch.randn(4, 10, 5)
    first, second = loop(x)[0], loop(x)[0]
    assert not torch.equal(first, second)
    first.pow(2).sum().backward()
    for name, param in loop.module.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        assert (param.grad != 0).any(), name


def test_recurrent_mask_is_one_per_sequence_shared_by_every_step() -> None:
    """With W_hh = I and b_hh = 0 the hidden units are independent: h_t[j] = tanh(proj_t[j] + m[j] h_{t-1}[j]).

    A per-sequence mask m[j] in {0, 2} gives one of two whole trajectories per (sample, unit); a mask
    redrawn per step would mix them.
    """
    p, batch, steps, hidden = 0.5, 400, 10, 8
    loop = make_loop(nn.RNN, "recurrent", p, hidden=hidden).train()
    with torch.no_grad():
        loop.module.weight_hh_l0.copy_(torch.eye(hidden))
        loop.module.bias_hh_l0.zero_()
    x = torch.randn(batch, steps, 5)
    with torch.no_grad():
        out = loop(x)[0]
        projected = F.linear(x, loop.module.weight_ih_l0, loop.module.bias_ih_l0)  # (B, T, H)
        dropped_path = torch.tanh(projected)  # m = 0: no feedback at any step
        kept_path, h = [], torch.zeros(batch, hidden)
        for t in range(steps):
            h = torch.tanh(projected[:, t] + 2 * h)  # m = 1/(1-p) = 2 at every step
            kept_path.append(h)
        kept_path = torch.stack(kept_path, dim=1)
    follows_dropped = torch.isclose(out, dropped_path, atol=1e-6, rtol=0).all(dim=1)  # (B, H)
    follows_kept = torch.isclose(out, kept_path, atol=1e-6, rtol=0).all(dim=1)
    assert (follows_dropped | follows_kept).all(), "each (sample, unit) must follow one mask for all steps"
    assert not (follows_dropped & follows_kept).any(), "the two trajectories must be distinguishable"
    assert_binomial(follows_dropped.float().mean().item(), p, batch * hidden)


def test_zoneout_train_copies_previous_state_exactly_or_updates() -> None:
    p, batch, steps, hidden = 0.5, 64, 12, 8
    loop = make_loop(nn.RNN, "zoneout", p, hidden=hidden).train()
    x = torch.randn(batch, steps, 5)
    with torch.no_grad():
        out = loop(x)[0]
        zoned_count = 0
        previous = torch.zeros(batch, hidden)
        for t in range(steps):
            current = out[:, t]
            fresh = rnn_step(loop.module, x[:, t], previous)
            zoned = current == previous  # exact copy of the previous state
            torch.testing.assert_close(current[~zoned], fresh[~zoned], atol=1e-6, rtol=0)
            assert not torch.isclose(fresh[zoned], previous[zoned], atol=1e-6, rtol=0).any(), (
                "zoned units must be told apart from updated ones"
            )
            zoned_count += int(zoned.sum())
            previous = current
    assert_binomial(zoned_count / (batch * steps * hidden), p, batch * steps * hidden)


@pytest.mark.parametrize("cell", CELLS)
def test_zoneout_eval_is_the_expectation(cell: type[nn.RNNBase]) -> None:
    p, batch, steps, hidden = 0.3, 5, 10, 8
    loop = make_loop(cell, "zoneout", p, hidden=hidden).eval()
    x = torch.randn(batch, steps, 5)
    with torch.no_grad():
        out = loop(x)[0]
        h, c, expected = torch.zeros(batch, hidden), torch.zeros(batch, hidden), []
        for t in range(steps):
            if cell is nn.LSTM:
                h_new, c_new = lstm_step(loop.module, x[:, t], h, c)
                c = p * c + (1 - p) * c_new
            else:
                h_new = rnn_step(loop.module, x[:, t], h)
            h = p * h + (1 - p) * h_new
            expected.append(h)
        expected = torch.stack(expected, dim=1)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # and it is not the plain recurrence
    assert not torch.allclose(out, loop.module(x)[0], atol=1e-3)
    assert torch.equal(out, loop(x)[0])


def test_loop_recurrent_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown recurrent dropout kind 'dropconnect'"):
        LoopRecurrent(nn.RNN(5, 8, batch_first=True), "dropconnect", 0.5)
    with pytest.raises(ValueError, match="one-layer batch_first"):
        LoopRecurrent(nn.RNN(5, 8, num_layers=2, batch_first=True), "zoneout", 0.5)
    with pytest.raises(ValueError, match="one-layer batch_first"):
        LoopRecurrent(nn.LSTM(5, 8), "recurrent", 0.5)


def test_loop_recurrent_state_dict_matches_fused_module() -> None:
    loop = make_loop(nn.LSTM, "zoneout", 0.5)
    assert list(loop.state_dict()) == [f"module.{key}" for key in nn.LSTM(5, 8, batch_first=True).state_dict()]


# ---------------------------------------------------------------------------------------------- Recurrence (backward)


def reference_loop(
    module: nn.RNNBase, x: torch.Tensor, fed_mask: torch.Tensor | None, keep: torch.Tensor | float | None
) -> torch.Tensor:
    """The recurrence of `Recurrence`, step by step with plain autograd: (B, T, F) -> (B, T, H)."""
    lstm, hidden = isinstance(module, nn.LSTM), module.hidden_size
    h = c = x.new_zeros(x.size(0), hidden)
    outputs = []
    for t in range(x.size(1)):
        fed = h if fed_mask is None else h * fed_mask
        if lstm:
            h_new, c_new = lstm_step(module, x[:, t], fed, c)
        else:
            h_new, c_new = rnn_step(module, x[:, t], fed), c
        if isinstance(keep, torch.Tensor):  # (T, B, S): h's units, then the LSTM's c's
            h = torch.where(keep[t, :, :hidden], h, h_new)
            c = torch.where(keep[t, :, hidden:], c, c_new) if lstm else c_new
        elif keep is not None:
            h, c = keep * h + (1 - keep) * h_new, keep * c + (1 - keep) * c_new
        else:
            h, c = h_new, c_new
        outputs.append(h)
    return torch.stack(outputs, dim=1)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("mode", ["plain", "recurrent", "zoneout", "zoneout_eval"])
def test_recurrence_gradcheck(cell: type[nn.RNNBase], mode: str) -> None:
    """The hand-written backward against finite differences, for x and every weight (float64)."""
    torch.manual_seed(0)
    lstm = cell is nn.LSTM
    batch, steps, features, hidden = 3, 4, 2, 3
    gates, width = (4 * hidden, 2 * hidden) if lstm else (hidden, hidden)
    shapes = [(batch, steps, features), (gates, features), (gates,), (gates, hidden)]
    inputs = [torch.randn(shape, dtype=torch.float64, requires_grad=True) for shape in shapes]  # x, w_ih, bias, w_hh
    fed_mask = dropout_mask(inputs[0], (batch, hidden), 0.5) if mode == "recurrent" else None
    keep = {"zoneout": torch.rand(steps, batch, width) < 0.5, "zoneout_eval": 0.3}.get(mode)
    if mode == "recurrent":
        assert 0 < int((fed_mask == 0).sum()) < fed_mask.numel()
    if mode == "zoneout":
        assert 0 < int(keep.sum()) < keep.numel()
    assert torch.autograd.gradcheck(lambda *args: Recurrence.apply(*args, lstm, fed_mask, keep), inputs)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("kind", ["recurrent", "zoneout"])
@pytest.mark.parametrize("training", [True, False])
def test_loop_gradients_match_plain_autograd(
    cell: type[nn.RNNBase], kind: str, training: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs and gradients of every parameter and of the input equal those of `reference_loop` run with
    the same masks (recorded on their way into `Recurrence`)."""
    loop = make_loop(cell, kind, 0.4).double().train(training)
    seen = {}
    apply = Recurrence.apply

    def recording_apply(*args):
        seen["fed_mask"], seen["keep"] = args[-2:]
        return apply(*args)

    monkeypatch.setattr(Recurrence, "apply", recording_apply)
    x = torch.randn(6, 9, 5, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(6, 9, 8, dtype=torch.float64)  # dL/d output
    out = loop(x)[0]
    if training:
        masked = seen["fed_mask"] if kind == "recurrent" else seen["keep"]
        assert isinstance(masked, torch.Tensor) and 0 < int((masked == 0).sum()) < masked.numel()
    parameters = [x, *loop.module.parameters()]
    grads = torch.autograd.grad((out * upstream).sum(), parameters)
    expected = reference_loop(loop.module, x, seen["fed_mask"], seen["keep"])
    expected_grads = torch.autograd.grad((expected * upstream).sum(), parameters)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    names = ["x", *dict(loop.module.named_parameters())]
    for name, grad, expected_grad in zip(names, grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("cell", CELLS)
def test_loop_exports_and_the_exported_graph_runs_with_grad_enabled(cell: type[nn.RNNBase]) -> None:
    """MLflow logs models through torch.export, which traces `Recurrence.forward` into a graph; that graph is
    then run with grad mode on, where autograd refuses in-place ops on views of tensors that need grad."""
    loop = make_loop(cell, "zoneout", 0.3).eval()
    x = torch.randn(3, 4, 5)
    exported = torch.export.export(loop, (x,)).module()
    assert torch.equal(exported(x)[0], loop(x)[0])


# ---------------------------------------------------------------------------------------------- recurrent_shared


@pytest.mark.parametrize("cell", CELLS)
def test_recurrent_shared_drops_whole_columns_of_w_hh(cell: type[nn.RNNBase]) -> None:
    torch.manual_seed(0)
    p, hidden = 0.3, 400
    model = WeightDrop(cell(5, hidden, batch_first=True), p, columns=True).train()
    raw = model.module.weight_hh_l0.detach().clone()
    seen = []
    model.module.register_forward_pre_hook(lambda module, args: seen.append(module.weight_hh_l0.detach().clone()))
    model(torch.randn(2, 3, 5))
    model(torch.randn(2, 3, 5))
    used = seen[0]  # (G, H)
    dropped = (used == 0).all(dim=0)  # (H,): whole columns
    kept = ~dropped
    assert torch.equal(used[:, kept], raw[:, kept] * (1 / (1 - p)))  # every gate's entry scaled alike
    assert_binomial(dropped.float().mean().item(), p, hidden)
    assert not torch.equal(seen[0] == 0, seen[1] == 0)  # a new mask each forward


def test_recurrent_shared_equals_a_batch_shared_mask_on_the_fed_back_state() -> None:
    torch.manual_seed(1)
    rnn = nn.RNN(5, 16, batch_first=True)
    model = WeightDrop(rnn, 0.5, columns=True).train()
    used = []
    rnn.register_forward_pre_hook(lambda module, args: used.append(module.weight_hh_l0.detach().clone()))
    x = torch.randn(4, 6, 5)
    out, _ = model(x)
    mask = (used[0] != 0).any(dim=0).float() * 2.0  # (H,): the mask on h(t-1), the same for every sample
    h = torch.zeros(4, 16)
    for t in range(6):
        h = torch.tanh(x[:, t] @ rnn.weight_ih_l0.T + rnn.bias_ih_l0 + rnn.bias_hh_l0 + (h * mask) @ rnn.weight_hh_l0.T)
        assert torch.allclose(out[:, t], h, atol=1e-6)


@pytest.mark.parametrize("columns", [False, True])
def test_weight_drop_survives_a_dtype_move(columns: bool) -> None:
    model = WeightDrop(nn.LSTM(5, 8, batch_first=True), 0.5, columns=columns).to(torch.float64).train()
    out, _ = model(torch.randn(2, 4, 5, dtype=torch.float64))
    assert out.dtype == torch.float64
    assert model.module.weight_hh_l0.dtype == torch.float64
