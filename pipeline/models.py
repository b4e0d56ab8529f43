"""Stage 3 — models: three families, each with a selectable dropout type and rate.

In:  a `ModelConfig` and the number of input features F.
Out: an `nn.Module` mapping (B, T, F) windows to (B,) next-day forecasts.

Where each dropout type acts (p = dropout_rate):

| type          | rnn / lstm                                                   | cnn                                  |
|---------------|--------------------------------------------------------------|--------------------------------------|
| `none`        | nowhere                                                      | nowhere                              |
| `head`        | last hidden state only, the head's input (per unit)          | pooled representation only           |
| `standard`    | inputs (fresh mask per sample, step, feature), between       | feature maps after each conv block   |
|               | stacked layers (same), last hidden state                     | (fresh mask per element)             |
| `spatial`     | input features as channels: a whole feature for the whole   | feature-map channels after each      |
|               | window (`nn.Dropout1d` on (B, F, T))                         | conv block (`nn.Dropout1d`)          |
| `variational` | inputs and between layers with one mask per sequence (shared | inputs (one mask per sequence and    |
|               | over time), last hidden state                                | feature), pooled representation      |
| `weight_drop` | DropConnect on W_hh of every layer                           | refused: no recurrent weights        |
| `recurrent`   | mask on h(t-1) per sequence, every layer                     | refused: no recurrence               |
| `recurrent_   | mask on h(t-1) shared by the batch (= column DropConnect on  | refused: no recurrence               |
| shared`       | W_hh, fused kernel kept), a new draw per forward             |                                      |
| `zoneout`     | hidden (and cell) units keep their old value, every layer    | refused: no recurrence               |
| `builtin`     | PyTorch's `nn.RNN(dropout=p)`: between layers only, so it    | refused: no such argument            |
|               | needs num_layers >= 2 (with 1 layer it does nothing)         |                                      |

A type that does not apply is refused by `check_model_config` with the reason, and left out of the
family's search space (`applicable_types`). `standard` and `head` are Srivastava et al. (2014)'s
dropout; the other types cite their papers in `pipeline.dropout`.

`PRESETS` reproduce the three examples of the article that motivated this tool. The third, "an RNN with
its built-in dropout" with one layer, is built as written (`as_written=True`): PyTorch then applies no
dropout at all, and `dropout_effective` says so, so the run is never reported as a dropout run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from pipeline.dropout import LockedDropout, LoopRecurrent, SpatialDropout, WeightDrop
from pipeline.errors import InputError

FAMILIES = ("rnn", "lstm", "cnn")
DROPOUT_TYPES = (
    "none",
    "standard",
    "head",
    "spatial",
    "variational",
    "weight_drop",
    "recurrent",
    "recurrent_shared",
    "zoneout",
    "builtin",
)
RECURRENT_ONLY = {
    "weight_drop": "it drops hidden-to-hidden weights",
    "recurrent": "it masks the fed-back hidden state",
    "recurrent_shared": "it drops columns of the hidden-to-hidden weights",
    "zoneout": "it preserves hidden states between steps",
    "builtin": "it is nn.RNN/nn.LSTM's own dropout argument",
}


@dataclass
class ModelConfig:
    """Model family, size and dropout."""

    model: str = "rnn"  # rnn | lstm | cnn
    hidden_size: int = 32
    num_layers: int = 1  # stacked recurrent layers, or conv blocks for cnn
    kernel_size: int = 3  # cnn only
    dropout_type: str = "none"
    dropout_rate: float = 0.0
    as_written: bool = False  # build `builtin` with one layer anyway (a no-op in PyTorch), to reproduce it


PRESETS: dict[str, dict[str, object]] = {
    # The article's three examples. Its rates are not given; 0.3 is a common middle value.
    "article-rnn": {"model": "rnn", "dropout_type": "head", "dropout_rate": 0.3},  # dropout on the last hidden
    "article-cnn": {"model": "cnn", "dropout_type": "standard", "dropout_rate": 0.3},  # on the feature maps
    "article-rnn-builtin": {  # nn.RNN(dropout=0.3) with one layer: PyTorch applies no dropout
        "model": "rnn",
        "dropout_type": "builtin",
        "num_layers": 1,
        "dropout_rate": 0.3,
        "as_written": True,
    },
}


def dropout_effective(cfg: ModelConfig) -> bool:
    """Whether the model really drops anything in training (False for none, rate 0, one-layer builtin)."""
    return (
        cfg.dropout_type != "none"
        and cfg.dropout_rate > 0
        and not (cfg.dropout_type == "builtin" and cfg.num_layers < 2)
    )


def applicable_types(model: str, num_layers: int = 1) -> tuple[str, ...]:
    """The dropout types `model` accepts with `num_layers` layers (its Optuna search space)."""
    types = DROPOUT_TYPES if model in ("rnn", "lstm") else tuple(t for t in DROPOUT_TYPES if t not in RECURRENT_ONLY)
    return tuple(t for t in types if t != "builtin" or num_layers >= 2)


def check_model_config(cfg: ModelConfig) -> None:
    """Refuse a config that cannot be built, or one whose dropout would silently do nothing."""
    if cfg.model not in FAMILIES:
        raise InputError(f"unknown model {cfg.model!r}: choose one of {', '.join(FAMILIES)}")
    if cfg.dropout_type not in DROPOUT_TYPES:
        raise InputError(f"unknown dropout type {cfg.dropout_type!r}: choose one of {', '.join(DROPOUT_TYPES)}")
    if not 0 <= cfg.dropout_rate < 1:
        raise InputError(f"dropout rate must be in [0, 1), got {cfg.dropout_rate}")
    if cfg.hidden_size < 1 or cfg.num_layers < 1 or cfg.kernel_size < 1:
        raise InputError("hidden_size, num_layers and kernel_size must be at least 1")
    if cfg.model == "cnn" and cfg.dropout_type in RECURRENT_ONLY:
        raise InputError(
            f"dropout type {cfg.dropout_type!r} does not apply to the cnn family "
            f"({RECURRENT_ONLY[cfg.dropout_type]}); cnn takes: {', '.join(applicable_types('cnn'))}"
        )
    if cfg.dropout_type == "builtin" and cfg.num_layers < 2 and not cfg.as_written:
        raise InputError(
            "dropout type 'builtin' needs num_layers >= 2: PyTorch's RNN dropout acts only between "
            "stacked layers, so with one layer it would apply no dropout at all"
        )


def build_model(cfg: ModelConfig, n_features: int) -> nn.Module:
    """The model for `cfg`, taking (B, T, n_features) windows."""
    check_model_config(cfg)
    if cfg.model == "cnn":
        return TemporalCNN(cfg, n_features)
    return RecurrentNet(cfg, n_features)


def _sequence_dropout(kind: str, p: float) -> nn.Module:
    """Dropout for a (B, T, C) sequence: fresh per element, or one mask per sequence."""
    if kind == "standard":
        return nn.Dropout(p)
    if kind == "variational":
        return LockedDropout(p)
    return nn.Identity()


class RecurrentNet(nn.Module):
    """Elman RNN (`rnn`) or LSTM (`lstm`) over the window; a linear head on the last hidden state."""

    def __init__(self, cfg: ModelConfig, n_features: int) -> None:
        super().__init__()
        kind, p = cfg.dropout_type, cfg.dropout_rate
        cell = nn.LSTM if cfg.model == "lstm" else nn.RNN
        if kind == "builtin":
            with warnings.catch_warnings():
                # Only reachable with one layer via `as_written`: we know, and report it as ineffective.
                warnings.filterwarnings("ignore", message="dropout option adds dropout after all but last")
                builtin = cell(n_features, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True, dropout=p)
            self.layers = nn.ModuleList([builtin])
        else:
            sizes = [n_features] + [cfg.hidden_size] * (cfg.num_layers - 1)
            self.layers = nn.ModuleList(
                [self._layer(cell(size, cfg.hidden_size, batch_first=True), kind, p) for size in sizes]
            )
        self.input_drop = SpatialDropout(p) if kind == "spatial" else _sequence_dropout(kind, p)
        self.between_drop = _sequence_dropout(kind, p)
        self.output_drop = nn.Dropout(p) if kind in ("standard", "head", "variational") else nn.Identity()
        self.head = nn.Linear(cfg.hidden_size, 1)

    @staticmethod
    def _layer(layer: nn.RNNBase, kind: str, p: float) -> nn.Module:
        if kind in ("weight_drop", "recurrent_shared"):
            return WeightDrop(layer, p, columns=kind == "recurrent_shared")
        if kind in ("recurrent", "zoneout") and p > 0:
            return LoopRecurrent(layer, kind, p)
        return layer  # rate 0 keeps the fused kernel, so it is exactly the no-dropout model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Batches gathered from the window view are laid out (B, F, T) in memory; the RNN kernels run ~9%
        # faster on a (B, T, F)-contiguous input, worth one small copy.
        x = self.input_drop(x).contiguous()  # (B, T, F)
        for index, layer in enumerate(self.layers):
            if index:
                x = self.between_drop(x)  # (B, T, H)
            x, _ = layer(x)  # (B, T, H)
        last = self.output_drop(x[:, -1])  # (B, H)
        return self.head(last).squeeze(-1)  # (B,)


class TemporalCNN(nn.Module):
    """1D temporal CNN over (B, channels=F, time): conv blocks, mean over time, a linear head."""

    def __init__(self, cfg: ModelConfig, n_features: int) -> None:
        super().__init__()
        kind, p = cfg.dropout_type, cfg.dropout_rate
        blocks = []
        for index in range(cfg.num_layers):
            blocks += [
                nn.Conv1d(
                    n_features if index == 0 else cfg.hidden_size,
                    cfg.hidden_size,
                    cfg.kernel_size,
                    padding=cfg.kernel_size // 2,
                ),
                nn.ReLU(),
                {"standard": nn.Dropout(p), "spatial": nn.Dropout1d(p)}.get(kind, nn.Identity()),
            ]
        self.blocks = nn.Sequential(*blocks)
        self.input_drop = LockedDropout(p) if kind == "variational" else nn.Identity()
        self.output_drop = nn.Dropout(p) if kind in ("head", "variational") else nn.Identity()
        self.head = nn.Linear(cfg.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.input_drop(x)  # (B, T, F)
        # (B, F, T): channels first for Conv1d and Dropout1d; for batches gathered from the window view this
        # transpose is already contiguous in memory.
        maps = self.blocks(x.transpose(1, 2))  # (B, H, T)
        pooled = self.output_drop(maps.mean(dim=2))  # (B, H)
        return self.head(pooled).squeeze(-1)  # (B,)
