"""``key=value`` overrides onto nested config dataclasses, checked against their type hints.

``apply_overrides(cfg, ["actor.optimizer.lr=1e-6", "rollout.n_samples=8"])`` walks the dotted
path through dataclass fields and parses the value as the field's declared type. An unknown key
or a value of the wrong type raises :class:`ConfigError` naming the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A bad configuration key or value; the message names the key."""


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _parse(key: str, text: str, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if type(None) in options and text.lower() in ("none", "null"):
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _parse(key, text, option)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {text!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if text not in allowed:
            raise ConfigError(f"{key}: expected one of {list(allowed)}, got {text!r}")
        return text
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ConfigError(f"{key}: expected bool (true/false), got {text!r}")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: expected int, got {text!r}") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: expected float, got {text!r}") from None
    if tp is str:
        return text
    if origin in (list, tuple, dict) or tp in (list, tuple, dict):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            # A bare comma list is the natural way to write a list on a command line.
            value = [v for v in text.split(",") if v] if (origin or tp) in (list, tuple) else None
        expected = origin or tp
        if not isinstance(value, dict if expected is dict else list):
            raise ConfigError(f"{key}: expected {_type_name(tp)} (JSON or comma list), got {text!r}")
        args = typing.get_args(tp)
        if expected in (list, tuple) and args and args[0] is not Ellipsis:
            value = [_parse(f"{key}[{i}]", v if isinstance(v, str) else json.dumps(v), args[0])
                     for i, v in enumerate(value)]
        return tuple(value) if expected is tuple else value
    raise ConfigError(f"{key}: fields of type {_type_name(tp)} cannot be set from the command line")


def _field_types(obj) -> dict[str, Any]:
    hints = typing.get_type_hints(type(obj))
    return {f.name: hints[f.name] for f in dataclasses.fields(obj)}


def set_by_path(cfg: Any, key: str, text: str) -> None:
    """Sets the dotted ``key`` of a nested dataclass from its string form."""
    parts = key.split(".")
    obj = cfg
    for depth, name in enumerate(parts):
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"{'.'.join(parts[:depth])} is not a config section (cannot set {key})")
        types_ = _field_types(obj)
        if name not in types_:
            prefix = ".".join(parts[:depth])
            valid = ", ".join(sorted(types_))
            raise ConfigError(f"unknown config key {key!r}: {prefix or 'the config'} has no field "
                              f"{name!r} (valid: {valid})")
        if depth == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, name)):
                raise ConfigError(f"{key} is a config section; set its fields ({key}.FIELD=VALUE)")
            value = _parse(key, text, types_[name])
            object.__setattr__(obj, name, value)  # frozen dataclasses too: overrides precede use
        else:
            child = getattr(obj, name)
            if child is None:
                tp = types_[name]
                options = [t for t in typing.get_args(tp) if dataclasses.is_dataclass(t)]
                if not options:
                    raise ConfigError(f"{'.'.join(parts[:depth + 1])} is not a config section")
                child = options[0]()
                object.__setattr__(obj, name, child)
            obj = child


def apply_overrides(cfg: Any, overrides: list[str]) -> Any:
    """Applies ``key=value`` strings in order; re-runs each touched section's validation."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        set_by_path(cfg, key.strip(), text.strip())
    revalidate(cfg)
    return cfg


def revalidate(cfg: Any) -> None:
    """Runs ``__post_init__`` of every nested dataclass again (overrides bypass it)."""
    for f in dataclasses.fields(cfg):
        child = getattr(cfg, f.name)
        if dataclasses.is_dataclass(child) and not isinstance(child, type):
            revalidate(child)
    post = getattr(cfg, "__post_init__", None)
    if post is not None:
        try:
            post()
        except (ValueError, TypeError) as e:
            raise ConfigError(str(e)) from e


def to_dict(cfg: Any) -> dict:
    """JSON-friendly dict of a config tree (for metrics files and checkpoints)."""
    def convert(value):
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        return str(value)

    return convert(cfg)
