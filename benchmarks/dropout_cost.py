"""Cost of each dropout type: training-step time (forward, backward, Adam) against `none`, per family.

For every family × applicable type × (window, hidden), the step is timed on a random batch of 64,
interleaved round by round with the family's `none` model of the same size (and, for `builtin`, the
same two layers), so machine noise hits both alike. We report the ratio of medians.

Run: python benchmarks/dropout_cost.py [--rounds 7] [--steps 10] [--write docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from pipeline.models import FAMILIES, ModelConfig, applicable_types, build_model

SHAPES = [(30, 32), (30, 64), (60, 32), (60, 64)]  # (window, hidden)
N_FEATURES, BATCH, RATE = 5, 64, 0.3


def make_step(cfg: ModelConfig, window: int):
    """A closure running `steps` training steps of `cfg` on a fixed random batch."""
    torch.manual_seed(0)
    model = build_model(cfg, N_FEATURES).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x, y = torch.randn(BATCH, window, N_FEATURES), torch.randn(BATCH)

    def run(steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            loss = nn.functional.mse_loss(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return (time.perf_counter() - start) / steps

    return run


def measure(family: str, window: int, hidden: int, rounds: int, steps: int) -> dict[str, float]:
    """{type: median step time / median step time of `none` with the same layers}."""
    configs = {}
    for kind in applicable_types(family, num_layers=2):
        layers = 2 if kind == "builtin" else 1
        rate = 0.0 if kind == "none" else RATE
        configs[kind] = ModelConfig(family, hidden, layers, dropout_type=kind, dropout_rate=rate)
    configs["none (2 layers)"] = ModelConfig(family, hidden, 2)
    runners = {name: make_step(cfg, window) for name, cfg in configs.items()}
    times: dict[str, list[float]] = {name: [] for name in runners}
    for run in runners.values():
        run(2)  # warm-up
    for round_ in range(rounds):
        order = list(runners) if round_ % 2 == 0 else list(reversed(runners))
        for name in order:
            times[name].append(runners[name](steps))
    medians = {name: statistics.median(values) for name, values in times.items()}
    ratios = {name: medians[name] / medians["none"] for name in configs if name != "none (2 layers)"}
    if "builtin" in ratios:
        ratios["builtin"] = medians["builtin"] / medians["none (2 layers)"]
    ratios["none ms"] = medians["none"] * 1000
    return ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--write", type=Path, help="append the tables to this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = " | ".join(f"w{w} h{h}" for w, h in SHAPES)
    lines = [
        f"### Dropout cost per training step, ratio to `none` ({time.strftime('%Y-%m-%d')})",
        "",
        f"`python benchmarks/dropout_cost.py --rounds {args.rounds} --steps {args.steps}`; {platform.machine()}, "
        f"1 torch thread, torch {torch.__version__}; batch {BATCH}, {N_FEATURES} features, rate {RATE}; "
        f"forward + backward + Adam; medians of {args.rounds} interleaved rounds of {args.steps} steps. "
        "`builtin` is compared with `none` of the same two layers.",
    ]
    for family in FAMILIES:
        results = [measure(family, w, h, args.rounds, args.steps) for w, h in SHAPES]
        lines += ["", f"**{family}**", "", f"| type | {header} |", "|---" * (len(SHAPES) + 1) + "|"]
        lines.append("| `none` step (ms) | " + " | ".join(f"{r['none ms']:.2f}" for r in results) + " |")
        for kind in applicable_types(family, num_layers=2):
            if kind != "none":
                lines.append(f"| `{kind}` | " + " | ".join(f"{r[kind]:.2f}×" for r in results) + " |")
        print("\n".join(lines[-(len(applicable_types(family, 2)) + 3) :]), flush=True)
    text = "\n".join(lines) + "\n"
    if args.write:
        with args.write.open("a") as handle:
            handle.write("\n" + text)


if __name__ == "__main__":
    main()
