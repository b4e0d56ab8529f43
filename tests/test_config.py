"""One source of defaults: MLproject, CLI, conda.yaml, README and the config dataclasses agree."""

import dataclasses
import tomllib
from pathlib import Path

import pytest
import yaml

from pipeline.cli import NOT_TUNED, TUNE_OPTIONS, build_parser, option_fields
from pipeline.config import SECTIONS, RunConfig, coerce
from pipeline.errors import InputError

ROOT = Path(__file__).resolve().parent.parent
MLPROJECT = yaml.safe_load((ROOT / "MLproject").read_text())


def subparser(name: str):
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[name]


def cli_options(name: str) -> dict[str, str]:
    """{dest: '--flag'} of one subcommand."""
    return {a.dest: a.option_strings[0] for a in subparser(name)._actions if a.option_strings and a.dest != "help"}


def test_main_entry_defaults_equal_the_dataclass_defaults():
    defaults = {f.name: f.default for f in option_fields(TUNE_OPTIONS)}
    params = MLPROJECT["entry_points"]["main"]["parameters"]
    assert set(params) <= set(defaults)
    for name, spec in params.items():
        assert coerce(spec["default"], defaults[name], name) == defaults[name], name


def test_sweep_entry_defaults_equal_the_dataclass_defaults_and_reach_the_cli():
    from pipeline.cli import sweep_fields

    defaults = {f.name: f.default for f in sweep_fields()}
    entry = MLPROJECT["entry_points"]["sweep"]
    options = cli_options("sweep")
    for name, spec in entry["parameters"].items():
        assert coerce(spec["default"], defaults[name], name) == defaults[name], name
        assert f"{options[name]} {{{name}}}" in entry["command"], name
    assert defaults["seeds"] == 5  # the sweep's own seeds (paired tests need several), not the study's 3


def test_every_main_parameter_reaches_the_tune_cli_under_its_own_name():
    entry = MLPROJECT["entry_points"]["main"]
    options = cli_options("tune")
    for name in entry["parameters"]:
        assert f"{options[name]} {{{name}}}" in entry["command"], name


def test_train_entry_takes_a_config_and_any_train_option_in_mlflow_spelling():
    entry = MLPROJECT["entry_points"]["train"]
    assert entry["parameters"] == {"config": {"type": "string", "default": ""}}
    assert entry["command"] == "python -m pipeline train --config {config}"
    # `mlflow run -P name=value` appends undeclared parameters as `--name value`.
    train = subparser("train")
    for f in option_fields(SECTIONS.values()):
        args = train.parse_args(["--config", "", f"--{f.name}", "7"])
        assert getattr(args, f.name) == "7", f.name


def test_cli_help_shows_the_dataclass_defaults():
    helps = {a.dest: a.help for a in subparser("tune")._actions}
    for f in option_fields(TUNE_OPTIONS, skip=NOT_TUNED):
        assert helps[f.name].endswith(f"(default: {f.default!r})"), f.name
    assert "(default: 30)" in subparser("tune").format_help()


def test_option_names_are_unique_across_stages():
    names = [f.name for f in option_fields(TUNE_OPTIONS)]
    assert len(names) == len(set(names))


def test_conda_env_lists_the_same_requirements_as_pyproject():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_section = next(d for d in conda["dependencies"] if isinstance(d, dict))["pip"]
    assert pip_section == pyproject["project"]["dependencies"]
    assert "torch==2.13.0" in pip_section


def test_ci_runs_the_readme_test_command():
    ci_lines = [line for line in (ROOT / ".ci/run").read_text().splitlines() if "pytest" in line]
    assert len(ci_lines) == 1
    assert ci_lines[0].strip() in (ROOT / "README.md").read_text()
    assert "torch==2.13.0" in ci_lines[0]


def test_config_round_trips_through_yaml():
    cfg = RunConfig().with_options({"model": "lstm", "dropout_type": "zoneout", "dropout_rate": 0.25, "window": 20})
    text = yaml.safe_dump(cfg.to_dict())
    again = RunConfig.from_dict({**yaml.safe_load(text), "result": {"objective": 1.0}})
    assert again == cfg
    assert again.flat()["dropout_rate"] == 0.25


def test_config_refuses_unknown_keys_and_bad_types():
    with pytest.raises(InputError, match=r"unknown key\(s\) in section 'model': dropuot_rate"):
        RunConfig.from_dict({"model": {"dropuot_rate": 0.1}}, source="cfg.yaml")
    with pytest.raises(InputError, match=r"cfg.yaml: window must be int, got 'abc'"):
        RunConfig.from_dict({"window": {"window": "abc"}}, source="cfg.yaml")
    with pytest.raises(InputError, match=r"unknown option\(s\): nope"):
        RunConfig().with_options({"nope": 1})


@pytest.mark.parametrize(("raw", "default", "expected"), [("30", 1, 30), ("30.0", 1, 30), (2, 0.5, 2.0), (1, "", "1")])
def test_coerce_converts_command_line_strings(raw, default, expected):
    value = coerce(raw, default, "x")
    assert value == expected and type(value) is type(default)


def test_coerce_refuses_a_fractional_int():
    with pytest.raises(InputError, match=r"x must be int, got '2\.5'"):
        coerce("2.5", 1, "x")


def test_sections_cover_every_stage_dataclass():
    assert [f.name for f in dataclasses.fields(RunConfig)] == list(SECTIONS)
