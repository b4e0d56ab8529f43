"""The report: its statistics on hand-computed inputs, and real pages built from a real sweep and study."""

import math
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from scipy import stats

from pipeline.cli import main
from pipeline.config import RunConfig
from pipeline.errors import InputError
from pipeline.models import ModelConfig
from pipeline.report import build_report
from pipeline.sweep import SweepConfig, grid, run_sweep
from pipeline.tracking import tracked_run
from pipeline.train import SeedRun, TrainConfig
from pipeline.verdicts import (
    MEASURES,
    benjamini_hochberg,
    by_config,
    direction_claim,
    paired_effect,
    paired_tests,
    rate_claim,
    rnn_vs_cnn_claim,
    spread_claim,
    spread_tests,
)


def test_paired_effect_by_hand():
    treated, control = [3.0, 5.0, 4.0], [1.0, 2.0, 3.0]  # differences 2, 3, 1: mean 2, sd 1
    effect = paired_effect(treated, control)
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)
    assert effect.mean_diff == pytest.approx(2.0)
    assert (effect.ci_low, effect.ci_high) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert effect.rel_diff == pytest.approx(2.0 / 2.0)
    t = 2.0 / (1.0 / math.sqrt(3))  # t statistic with 2 degrees of freedom
    assert effect.p_value == pytest.approx(2 * stats.t.sf(t, 2))


def test_paired_effect_of_identical_runs_is_no_difference():
    effect = paired_effect([0.5, 0.7], [0.5, 0.7])
    assert effect.mean_diff == 0.0 and effect.p_value == 1.0


def test_benjamini_hochberg_by_hand():
    # Sorted p: 0.01, 0.03, 0.04, 0.2 -> p*m/rank: 0.04, 0.06, 0.0533, 0.2 -> running min from the top:
    # 0.04, 0.0533, 0.0533, 0.2; returned in the input order.
    q = benjamini_hochberg([0.04, 0.01, 0.2, 0.03])
    assert q == pytest.approx([0.16 / 3, 0.04, 0.2, 0.16 / 3])
    assert benjamini_hochberg([]) == []


def test_seeds_pair_initial_weights_and_batch_order_across_types(gspc_windows):
    cfg = TrainConfig(max_epochs=1, seeds=1)
    runs = {
        kind: SeedRun(ModelConfig(model="rnn", dropout_type=kind, dropout_rate=0.5), cfg, gspc_windows, seed=4)
        for kind in ("none", "standard", "weight_drop", "recurrent", "zoneout", "head")
    }
    reference = [p.detach() for p in runs["none"].model.parameters()]
    for kind, run in runs.items():
        assert all(torch.equal(a, b) for a, b in zip(reference, run.model.parameters(), strict=True)), kind
        assert torch.equal(run.batch_order.get_state(), runs["none"].batch_order.get_state()), kind


def test_grid_measures_the_one_layer_builtin_as_written_instead_of_refusing():
    points = grid(SweepConfig(types="standard,builtin", rates="0.2,0.4"), ModelConfig(model="rnn"))
    assert [(cfg.dropout_type, cfg.dropout_rate, label) for cfg, label in points] == [
        ("none", 0.0, "none"),
        ("standard", 0.2, "standard"),
        ("standard", 0.4, "standard"),
        ("builtin", 0.2, "builtin_1layer"),
        ("builtin", 0.4, "builtin_1layer"),
    ]
    assert all(cfg.as_written for cfg, label in points if label == "builtin_1layer")
    with pytest.raises(InputError, match="does not apply to the cnn family"):
        grid(SweepConfig(types="zoneout"), ModelConfig(model="cnn"))
    with pytest.raises(InputError, match="rates must be a comma-separated list of float, got 'a,b'"):
        grid(SweepConfig(rates="a,b"), ModelConfig(model="rnn"))


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.text = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.text.append(data)


def check_page(folder: Path) -> str:
    """The page parses, every image it shows exists as a PNG beside it; returns its text."""
    parser = Page()
    parser.feed((folder / "index.html").read_text())
    assert parser.images
    for src in parser.images:
        assert (folder / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    return " ".join(parser.text)


@pytest.fixture(scope="module")
def sweep_report(tracking_uri, gspc_windows, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    cfg = RunConfig().with_options({"model": "rnn", "hidden_size": 8, "max_epochs": 2})
    sweep = SweepConfig(types="standard,builtin", rates="0.3,0.6", seeds=2, workers=1)
    with tracked_run("sweep-test") as parent:
        results = run_sweep(sweep, cfg, gspc_windows)
    files = build_report(parent.info.run_id, out)
    return parent.info.run_id, results, out, files


def test_sweep_logs_one_nested_run_per_config(sweep_report, tracking_uri):
    parent_id, results, _, _ = sweep_report
    client = MlflowClient(tracking_uri)
    children = client.search_runs(
        [client.get_run(parent_id).info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent_id}'"
    )
    assert len(children) == len(results) == 5
    assert sorted(c.data.params["reported_type"] for c in children) == [
        "builtin_1layer",
        "builtin_1layer",
        "none",
        "standard",
        "standard",
    ]
    for child in children:
        assert [m.step for m in client.get_metric_history(child.info.run_id, "val_loss")] == [1, 2]
        assert "batch_loss_noise_rel" in child.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent_id)}
    assert {"sweep.csv", "curves.json", "report"} <= artifacts


def test_sweep_report_answers_the_claims_from_measurements(sweep_report):
    parent_id, results, out, files = sweep_report
    text = check_page(out)
    assert "nn.RNN(dropout=p) with one layer applies no dropout measured: true" in re.sub(r"\s+", " ", text)
    none = next(r for r in results if r.label == "none")
    literal = [r for r in results if r.label == "builtin_1layer"]
    assert all(r.curves == none.curves for r in literal)  # what the claim rests on, bitwise
    assert "Dropout increases the noise of the training loss" in text
    assert "Seeds per config: 2" in text
    assert {f.name for f in files} >= {"index.html", "rates_rnn.png", "curves.png"}
    logged = {a.path for a in MlflowClient().list_artifacts(parent_id, "report")}
    assert {f"report/{f.name}" for f in files} == logged


def test_report_of_an_unknown_run_is_one_line_exit_2(tracking_uri, capsys, tmp_path):
    assert main(["report", "--run-id", "0123456789abcdef", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no MLflow run '0123456789abcdef'")


def test_report_refuses_a_run_that_is_neither_sweep_nor_study(tracking_uri, tmp_path):
    with mlflow.start_run() as plain:
        pass
    with pytest.raises(InputError, match="is neither a sweep nor a study parent run"):
        build_report(plain.info.run_id, tmp_path)


def synthetic_rows(effects: dict[tuple[str, str, float], float], seeds: int = 6) -> list[dict]:
    """Per-seed rows whose measures are a seed-specific base times (1 + effect), with tiny seed noise."""
    rows = []
    for (family, kind, rate), effect in effects.items():
        for seed in range(seeds):
            base = 1.0 + 0.1 * seed
            wobble = 0.001 * ((seed * 7 + int(rate * 10)) % 3)
            value = base * (1 + effect) + wobble
            rows.append(
                {
                    "family": family,
                    "type": kind,
                    "rate": rate,
                    "seed": float(seed),
                    **dict.fromkeys(MEASURES, value),
                    "best_val_vs_naive": 0.9,
                }
            )
    return rows


def test_claims_follow_clear_synthetic_effects():
    rows = synthetic_rows(
        {
            ("rnn", "none", 0.0): 0.0,
            ("rnn", "standard", 0.2): 0.10,
            ("rnn", "standard", 0.5): 0.30,
            ("cnn", "none", 0.0): 0.0,
            ("cnn", "standard", 0.2): 0.01,
            ("cnn", "standard", 0.5): 0.02,
        }
    )
    grouped = by_config(rows)
    tests = paired_tests(grouped)
    noise = direction_claim("noise up", tests, "batch_loss_noise_rel")
    assert noise.answer == "supported"
    assert noise.evidence.startswith("4 of 4 type×rate configs significantly worse than none, 0 significantly better")
    assert rnn_vs_cnn_claim(grouped).answer == "supported"
    assert rate_claim(grouped).answer == "supported"


def test_claims_report_the_opposite_as_contradicted():
    rows = synthetic_rows({("rnn", "none", 0.0): 0.0, ("rnn", "spatial", 0.3): -0.2})
    tests = paired_tests(by_config(rows))
    assert direction_claim("noise up", tests, "batch_loss_noise_rel").answer == "contradicted"
    assert all(t.verdict == "better" for t in tests)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_report_renders_in_a_headless_browser_with_every_image_loaded(sweep_report, tmp_path):
    _, _, out, _ = sweep_report
    probe = out / "probe.html"  # the page plus a script that reports, once loaded, whether every image decoded
    script = (
        "<script>window.onload=()=>{const i=[...document.images];document.body.setAttribute('data-images',"
        "i.filter(x=>x.complete&&x.naturalWidth>0).length+'/'+i.length)}</script></body>"
    )
    probe.write_text((out / "index.html").read_text().replace("</body>", script))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
    ]
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    images = len(list(out.glob("*.png")))
    assert f'data-images="{images}/{images}"' in dom
    assert "<h1>Does dropout destabilise training? Sweep report</h1>" in dom


def test_spread_claim_counts_significantly_wider_configs():
    # none: seeds' best val losses tightly together; standard: widely spread; spatial: as tight as none.
    rows = []
    for seed in range(8):
        for kind, rate, value in (
            ("none", 0.0, 1.0 + 0.001 * seed),
            ("standard", 0.5, 1.0 + 0.1 * seed),
            ("spatial", 0.5, 1.0 + 0.001 * (7 - seed)),
        ):
            rows.append(
                {"family": "rnn", "type": kind, "rate": rate, "seed": float(seed), **dict.fromkeys(MEASURES, value)}
            )
    claim = spread_claim(spread_tests(by_config(rows)))
    assert claim.answer == "supported"
    assert claim.evidence.startswith("1 of 2 type×rate configs significantly wider than none, 0 narrower")


def test_slice_plot_colour_bar_overlaps_no_panel_or_tick_label():
    import warnings

    import optuna

    from pipeline.report import _pyplot, lay_out

    study = optuna.create_study()
    study.optimize(
        lambda t: t.suggest_float("dropout_rate", 0, 0.6) + len(t.suggest_categorical("type", ["none", "weight_drop"])),
        n_trials=4,
    )
    plt = _pyplot()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        figure = optuna.visualization.matplotlib.plot_slice(study)[0].figure
    lay_out(figure)
    renderer = figure.canvas.get_renderer()
    bar = next(a for a in figure.axes if a.get_label() == "<colorbar>").get_window_extent(renderer)
    panels = [a.get_tightbbox(renderer) for a in figure.axes if a.get_label() != "<colorbar>"]
    plt.close(figure)
    assert len(panels) == 2
    assert all(panel.x1 < bar.x0 for panel in panels)  # tick labels included
    assert panels[0].x1 < panels[1].x0
    width, height = figure.get_size_inches() * figure.dpi
    assert all(p.x0 >= 0 and p.y0 >= 0 and p.x1 <= width and p.y1 <= height for p in panels)


def test_spread_is_not_tested_with_fewer_than_four_seeds():
    """Two seeds a config: Levene's p would be ~1e-26 for any difference; the claim says not tested instead."""
    rows = [
        {"family": "rnn", "type": kind, "rate": rate, "seed": float(seed), **dict.fromkeys(MEASURES, value)}
        for seed, (a, b) in enumerate([(0.38, 0.38), (0.381, 0.3805)])
        for kind, rate, value in (("none", 0.0, a), ("standard", 0.5, b))
    ]
    assert spread_tests(by_config(rows)) == []
    claim = spread_claim(spread_tests(by_config(rows)))
    assert claim.answer == "not tested"
    assert claim.evidence.startswith("no dropout config with at least 4 seeds was compared with none")
    four = [{**row, "seed": row["seed"] + 2} for row in rows] + rows
    assert len(spread_tests(by_config(four))) == 1


def _run(metrics: dict, tags: dict, status: str = "FINISHED", params: dict | None = None):
    from types import SimpleNamespace

    data = SimpleNamespace(metrics=metrics, tags=tags, params=params or {})
    return SimpleNamespace(data=data, info=SimpleNamespace(status=status))


def test_final_section_reports_the_retrained_best_trial_and_the_registry_decision():
    from pipeline.report import final_section

    parent = _run(
        {"test_loss": 0.52, "naive_test_loss": 0.5, "test_skill": -0.04, "best_trial_number": 3.0, "objective": 0.61,
         "val_loss_mean": 0.6},
        {"registered_model": "models:/dropout-rnn/2", "champion_decision": "champion stays version 1"},
    )  # fmt: skip
    trials = [_run({}, {}, params={"trial_number": "3", "dropout_type": "zoneout", "dropout_rate": "0.25"})]
    page = final_section(parent, trials)
    assert "<p>Best trial 3 (zoneout, rate 0.250) retrained with all seeds: objective 0.6100 (val mean 0.6000)." in page
    assert "MSE 0.5200 against 0.5000 for the naive zero-return forecast (skill -4.00%): it does <b>not</b>" in page
    assert "<p>Forecaster: models:/dropout-rnn/2; champion stays version 1.</p>" in page
    assert "scores better" not in page
    # A trial that a late joiner finished after the retrain, with a better objective, is pointed out.
    later = [_run({}, {}, params={"trial_number": "7"}), *trials]
    assert "<p>Trial 7 scores better than trial 3 but finished after the retrain" in final_section(parent, later)


def test_final_section_says_why_there_is_no_final_model():
    from pipeline.report import final_section

    page = final_section(_run({"best_trial_objective": 0.6}, {}, status="FAILED"), [])
    assert page == (
        "<h2>Final model</h2><p>None: the study's run ended FAILED before the best trial was retrained and tested. "
        "Run the study again with the same <code>--study-name</code> to resume it.</p>"
    )
