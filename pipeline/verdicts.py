"""The statistics behind the report: paired comparisons with `none`, and the article's claims answered.

In:  the per-seed rows of a sweep (`sweep.csv`, one row per family × type × rate × seed) and its curves.
Out: `Test`s (each type × rate against its family's `none`, per measure, paired by seed: mean difference,
     95% t-interval, paired t-test, Benjamini–Hochberg q-value over all tests), seed-spread tests (Levene),
     and `Claim`s: supported, contradicted, or not detectable with this budget.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALPHA = 0.05
# Measure -> (label, higher is worse?). Convergence: a later best epoch is slower.
MEASURES = {
    "batch_loss_noise_rel": ("training-loss noise (relative)", True),
    "epoch_jitter": ("epoch-to-epoch jitter of val loss", True),
    "grad_noise_cv": ("gradient noise (CV)", True),
    "best_epoch_mean": ("best epoch (convergence)", True),
    "best_val_loss_mean": ("best validation loss", True),
}
SHARED_TYPES = ("standard", "head", "spatial", "variational")  # types both RNNs and CNNs take


@dataclass(frozen=True)
class Effect:
    """Paired comparison of a treated config with its control over the same seeds."""

    n: int
    mean_diff: float  # mean of treated - control
    ci_low: float
    ci_high: float
    rel_diff: float  # mean_diff / mean(control)
    p_value: float  # two-sided paired t-test; 1.0 when every difference is 0


def paired_effect(treated: Sequence[float], control: Sequence[float]) -> Effect:
    """Mean paired difference with a 95% t-interval and a paired t-test (n >= 2 pairs)."""
    t, c = np.asarray(treated, dtype=np.float64), np.asarray(control, dtype=np.float64)
    diff = t - c
    n, mean = diff.size, float(diff.mean())
    sd = float(diff.std(ddof=1)) if n > 1 else 0.0
    rel = mean / float(c.mean()) if c.mean() != 0 else 0.0
    if sd == 0.0:  # identical differences: a t-test is undefined; no difference at all is p = 1
        return Effect(n, mean, mean, mean, rel, 1.0 if mean == 0 else 0.0)
    half = float(stats.t.ppf(1 - ALPHA / 2, n - 1)) * sd / math.sqrt(n)
    p = float(stats.ttest_rel(t, c).pvalue)
    return Effect(n, mean, mean - half, mean + half, rel, p)


def benjamini_hochberg(p_values: Sequence[float]) -> list[float]:
    """BH-adjusted q-values (the false discovery rate at which each test would be called significant)."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0:
        return []
    order = np.argsort(p)
    ranked = p[order] * p.size / np.arange(1, p.size + 1)
    q = np.minimum.accumulate(ranked[::-1])[::-1].clip(max=1.0)
    out = np.empty_like(q)
    out[order] = q
    return out.tolist()


# --- reading a sweep ------------------------------------------------------------------------------


def read_rows(text: str) -> list[dict[str, object]]:
    """sweep.csv -> rows with floats for numbers."""
    rows = []
    for raw in csv.DictReader(io.StringIO(text)):
        row: dict[str, object] = {}
        for key, value in raw.items():
            try:
                row[key] = float(value)
            except ValueError:
                row[key] = value
        rows.append(row)
    return rows


def by_config(rows: list[dict]) -> dict[tuple[str, str, float], dict[int, dict]]:
    """{(family, type, rate): {seed: row}}; `none` has rate 0."""
    grouped: dict[tuple[str, str, float], dict[int, dict]] = {}
    for row in rows:
        key = (str(row["family"]), str(row["type"]), float(row["rate"]))
        grouped.setdefault(key, {})[int(row["seed"])] = row
    return grouped


@dataclass
class Test:
    family: str
    kind: str
    rate: float
    measure: str
    effect: Effect
    q_value: float = 1.0

    @property
    def verdict(self) -> str:
        if self.q_value >= ALPHA:
            return "no detectable change"
        worse = (self.effect.mean_diff > 0) == MEASURES[self.measure][1]
        return "worse" if worse else "better"


def paired_tests(grouped: dict[tuple[str, str, float], dict[int, dict]]) -> list[Test]:
    """Every (family, type, rate) against its family's `none`, per measure, paired by seed; BH-corrected."""
    tests = []
    for (family, kind, rate), seeds in sorted(grouped.items()):
        control = grouped.get((family, "none", 0.0))
        if kind == "none" or control is None:
            continue
        common = sorted(set(seeds) & set(control))
        if len(common) < 2:
            continue
        for measure in MEASURES:
            effect = paired_effect([seeds[s][measure] for s in common], [control[s][measure] for s in common])
            tests.append(Test(family, kind, rate, measure, effect))
    for test, q in zip(tests, benjamini_hochberg([t.effect.p_value for t in tests]), strict=True):
        test.q_value = q
    return tests


MIN_SPREAD_SEEDS = 4  # seeds per config below which a spread test is not run (see spread_tests)


def spread_tests(
    grouped: dict[tuple[str, str, float], dict[int, dict]],
) -> list[tuple[str, str, float, float, float, float]]:
    """Seed spread: (family, type, rate, std of best val across seeds, same for none, Levene p).

    Only configs with at least MIN_SPREAD_SEEDS seeds (and none with as many) are tested: with 2 values per
    group the median-centred deviations within a group are equal, so Levene's test calls any difference in
    spread, however small, significant (p ~ 1e-26 for 0.001 against 0.0005)."""
    out = []
    for (family, kind, rate), seeds in sorted(grouped.items()):
        control = grouped.get((family, "none", 0.0))
        if kind == "none" or control is None or min(len(seeds), len(control)) < MIN_SPREAD_SEEDS:
            continue
        a = [row["best_val_loss_mean"] for row in seeds.values()]
        b = [row["best_val_loss_mean"] for row in control.values()]
        with np.errstate(divide="ignore", invalid="ignore"):  # identical deviations: a NaN p, read as 1
            p = float(stats.levene(a, b, center="median").pvalue) if np.std(a) + np.std(b) > 0 else 1.0
        out.append((family, kind, rate, float(np.std(a)), float(np.std(b)), 1.0 if math.isnan(p) else p))
    return out


# --- the article's claims -------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    claim: str
    answer: str  # supported | contradicted | not detectable with this budget | not tested | a measured fact
    evidence: str


def direction_claim(claim: str, tests: list[Test], measure: str) -> Claim:
    """'Dropout makes <measure> worse': supported if significant 'worse' results outnumber 'better' ones."""
    relevant = [t for t in tests if t.measure == measure and t.kind != "builtin_1layer"]
    if not relevant:
        return Claim(claim, "not tested", "no dropout config was compared with none")
    worse = [t for t in relevant if t.verdict == "worse"]
    better = [t for t in relevant if t.verdict == "better"]
    evidence = (
        f"{len(worse)} of {len(relevant)} type×rate configs significantly worse than none, {len(better)} "
        f"significantly better (paired by seed, BH q < {ALPHA})"
    )
    return vote(claim, len(worse), len(better), evidence)


def vote(claim: str, supporting: int, contradicting: int, evidence: str) -> Claim:
    """The answer from counts of significant results for and against a claim."""
    if supporting > contradicting:
        return Claim(claim, "supported", evidence)
    if contradicting > supporting:
        return Claim(claim, "contradicted", evidence)
    return Claim(claim, "not detectable with this budget", evidence)


def spread_claim(spreads: list[tuple[str, str, float, float, float, float]]) -> Claim:
    """'Dropout widens the spread across seeds' from the Levene tests of `spread_tests`, BH-corrected."""
    claim = "Dropout widens the spread of the best validation loss across seeds"
    spreads = [s for s in spreads if s[1] != "builtin_1layer"]
    if not spreads:
        why = f"no dropout config with at least {MIN_SPREAD_SEEDS} seeds was compared with none (Levene's test"
        return Claim(claim, "not tested", f"{why} needs {MIN_SPREAD_SEEDS} per config to mean anything)")
    q = benjamini_hochberg([s[5] for s in spreads])
    wider = sum(qq < ALPHA and s[3] > s[4] for s, qq in zip(spreads, q, strict=True))
    narrower = sum(qq < ALPHA and s[3] < s[4] for s, qq in zip(spreads, q, strict=True))
    evidence = (
        f"{wider} of {len(spreads)} type×rate configs significantly wider than none, {narrower} narrower "
        f"(Levene test on the seeds' best validation losses, BH q < {ALPHA})"
    )
    return vote(claim, wider, narrower, evidence)


def relative_effects(
    grouped: dict, family: str, kinds: Sequence[str], measure: str
) -> dict[tuple[str, float], list[float]]:
    """{(type, rate): per-seed relative change of `measure` against none}, for the given types."""
    control = grouped.get((family, "none", 0.0), {})
    out = {}
    for (fam, kind, rate), seeds in grouped.items():
        if fam == family and kind in kinds and kind != "none":
            common = sorted(set(seeds) & set(control))
            out[(kind, rate)] = [
                (seeds[s][measure] - control[s][measure]) / control[s][measure] for s in common if control[s][measure]
            ]
    return out


def rnn_vs_cnn_claim(grouped: dict, measure: str = "batch_loss_noise_rel") -> Claim:
    claim = "The effect on training-loss noise is larger in RNNs than in CNNs"
    rnn = relative_effects(grouped, "rnn", SHARED_TYPES, measure)
    cnn = relative_effects(grouped, "cnn", SHARED_TYPES, measure)
    shared = sorted(set(rnn) & set(cnn))
    if not shared:
        return Claim(claim, "not tested", "needs a sweep over both rnn and cnn (-P model=all) with shared types")
    a = [v for key in shared for v in rnn[key]]
    b = [v for key in shared for v in cnn[key]]
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue) if len(a) > 1 and len(b) > 1 else 1.0
    evidence = (
        f"mean relative change vs none: rnn {np.mean(a):+.1%}, cnn {np.mean(b):+.1%} over {len(shared)} shared "
        f"type×rate configs (Welch t-test p = {p:.3g})"
    )
    if p < ALPHA:
        return Claim(claim, "supported" if np.mean(a) > np.mean(b) else "contradicted", evidence)
    return Claim(claim, "not detectable with this budget", evidence)


def rate_claim(grouped: dict, measure: str = "batch_loss_noise_rel") -> Claim:
    claim = "The effect grows with the dropout rate"
    results = []
    for family in sorted({key[0] for key in grouped}):
        kinds = sorted({key[1] for key in grouped if key[0] == family} - {"none", "builtin_1layer"})
        for kind, (rates, values) in (
            (kind, _pooled(relative_effects(grouped, family, [kind], measure))) for kind in kinds
        ):
            if len(set(rates)) >= 2:
                rho, p = stats.spearmanr(rates, values)
                results.append((family, kind, float(rho), 1.0 if math.isnan(p) else float(p)))
    if not results:
        return Claim(claim, "not tested", "needs at least two rates per type")
    q = benjamini_hochberg([r[3] for r in results])
    up = [r for r, qq in zip(results, q, strict=True) if qq < ALPHA and r[2] > 0]
    down = [r for r, qq in zip(results, q, strict=True) if qq < ALPHA and r[2] < 0]
    evidence = (
        f"Spearman correlation of rate with the per-seed relative change in training-loss noise: "
        f"{len(up)} of {len(results)} family×type significantly increasing, {len(down)} decreasing (BH)"
    )
    return vote(claim, len(up), len(down), evidence)


def _pooled(effects: dict[tuple[str, float], list[float]]) -> tuple[list[float], list[float]]:
    rates = [rate for (_, rate), values in effects.items() for _ in values]
    values = [v for values in effects.values() for v in values]
    return rates, values


def builtin_claim(curves: list[dict]) -> Claim:
    claim = "nn.RNN(dropout=p) with one layer applies no dropout"
    control = next((c for c in curves if c["family"] == "rnn" and c["type"] == "none"), None)
    literal = [c for c in curves if c["family"] == "rnn" and c["type"] == "builtin_1layer"]
    if control is None or not literal:
        return Claim(claim, "not tested", "needs an rnn sweep with builtin (or all types)")
    identical = all(c["curves"] == control["curves"] for c in literal)
    evidence = (
        f"{len(literal)} rate(s) × {len(control['curves'])} seeds: every training and validation loss of every "
        f"epoch {'bitwise identical to' if identical else 'DIFFERENT from'} none under the same seed"
    )
    return Claim(claim, "measured: true" if identical else "measured: false", evidence)


def dropout1d_claim() -> Claim:
    import torch

    exists = hasattr(torch.nn, "Dropout1d")
    return Claim(
        "PyTorch has a dedicated 1D dropout module",
        "true" if exists else "false",
        "torch.nn.Dropout1d zeroes whole channels of a (N, C, L) input; on (batch, time, features) it would "
        "drop whole time steps, so `spatial` transposes first (tests/test_dropout.py)",
    )
