"""Reading a RunConfig: from TOML or a run's config.json, `section.key=value` overrides, or Flower's flat run
config (dotted keys, lists as comma-separated text). Unknown keys and values of the wrong type are one-line
errors naming the key."""

from __future__ import annotations

import dataclasses
import json
import tomllib
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from fedpt.config.schema import SECTIONS, RunConfig
from fedpt.errors import FedptError


def from_dict(tree: dict[str, Any], where: str = "config") -> RunConfig:
    """Build and check a RunConfig from a nested dict; unknown keys and wrong types are one-line errors."""
    top = {f.name for f in fields(RunConfig)}
    unknown = set(tree) - top
    if "kd_every" in unknown:
        raise FedptError(f"{where}: the distillation loop's kd_every is written `[distill] every = K` here")
    if unknown:
        raise FedptError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(top)}")
    values: dict[str, Any] = {}
    for key, value in tree.items():
        if key in SECTIONS:
            if not isinstance(value, dict):
                raise FedptError(f"{where}: [{key}] must be a table")
            values[key] = section(key, value, where)
        else:
            values[key] = value
    if not isinstance(values.get("seed", 0), int):
        raise FedptError(f"{where}: seed must be an integer")
    return RunConfig(**values)


def section(name: str, values: dict[str, Any], where: str = "config") -> Any:
    """One section (e.g. "tuning") from its values, with types checked against the defaults."""
    cls = SECTIONS[name]
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise FedptError(f"{where}: unknown key(s) {sorted(unknown)} in [{name}]; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    clean = {}
    for key, value in values.items():
        hint = hints[key]
        if typing.get_origin(hint) is list:  # list[T]; Flower's flat run config writes it as "a,b,c"
            (item,) = typing.get_args(hint)
            if isinstance(value, str):
                value = [_from_text(v.strip(), item) for v in value.split(",") if v.strip()]
            if not isinstance(value, list | tuple):
                raise FedptError(f"{where}: {name}.{key} must be a list of {item.__name__}, got "
                                 f"{type(value).__name__} {value!r}")
            clean[key] = [_typed(v, item, f"{where}: {name}.{key}[{i}]") for i, v in enumerate(value)]
        else:
            clean[key] = _typed(value, hint, f"{where}: {name}.{key}")
    return cls(**clean)


def _from_text(text: str, expected: type) -> Any:
    """A list item of Flower's comma-separated text, as the type its list holds (left as text if it is not)."""
    try:
        return expected(text) if expected in (int, float) else text
    except ValueError:
        return text


def _typed(value: Any, expected: type, label: str) -> Any:
    """`value` if it is of the annotated type (an int where a float is expected becomes one); else one line."""
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected in (int, float) and isinstance(value, bool)):
        raise FedptError(f"{label} must be {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def _put(tree: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    """Set tree["a"]["b"] = value for the key "a.b", making sections on the way."""
    *parents, leaf = dotted.strip().split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise FedptError(f"{where}: '{part}' is not a section")
    node[leaf] = value


def load(path: str | Path | None = None, overrides: list[str] | None = None, **fixed: Any) -> RunConfig:
    """Read a config file (TOML, or the config.json a run saves) or the defaults, apply `section.key=value`
    overrides (values in TOML syntax), then the `fixed` top-level values."""
    tree: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        path = Path(path).expanduser()
        if not path.is_file():
            raise FedptError(f"config file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
            tree = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
        except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FedptError(f"config file {path} is not valid {path.suffix.lstrip('.').upper()}: {e}") from None
        where = str(path)
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise FedptError(f"override '{item}' is not of the form key=value (e.g. federation.rounds=5)")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw  # bare text, e.g. federation.strategy=fedadam
        _put(tree, key, value, f"override '{item}'")
    tree.update(fixed)
    return from_dict(tree, where)


def from_flat(flat: dict[str, Any]) -> RunConfig:
    """From Flower's run config (dotted keys)."""
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        _put(tree, key, value, "run config")
    return from_dict(tree, "run config")


def replace(config: RunConfig, **changes: Any) -> RunConfig:
    """A copy with some fields of some sections changed, e.g. replace(c, federation={"rounds": 5}, seed=1)."""
    changes = {name: dataclasses.replace(getattr(config, name), **value) if name in SECTIONS else value
               for name, value in changes.items()}
    return dataclasses.replace(config, **changes)
