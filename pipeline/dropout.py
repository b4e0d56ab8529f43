"""Dropout variants for sequence models, each small enough to read in a minute.

Every module here is the identity in eval mode and at rate 0, and scales kept values by 1/(1-p) in
training so that expectations match eval mode. Probabilities are named `p`.

Where each type is applied in each model family is documented in `pipeline.models`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from pipeline.recurrent_loop import Recurrence


def dropout_mask(like: torch.Tensor, shape: tuple[int, ...], p: float) -> torch.Tensor:
    """A Bernoulli(1-p) mask of `shape`, scaled by 1/(1-p), with `like`'s dtype and device.

    One helper serves every masked variant, so they share the same scaling convention.
    """
    return like.new_empty(shape).bernoulli_(1 - p).div_(1 - p)


class LockedDropout(nn.Module):
    """Variational dropout (Gal & Ghahramani 2016, "A Theoretically Grounded Application of Dropout in
    Recurrent Neural Networks"): one mask per sequence, shared by every time step.

    In: (B, T, F) -> out (B, T, F), element (b, t, f) kept iff mask[b, f]. A (B, F) input gets one mask
    per sample, which for a single step is the same thing.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        shape = (x.size(0), 1, x.size(2)) if x.dim() == 3 else tuple(x.shape)
        return x * dropout_mask(x, shape, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SpatialDropout(nn.Module):
    """Channel dropout of input features (Tompson et al. 2015, "Efficient Object Localization Using
    Convolutional Networks"), through PyTorch's `nn.Dropout1d`.

    `nn.Dropout1d` treats dim 1 as channels, so on a (B, T, F) tensor it would drop whole *time steps*.
    We lay the sequence out as (B, F, T) so that a whole feature is dropped for the whole window.
    In: (B, T, F) -> out (B, T, F). A 2-D input is refused: `nn.Dropout1d` would silently treat it as
    one unbatched sample.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.drop = nn.Dropout1d(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"spatial dropout expects a (batch, time, features) tensor, got shape {tuple(x.shape)}")
        return self.drop(x.transpose(1, 2)).transpose(1, 2)  # (B, F, T) while masking


class WeightDrop(nn.Module):
    """DropConnect on the hidden-to-hidden weights of an `nn.RNN`/`nn.LSTM` (Wan et al. 2013; Merity et
    al. 2018, "Regularizing and Optimizing LSTM Language Models", AWD-LSTM).

    A new mask on W_hh is drawn at each forward in training; the same mask serves every time step and
    every sample of the batch. The raw weight stays the wrapped module's own parameter, so
    `state_dict()`, strict loading, `.to(device)` and `eval()` behave as for the plain module, and the
    dropped weight is passed through `torch.func.functional_call`, which keeps PyTorch's fused kernel
    (no per-step warning, no parameter deletion hack). Gradients reach the raw weight through the mask.

    With `columns=True` whole columns of W_hh (G, H) are dropped: hidden unit j of h(t-1) is cut from
    every gate. That is exactly a recurrent mask on h(t-1) (Gal & Ghahramani 2016) shared by the whole
    batch instead of drawn per sample: the `recurrent_shared` type, which keeps the fused kernel.
    """

    def __init__(self, module: nn.RNNBase, p: float, columns: bool = False) -> None:
        super().__init__()
        self.module = module
        self.p = p
        self.columns = columns
        self.names = [f"weight_hh_l{k}" for k in range(module.num_layers)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, object]:
        if not self.training or self.p == 0:
            return self.module(x)
        dropped = {name: self._drop(getattr(self.module, name)) for name in self.names}
        return functional_call(self.module, dropped, (x,))

    def _drop(self, weight: torch.Tensor) -> torch.Tensor:  # (G, H) -> (G, H)
        if self.columns:
            return weight * dropout_mask(weight, (1, weight.size(1)), self.p)  # one draw per hidden unit
        return F.dropout(weight, self.p, True)

    def extra_repr(self) -> str:
        return f"p={self.p}, weights={self.names}, columns={self.columns}"


class LoopRecurrent(nn.Module):
    """A one-layer Elman RNN or LSTM run step by step, for dropout that acts inside the recurrence.

    It owns an `nn.RNN`/`nn.LSTM` (same parameter names, so the state dict matches the fused model).
    The recurrence is `pipeline.recurrent_loop.Recurrence`, an autograd Function with a hand-written
    backward: the input projection for all steps is one matmul, only h(t-1) @ W_hh and the cell's
    element-wise update run per step.

    - `recurrent`: Gal & Ghahramani (2016)'s recurrent mask, what Keras calls `recurrent_dropout`: the
      hidden state h(t-1) fed back at each step is multiplied by a mask drawn once per sequence
      (per sample and hidden unit), shared by every step.
    - `zoneout` (Krueger et al. 2017, "Zoneout: Regularizing RNNs by Randomly Preserving Hidden
      Activations"): each hidden (and LSTM cell) unit keeps its previous value with probability p, a
      fresh draw per step; in eval the update is the expectation p * old + (1 - p) * new.

    In: (B, T, F) -> (outputs (B, T, H), None).
    """

    def __init__(self, module: nn.RNNBase, kind: str, p: float) -> None:
        super().__init__()
        if kind not in ("recurrent", "zoneout"):
            raise ValueError(f"unknown recurrent dropout kind {kind!r}")
        if module.num_layers != 1 or not module.batch_first:
            raise ValueError("LoopRecurrent wraps a one-layer batch_first module")
        self.module = module
        self.kind = kind
        self.p = p
        self.lstm = isinstance(module, nn.LSTM)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        m = self.module
        batch, steps, _ = x.shape
        recurrent_mask, keep = None, None  # as `Recurrence` takes them
        if self.p > 0 and self.kind == "recurrent" and self.training:
            recurrent_mask = dropout_mask(x, (batch, m.hidden_size), self.p)
        elif self.p > 0 and self.kind == "zoneout":
            # Training: True where a unit (of h, and of the LSTM's c) keeps its old value, every step drawn in
            # one RNG call. Eval: the expectation p * old + (1 - p) * new.
            width = m.hidden_size * (2 if self.lstm else 1)
            keep = torch.rand(steps, batch, width, device=x.device) < self.p if self.training else self.p
        bias = m.bias_ih_l0 + m.bias_hh_l0
        return Recurrence.apply(x, m.weight_ih_l0, bias, m.weight_hh_l0, self.lstm, recurrent_mask, keep), None

    def extra_repr(self) -> str:
        return f"kind={self.kind}, p={self.p}"
