"""Typed configuration: dataclasses loaded from YAML with dotted ``section.key=value`` overrides.

Every config section is a dataclass deriving from :class:`Config`. Loading validates as it goes:
an unknown key, a value of the wrong type, a non-finite number (nan, inf) or a choice outside its
enum fails with one line naming the key and what would be accepted. Choices are ``StrEnum`` fields,
so the valid values come from the type itself.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from common.errors import ConfigError

C = TypeVar("C", bound="Config")


@dataclasses.dataclass
class Config:
    """Base of every config section. Subclasses are plain dataclasses with typed fields."""

    @classmethod
    def preprocess(cls, raw: dict[str, Any], where: str) -> dict[str, Any]:
        """Hook run on the raw mapping before validation (e.g. to expand a preset)."""
        return raw

    def validate(self, where: str) -> None:
        """Hook for cross-field checks; raise ConfigError with the key's dotted name."""

    @classmethod
    def from_dict(cls: type[C], raw: dict[str, Any] | None, where: str = "") -> C:
        """Build and validate from a plain mapping (as read from YAML)."""
        raw = dict(raw or {})
        if not isinstance(raw, dict):
            raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(raw).__name__}")
        raw = cls.preprocess(raw, where)
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(raw) - set(fields))
        if unknown:
            key = _join(where, unknown[0])
            raise ConfigError(f"unknown config key '{key}'; valid keys here: {', '.join(sorted(fields))}")
        values = {name: coerce(hints[name], value, _join(where, name)) for name, value in raw.items()}
        try:
            obj = cls(**values)
        except TypeError as exc:  # a required field without a default was not given
            raise ConfigError(f"{where or 'config'}: {exc}") from None
        obj.validate(where)
        return obj

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML-safe mapping (enums as strings, paths as strings)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (str → enum, int → float...)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = {}
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce(arg, value, key)
            except ConfigError as exc:
                errors[arg] = str(exc)
        shaped = [arg for arg in errors if _container(arg) is not None and isinstance(value, _container(arg))]
        if len(errors) == 1 or len(shaped) == 1:  # the alternative of the value's own shape says what is wrong inside
            raise ConfigError(errors[shaped[0]] if shaped else next(iter(errors.values())))
        raise ConfigError(f"{key}: {value!r} matches none of {_name(tp)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        item = args[0] if args else Any
        return [coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        vt = args[1] if len(args) == 2 else Any
        return {k: coerce(vt, v, f"{key}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} keys, got {value!r}")
        return tp.from_dict(value, key)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        try:
            return tp(value)
        except ValueError:
            valid = ", ".join(str(m.value) for m in tp)
            raise ConfigError(f"{key}: {value!r} is not one of {valid}") from None
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = _number(value)
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # nan/inf reach the optimizer and poison the weights silently
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")  # a bug, not user input


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ``["train.lr=3e-4", "model.preset=tiny-llama"]`` into a nested mapping."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"bad override {item!r}; write section.key=value")
        try:
            value = yaml.safe_load(text) if text else ""
        except yaml.YAMLError:
            value = text
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with an earlier one for {part}")
        node[leaf] = value
    return nested


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge; ``update`` wins. Neither argument is modified."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif isinstance(value, dict) and out.get(key) is not None:  # `model: 5` + model.* overrides
            raise ConfigError(f"{key}: must be a mapping of keys (a section), got {out[key]!r}; "
                              f"{', '.join(f'{key}.{k}' for k in value)} set keys inside it")
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, failing with one line for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def read_json_object(path: str | Path, what: str = "") -> dict[str, Any]:
    """Read a JSON object, failing with one line (prefixed by ``what``, e.g. the config key) when the
    file is missing, malformed or not an object."""
    import json

    path = Path(path)
    prefix = f"{what}: " if what else ""
    if not path.is_file():
        raise ConfigError(f"{prefix}file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{prefix}{path} is not valid JSON (line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}{path} must hold a JSON object")
    return data


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | None = None) -> C:
    """Defaults ← YAML file ← dotted overrides, validated into ``cls``."""
    raw = read_yaml(path) if path else {}
    return cls.from_dict(merge(raw, parse_overrides(overrides or [])))


def dump_yaml(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def _plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _container(tp: Any) -> tuple[type, ...] | None:
    """The Python types a value of annotation ``tp`` comes as when it is a list or a mapping, else None."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return (list, tuple)
    if origin is dict or (isinstance(tp, type) and issubclass(tp, Config)):
        return (dict,)
    return None


def _number(value: Any) -> float | None:
    """``value`` as a float, or None when it is not a number (YAML 1.1 reads "3e-4" as a string)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))
