"""The run configuration: one dataclass per stage, bundled, with YAML in and out.

In:  the stage dataclasses (each the single source of its defaults) and YAML files or dicts.
Out: `RunConfig`, a flat view of its options (for MLflow params and the CLI) and YAML text.

Every option name is unique across stages, so `--window`, `-P window=` and `window:` in a YAML
section all mean the same field.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import InputError
from pipeline.ingest import IngestConfig
from pipeline.models import ModelConfig
from pipeline.stability import ObjectiveConfig
from pipeline.train import TrainConfig
from pipeline.windows import WindowConfig

SECTIONS: dict[str, type] = {
    "ingest": IngestConfig,
    "window": WindowConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "objective": ObjectiveConfig,
}


@dataclass
class RunConfig:
    """Everything that determines one trained config (data, windows, model, training, objective)."""

    ingest: IngestConfig = field(default_factory=IngestConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)

    def flat(self) -> dict[str, Any]:
        """{option name: value} over all sections (names are unique across sections)."""
        return {name: value for section in SECTIONS for name, value in asdict(getattr(self, section)).items()}

    def with_options(self, options: dict[str, Any]) -> RunConfig:
        """A copy with some options replaced, by flat option name."""
        unknown = set(options) - set(self.flat())
        if unknown:
            raise InputError(f"unknown option(s): {', '.join(sorted(unknown))}")
        sections = {}
        for section in SECTIONS:
            current = getattr(self, section)
            changes = {f.name: options[f.name] for f in fields(current) if f.name in options}
            sections[section] = dataclasses.replace(current, **changes)
        return RunConfig(**sections)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {section: asdict(getattr(self, section)) for section in SECTIONS}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> RunConfig:
        """Build from {section: {option: value}}; other top-level keys (e.g. `result`) are ignored."""
        if not isinstance(data, dict):
            raise InputError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)})")
        sections = {}
        for section, kind in SECTIONS.items():
            values = data.get(section) or {}
            if not isinstance(values, dict):
                raise InputError(f"{source}: section {section!r} must be a mapping")
            known = {f.name: f for f in fields(kind)}
            unknown = set(values) - set(known)
            if unknown:
                raise InputError(f"{source}: unknown key(s) in section {section!r}: {', '.join(sorted(unknown))}")
            sections[section] = kind(**{k: coerce(v, known[k].default, k, source) for k, v in values.items()})
        return cls(**sections)


def coerce(value: Any, default: Any, name: str, source: str = "option") -> Any:
    """Convert `value` (a string from the command line or a YAML scalar) to the type of `default`."""
    kind = type(default)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    if kind is bool:
        text = str(value).strip().lower()
        if text in ("true", "1", "yes"):
            return True
        if text in ("false", "0", "no"):
            return False
        raise InputError(f"{source}: {name} must be true or false, got {value!r}")
    try:
        if kind is int:
            as_float = float(value)
            if not as_float.is_integer():
                raise ValueError
            return int(as_float)
        if kind is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise InputError(f"{source}: {name} must be {kind.__name__}, got {value!r}") from None


def load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(f"config file not found: {path}")
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise InputError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None


def dump_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False)
