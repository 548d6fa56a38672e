"""Building an :class:`ExperimentConfig` from plain data: YAML files (with ``base:`` includes), ``--set`` overrides
and type checks that name the key. validation of ranges and
cross-stage rules is ``dicp_ray.config.checks``."""
from __future__ import annotations

import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from dicp_ray.config.checks import validate
from dicp_ray.config.schema import (
    _SECTION_CLASSES,
    META_WORLD_DEFAULT_EVAL_STEPS,
    META_WORLD_EVAL_STEPS,
    ConfigError,
    ExperimentConfig,
    _unknown_key_error,
)

# ----------------------------------------------------------------------------------------------------------
# Building from plain data (YAML + overrides), with type checks that name the key.
# ----------------------------------------------------------------------------------------------------------

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp` (from YAML); convert lists to tuples and ints to floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return _coerce(key, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{key} = {value!r} has the wrong type: expected {_type_name(tp)}")
    if origin is tuple:
        item_tp = typing.get_args(tp)[0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected a list of {_type_name(item_tp)}, "
                              f"e.g. [{'1, 2' if item_tp is int else 'a, b'}]")
        return tuple(_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected a mapping")
        return {str(k): tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string; accept what float() accepts
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r} has the wrong type: expected a string")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module, not user input




def _build_section(name: str, cls: type, data: Any) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"section '{name}' must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in hints:
            raise _unknown_key_error(f"{name}.{key}", valid)
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build and validate an ExperimentConfig from nested plain data (as read from YAML)."""
    if not isinstance(data, dict):
        raise ConfigError(f"the config must be a mapping of sections, got {type(data).__name__}")
    valid = ["name", *_SECTION_CLASSES]
    for key in data:
        if key not in valid:
            raise _unknown_key_error(str(key), valid)
    name = data.get("name", "experiment")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"name = {name!r} must be a non-empty string")
    sections = {s: _build_section(s, cls, data.get(s)) for s, cls in _SECTION_CLASSES.items()}
    config = ExperimentConfig(name=name, **sections)
    validate(config)
    _check_sweep_trials(config)
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value``; the value is parsed as YAML (``3``, ``1e-3``, ``[1, 2]``, ``true``)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value, e.g. --set plan.depth=4")
    dotted, raw = text.split("=", 1)
    path = [p for p in dotted.strip().split(".") if p]
    if len(path) not in (1, 2):
        raise ConfigError(f"override key '{dotted}' must be 'section.key' (or 'name'), e.g. plan.beam_width")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override '{text}': cannot parse the value: {err}") from None
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each ``section.key=value`` override applied."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 1:
            out[path[0]] = value
            continue
        section = out.setdefault(path[0], {})
        if not isinstance(section, dict):
            raise ConfigError(f"cannot set '{'.'.join(path)}': section '{path[0]}' is not a mapping")
        section[path[1]] = value
    return out


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config; a top-level ``base: other.yaml`` (relative to this file) is loaded first and
    this file's sections are merged over it key by key, so sweep configs can extend a pipeline config."""
    import yaml

    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist: pass --config with a YAML from tune_configs/")
    if path.resolve() in seen:
        raise ConfigError(f"config file '{path}' includes itself through 'base:'")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml(path.parent / str(base), (*seen, path.resolve()))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML experiment config, apply overrides, validate; raises ConfigError on any problem."""
    return config_from_dict(apply_overrides(_read_yaml(Path(path)), list(overrides)))


def replace(config: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """A validated copy of `config` with dotted-key overrides, e.g. {"plan.depth": 4} (used by sweeps)."""
    data = config.to_dict()
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in data or not isinstance(data[section], dict):
            raise _unknown_key_error(dotted, list(_SECTION_CLASSES))
        data[section][key] = list(value) if isinstance(value, tuple) else value
    return config_from_dict(data)


# ----------------------------------------------------------------------------- sweeps
def sweep_points(grid: dict[str, Any]) -> list[dict[str, Any]]:
    """Every combination of a sweep grid's values, e.g. {"env.task": ["reach-v3", "push-v3"]} -> 2 points."""
    import itertools

    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(list(grid[k]) for k in keys))]


def point_slug(point: dict[str, Any]) -> str:
    """A run-directory name for a sweep grid point, e.g. {"env.task": "reach-v3"} -> "task=reach-v3"."""
    import re

    text = ",".join(f"{key.rpartition('.')[2]}={value}" for key, value in point.items())
    return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)[:200] or "default"


def trial_config(config: ExperimentConfig, point: dict[str, Any]) -> ExperimentConfig:
    """The config one pipeline-sweep trial runs: the grid point applied (with sweep.paper_eval_budget, also the
    paper's in-context step budget of the trial's ML1 task), the sweep itself removed."""
    # The trial's child pipeline joins the sweep's cluster through RAY_ADDRESS (dicp_ray.tune), not a client address.
    overrides = {**point, "sweep.kind": "plan", "sweep.grid": {}, "sweep.paper_eval_budget": False,
                 "resources.address": None}
    if config.sweep.paper_eval_budget:
        task = point.get("env.task", config.env.task)
        steps = META_WORLD_EVAL_STEPS.get(task, META_WORLD_DEFAULT_EVAL_STEPS)
        overrides["eval.num_episodes"] = steps // config.env.horizon
    return replace(config, overrides)


def _check_sweep_trials(config: ExperimentConfig) -> None:
    """A pipeline sweep: every trial's config must be valid, and trials need distinct run directories, before
    anything starts (config_from_dict runs this after validate)."""
    if config.sweep.kind != "pipeline":
        return
    slugs: dict[str, dict] = {}
    for point in sweep_points(config.sweep.grid):
        try:
            trial_config(config, point)
        except ConfigError as err:
            raise ConfigError(f"sweep trial {point}: {err}") from None
        slug = point_slug(point)
        if slug in slugs:
            raise ConfigError(f"sweep trials {slugs[slug]} and {point} would share the run directory "
                              f"runs/{slug}: make the grid values distinct")
        slugs[slug] = point
