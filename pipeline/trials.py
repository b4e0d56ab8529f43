"""Stage 6c — trials: every trial of a study as a table (`trials.csv`) and a figure (`trials.png`) on the
parent run, so the MLflow UI answers "which dropout type and rate, how stable" at a glance.

In:  an Optuna study whose trials carry their summary metrics, run id and worker as user attributes (set
     by `pipeline.tune`'s objective), with the parent run active.
Out: the rows (one per trial, any state) and the two artifacts on the active run.
"""

from __future__ import annotations

import csv
import io
import tempfile
import warnings
from pathlib import Path
from typing import Any

import mlflow
import optuna

from pipeline.stability import INSTABILITY
from pipeline.tracking import log_text_artifact

PARTS = ("val_loss_mean", "val_loss_std", *[m for m in INSTABILITY if m != "val_loss_std"], "instability_term")
TRIAL_COLUMNS = ("trial", "state", "dropout_type", "dropout_rate", "objective", *PARTS)
TRIAL_COLUMNS += ("epochs", "duration_s", "run_id", "worker", "fail_reason")


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial of the study (any state): sampled config, objective and its parts, cost, run id.

    Values a trial does not have (the objective of a pruned trial) are empty; `epochs` is the last epoch
    it reported.
    """
    rows = []
    for trial in study.get_trials(deepcopy=False):
        metrics = trial.user_attrs.get("metrics", {})
        rows.append(
            {
                "trial": trial.number,
                "state": trial.state.name,
                "dropout_type": trial.params.get("dropout_type", ""),
                "dropout_rate": trial.params.get("dropout_rate", 0.0),
                "objective": trial.value if trial.value is not None else "",
                **{part: metrics.get(part, "") for part in PARTS},
                "epochs": max(trial.intermediate_values, default=0),
                "duration_s": round(trial.duration.total_seconds(), 3) if trial.duration else "",
                "run_id": trial.user_attrs.get("mlflow_run_id", ""),
                "worker": trial.user_attrs.get("worker", ""),  # host:pid of the process that ran it
                "fail_reason": trial.user_attrs.get("fail_reason", ""),
            }
        )
    return rows


def trials_csv(rows: list[dict[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=TRIAL_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def trials_figure(rows: list[dict[str, Any]], title: str, path: Path) -> None:
    """Objective per trial and against the rate, one colour per dropout type; pruned and failed trials as
    marks on the trial axis; the best trial starred."""
    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt

    done = [r for r in rows if r["state"] == "COMPLETE"]
    kinds = sorted({r["dropout_type"] for r in rows})
    colour = {kind: plt.get_cmap("tab10")(i % 10) for i, kind in enumerate(kinds)}
    fig, (by_trial, by_rate) = plt.subplots(1, 2, figsize=(11, 4.2))
    for kind in kinds:
        mine = [r for r in done if r["dropout_type"] == kind]
        if mine:
            objectives = [r["objective"] for r in mine]
            by_trial.scatter([r["trial"] for r in mine], objectives, color=colour[kind], label=kind, zorder=3)
            by_rate.scatter([r["dropout_rate"] for r in mine], objectives, color=colour[kind], label=kind, zorder=3)
    for state, marker, name in (("PRUNED", "|", "pruned"), ("FAIL", "x", "failed")):
        numbers = [r["trial"] for r in rows if r["state"] == state]
        if numbers:  # at the bottom edge: they have no objective
            by_trial.scatter(
                numbers, [0.02] * len(numbers), marker=marker, color="grey", label=name,
                transform=by_trial.get_xaxis_transform(), zorder=3,
            )  # fmt: skip
    if done:
        best = min(done, key=lambda r: r["objective"])
        for ax, x in ((by_trial, best["trial"]), (by_rate, best["dropout_rate"])):
            ax.scatter([x], [best["objective"]], s=220, marker="*", facecolor="none", edgecolor="black", zorder=4)
        by_trial.annotate(
            f"best: trial {best['trial']}, {best['dropout_type']}"
            + (f" p={best['dropout_rate']:.2f}" if best["dropout_type"] != "none" else ""),
            (best["trial"], best["objective"]), textcoords="offset points", xytext=(8, 8), fontsize=8,
        )  # fmt: skip
    else:
        by_trial.text(0.5, 0.5, "no trial completed", transform=by_trial.transAxes, ha="center")
    by_trial.set(xlabel="trial", ylabel="objective (lower is better)", title="objective per trial")
    by_trial.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    for ax in (by_trial, by_rate):
        ax.margins(0.08)
        ax.grid(alpha=0.3)
    by_rate.set(xlabel="dropout rate", ylabel="objective", title="objective against dropout rate")
    if by_trial.get_legend_handles_labels()[0]:
        by_trial.legend(fontsize=8, title="dropout type", title_fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def log_trials(study: optuna.Study) -> list[dict[str, Any]]:
    """Write `trials.csv` and `trials.png` (every trial of the study so far) to the active (parent) run."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a trial whose worker died: FAIL, not RUNNING forever
    rows = trial_rows(study)
    log_text_artifact(trials_csv(rows), "trials.csv")
    counts = {state: sum(r["state"] == state for r in rows) for state in ("COMPLETE", "PRUNED", "FAIL")}
    title = (
        f"study {study.study_name}: {len(rows)} trials, {counts['COMPLETE']} complete, "
        f"{counts['PRUNED']} pruned, {counts['FAIL']} failed"
    )
    with tempfile.TemporaryDirectory() as tmp:
        trials_figure(rows, title, Path(tmp) / "trials.png")
        mlflow.log_artifact(str(Path(tmp) / "trials.png"))
    return rows
