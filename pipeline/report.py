"""Stage 8 — report: the evidence, as a self-contained HTML page with PNG figures.

In:  a parent MLflow run: a sweep (`sweep.csv` and `curves.json` artifacts, see `pipeline.sweep`) or an
     Optuna study (its nested trial runs, and the study in the storage named by its tags).
Out: `DIR/index.html` with its figures beside it, also logged to the parent run under `report/`.

For a sweep, every dropout type and rate is compared with `none` of the same family, paired by seed,
and the article's claims are answered one by one (the statistics are in `pipeline.verdicts`); this
module draws the figures and writes the page.
"""

from __future__ import annotations

import html
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats

from pipeline.verdicts import (
    ALPHA,
    MEASURES,
    benjamini_hochberg,
    builtin_claim,
    by_config,
    direction_claim,
    dropout1d_claim,
    paired_tests,
    rate_claim,
    read_rows,
    rnn_vs_cnn_claim,
    spread_claim,
    spread_tests,
)

# --- figures --------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    return plt


def rate_figure(grouped: dict, family: str, path: Path) -> None:
    """Each measure against the rate, one line per type with 95% CIs over seeds; none as a band."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(MEASURES), figsize=(4 * len(MEASURES), 3.4), squeeze=False)
    kinds = sorted({k for f, k, _ in grouped if f == family} - {"none"})
    for ax, (measure, (label, _)) in zip(axes[0], MEASURES.items(), strict=True):
        control = list(grouped.get((family, "none", 0.0), {}).values())
        if control:
            values = [row[measure] for row in control]
            low, high = _ci(values)
            ax.axhspan(low, high, color="grey", alpha=0.25, label="none (95% CI)")
        for kind in kinds:
            points = sorted(
                (rate, _ci([r[measure] for r in grouped[(family, kind, rate)].values()]))
                for f, k, rate in grouped
                if f == family and k == kind
            )
            rates = [p[0] for p in points]
            mids = [(lo + hi) / 2 for _, (lo, hi) in points]
            errs = [(hi - lo) / 2 for _, (lo, hi) in points]
            ax.errorbar(rates, mids, yerr=errs, marker="o", capsize=3, label=kind)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("dropout rate")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{family}: instability against dropout rate (mean and 95% CI over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _ci(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=np.float64)
    if array.size < 2:
        return float(array.mean()), float(array.mean())
    half = float(stats.t.ppf(1 - ALPHA / 2, array.size - 1)) * array.std(ddof=1) / math.sqrt(array.size)
    return float(array.mean()) - half, float(array.mean()) + half


def curves_figure(records: list[dict], path: Path) -> None:
    """Validation loss by epoch for the best and the worst config (by objective): mean and seed band."""
    plt = _pyplot()
    scored = [r for r in records if r["objective"] is not None and r["curves"]]
    picks = {"best": min(scored, key=lambda r: r["objective"]), "worst": max(scored, key=lambda r: r["objective"])}
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, record in picks.items():
        length = max(len(c["val_loss"]) for c in record["curves"])
        matrix = np.full((len(record["curves"]), length), np.nan)
        for row, curve in enumerate(record["curves"]):
            matrix[row, : len(curve["val_loss"])] = curve["val_loss"]
        epochs = np.arange(1, length + 1)
        label = f"{name}: {record['family']} {record['type']} p={record['rate']:.2f}"
        line = ax.plot(epochs, np.nanmean(matrix, axis=0), marker=".", label=label)[0]
        ax.fill_between(epochs, np.nanmin(matrix, axis=0), np.nanmax(matrix, axis=0), alpha=0.2, color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation loss (scaled MSE)")
    ax.set_title("Best and worst config: mean over seeds, band = min..max across seeds", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# --- the page -------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


STYLE = (
    "body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
    "table{border-collapse:collapse;font-size:13px;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px}"
    ".warn{background:#fff3cd;border:2px solid #e0a800;padding:1em;font-weight:bold}img{max-width:100%}"
)


def page(title: str, sections: list[str]) -> str:
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>"
    )


def naive_banner(rows: list[dict], unit: str) -> str:
    """A prominent warning when the models do not beat the zero-return forecast on validation."""
    ratios = [float(r["best_val_vs_naive"]) for r in rows]
    beaten = sum(r < 1 for r in ratios)
    if beaten > len(ratios) / 2:
        return f"<p>{beaten} of {len(ratios)} {unit} beat the naive zero-return forecast on validation.</p>"
    return (
        f"<p class='warn'>{beaten} of {len(ratios)} {unit} beat the naive "
        "zero-return forecast on validation (best validation loss / naive loss: median "
        f"{np.median(ratios):.3f}). The stability measured here is that of models that learn little or "
        "nothing; treat it as a weaker answer.</p>"
    )


def sweep_report(rows: list[dict], records: list[dict], out: Path) -> list[Path]:
    """Write the sweep's page and figures into `out`; return the files written."""
    grouped = by_config(rows)
    tests = paired_tests(grouped)
    seeds = sorted({int(r["seed"]) for r in rows})
    epochs = sorted({len(c["val_loss"]) for r in records for c in r["curves"]})
    claims = [
        direction_claim("Dropout increases the noise of the training loss", tests, "batch_loss_noise_rel"),
        direction_claim("Dropout slows convergence (later best epoch)", tests, "best_epoch_mean"),
        direction_claim("Dropout makes validation loss jump more between epochs", tests, "epoch_jitter"),
        spread_claim(spread_tests(grouped)),
        rnn_vs_cnn_claim(grouped),
        rate_claim(grouped),
        builtin_claim(records),
        dropout1d_claim(),
    ]
    files = []
    sections = [
        f"<p>Seeds per config: {len(seeds)}; epochs per seed: {min(epochs)}..{max(epochs)} (early stopping). "
        "Every comparison is paired by seed against <code>none</code> of the same family (same initial weights "
        "and batch order). Definitions: docs/metrics.md.</p>",
        naive_banner(rows, "trained models (config × seed)"),
        "<h2>The article's claims</h2>",
        _table(["claim", "answer", "evidence"], [(c.claim, c.answer, c.evidence) for c in claims]),
    ]
    if any(str(r["type"]) == "builtin_1layer" for r in rows):
        sections.append(
            "<p class='warn'>builtin_1layer is nn.RNN(dropout=p) with one layer, built as the article wrote it: "
            "PyTorch applies no dropout at all, so these runs are not dropout runs (tagged "
            "dropout_effective=false); they are shown next to none for that reason only.</p>"
        )
    for family in sorted({str(r["family"]) for r in rows}):
        name = f"rates_{family}.png"
        rate_figure(grouped, family, out / name)
        files.append(out / name)
        sections.append(f"<h2>{family}</h2><img src='{name}' alt='{family} instability against rate'>")
    curves_figure(records, out / "curves.png")
    files.append(out / "curves.png")
    sections.append("<h2>Loss curves</h2><img src='curves.png' alt='best and worst config curves'>")
    sections.append("<h2>Verdicts per config (vs none, paired by seed)</h2>")
    sections.append(
        _table(
            ["family", "type", "rate", "measure", "mean diff", "95% CI", "relative", "p", "q (BH)", "verdict"],
            [
                (
                    t.family,
                    t.kind,
                    f"{t.rate:.2f}",
                    MEASURES[t.measure][0],
                    f"{t.effect.mean_diff:+.4g}",
                    f"[{t.effect.ci_low:+.3g}, {t.effect.ci_high:+.3g}]",
                    f"{t.effect.rel_diff:+.1%}",
                    f"{t.effect.p_value:.3g}",
                    f"{t.q_value:.3g}",
                    t.verdict,
                )
                for t in tests
            ],
        )
    )
    spreads = spread_tests(grouped)
    q = benjamini_hochberg([s[5] for s in spreads])
    sections.append("<h2>Seed spread of the best validation loss (Levene test vs none)</h2>")
    sections.append(
        _table(
            ["family", "type", "rate", "std across seeds", "none", "p", "q (BH)"],
            [
                (f, k, f"{r:.2f}", f"{a:.4g}", f"{b:.4g}", f"{p:.3g}", f"{qq:.3g}")
                for (f, k, r, a, b, p), qq in zip(spreads, q, strict=True)
            ],
        )
    )
    summary_rows = sorted({(r["family"], r["type"], r["rate"]) for r in rows}, key=lambda key: (key[0], key[1], key[2]))
    sections.append("<h2>Against the naive zero-return forecast</h2>")
    sections.append(
        _table(
            ["family", "type", "rate", "best val / naive (mean over seeds)"],
            [
                (
                    f,
                    k,
                    f"{rate:.2f}",
                    f"{np.mean([g['best_val_vs_naive'] for g in grouped[(f, k, rate)].values()]):.4f}",
                )
                for f, k, rate in summary_rows
            ],
        )
    )
    (out / "index.html").write_text(page("Does dropout destabilise training? Sweep report", sections))
    return [out / "index.html", *files]


def lay_out(figure) -> None:
    """Size an Optuna figure for the page. A slice plot's colour bar is an axes of its own that tight_layout
    does not move, so the panels are placed by hand beside it, with slanted tick labels (dropout type names
    are long)."""
    bars = [axis for axis in figure.axes if axis.get_label() == "<colorbar>"]
    if not bars:
        figure.set_size_inches(9, 3.6)
        figure.tight_layout()
        return
    figure.set_size_inches(11, 4.2)
    figure.subplots_adjust(left=0.09, right=0.87, bottom=0.3, top=0.88, wspace=0.25)
    bars[0].set_position([0.9, 0.3, 0.015, 0.58])
    for axis in figure.axes:
        if axis not in bars:
            axis.tick_params(axis="x", labelrotation=25)
            for label in axis.get_xticklabels():
                label.set_horizontalalignment("right")


FEW_TRIALS = 20  # below this many completed trials the study page warns that importances are noise


def final_section(run, trials: list) -> str:
    """What the study produced: the best trial's config retrained with all seeds, tested once against the
    naive forecast, and where its forecaster was registered; or why there is none. `trials`: the completed
    trial runs, best objective first."""
    metrics, tags = run.data.metrics, run.data.tags
    if "test_loss" not in metrics or "best_trial_number" not in metrics:
        return (
            "<h2>Final model</h2>"
            f"<p>None: the study's run ended {html.escape(run.info.status)} before the best trial was retrained "
            "and tested. Run the study again with the same <code>--study-name</code> to resume it.</p>"
        )
    number = str(int(metrics["best_trial_number"]))
    later = ""
    if trials and trials[0].data.params.get("trial_number") != number:
        later = (
            f"<p>Trial {html.escape(trials[0].data.params.get('trial_number', '?'))} scores better than trial "
            f"{number} but finished after the retrain (a worker that joined later): run the study again with the "
            "same <code>--study-name</code> to retrain its best.</p>"
        )
    best = next((c for c in trials if c.data.params.get("trial_number") == number), None)
    config = (
        f"{best.data.params.get('dropout_type')}, rate {float(best.data.params.get('dropout_rate', 0)):.3f}"
        if best
        else "see best_config.yaml"
    )
    skill = metrics["test_skill"]
    verdict = "beats" if skill > 0 else "does <b>not</b> beat"
    return (
        "<h2>Final model</h2>"
        f"<p>Best trial {number} ({html.escape(config)}) retrained with all seeds: objective "
        f"{metrics['objective']:.4f} (val mean {metrics['val_loss_mean']:.4f}). On the test part, touched only "
        f"here: MSE {metrics['test_loss']:.4f} against {metrics['naive_test_loss']:.4f} for the naive "
        f"zero-return forecast (skill {skill:+.2%}): it {verdict} the naive forecast.</p>"
        f"<p>Forecaster: {html.escape(tags.get('registered_model', 'not registered'))}; "
        f"{html.escape(tags.get('champion_decision', ''))}.</p>{later}"
    )


def study_report(run, client, out: Path) -> list[Path]:
    """Write a study's page: trials table, the final model's test result and registry decision, Optuna's
    history / importance / slice plots, naive baseline."""
    import optuna

    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'", max_results=5000
    )
    trials = sorted((c for c in children if "objective" in c.data.metrics), key=lambda c: c.data.metrics["objective"])
    files: list[Path] = []
    sections = [
        naive_banner(
            [{"best_val_vs_naive": c.data.metrics["best_val_vs_naive"]} for c in trials],
            "completed trials (mean over each trial's seeds)",
        )
        if trials
        else "<p class='warn'>No trial completed.</p>",
        final_section(run, trials),
        "<h2>Trials by objective</h2>",
        f"<p>{len(trials)} completed trials; {len(children) - len(trials)} pruned or failed trials have no "
        "objective and are not listed. Columns are defined in docs/metrics.md.</p>",
        _table(
            [
                "trial",
                "type",
                "rate",
                "objective",
                "val mean",
                "val std",
                "seed spread",
                "loss noise (rel)",
                "best val / naive",
                "state",
            ],
            [
                (
                    c.data.params.get("trial_number"),
                    c.data.params.get("dropout_type"),
                    f"{float(c.data.params.get('dropout_rate', 0)):.3f}",
                    f"{c.data.metrics['objective']:.4f}",
                    f"{c.data.metrics['val_loss_mean']:.4f}",
                    f"{c.data.metrics['val_loss_std']:.4f}",
                    f"{c.data.metrics.get('seed_spread_best_val', float('nan')):.4f}",
                    f"{c.data.metrics.get('batch_loss_noise_rel', float('nan')):.4f}",
                    f"{c.data.metrics.get('best_val_vs_naive', float('nan')):.4f}",
                    c.data.tags.get("trial_state"),
                )
                for c in trials
            ],
        ),
    ]
    name, storage = run.data.tags.get("optuna.study_name"), run.data.tags.get("optuna.storage")
    if name and storage:
        study = optuna.load_study(study_name=name, storage=storage)
        plt = _pyplot()
        plots = {
            "history.png": optuna.visualization.matplotlib.plot_optimization_history,
            "importances.png": optuna.visualization.matplotlib.plot_param_importances,
            "slice.png": optuna.visualization.matplotlib.plot_slice,
        }
        for filename, plot in plots.items():
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                    axes = plot(study)
            except (ValueError, RuntimeError) as exc:  # e.g. importances need two completed trials
                sections.append(f"<p>{filename[:-4]}: not available ({html.escape(str(exc))})</p>")
                continue
            figure = np.ravel(axes)[0].figure
            lay_out(figure)
            figure.savefig(out / filename, dpi=90)
            plt.close(figure)
            files.append(out / filename)
            sections.append(f"<h2>{filename[:-4]}</h2><img src='{filename}' alt='{filename[:-4]}'>")
            if filename == "importances.png" and len(trials) < FEW_TRIALS:
                sections.append(
                    f"<p>Estimated from {len(trials)} completed trials: with fewer than {FEW_TRIALS}, Optuna's "
                    "importances change from one study to the next; read them as a hint, not a measurement "
                    "(a sweep measures each type and rate directly).</p>"
                )
    (out / "index.html").write_text(page(f"Study report: {name or run.info.run_id}", sections))
    return [out / "index.html", *files]


def build_report(run_id: str, out: Path) -> list[Path]:
    """Build the report of a sweep or study parent run into `out` and log it to that run under `report/`."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.errors import InputError

    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise InputError(f"no MLflow run {run_id!r} in {mlflow.get_tracking_uri()}") from None
    out.mkdir(parents=True, exist_ok=True)
    kind = run.data.tags.get("pipeline.kind")
    if kind == "sweep":
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # keep the terminal to our lines
        local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(out / ".artifacts")))
        rows = read_rows((local / "sweep.csv").read_text())
        records = json.loads((local / "curves.json").read_text())
        if not rows:
            raise InputError(f"sweep run {run_id} has no completed config to report on")
        files = sweep_report(rows, records, out)
    elif kind == "study":
        files = study_report(run, client, out)
    else:
        raise InputError(f"run {run_id} is neither a sweep nor a study parent run (tag pipeline.kind is {kind!r})")
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path="report")
    return files
