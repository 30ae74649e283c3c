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
    """JSON-friendly dict of a config tree (for metrics files and checkpoints); leaves too."""
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


# ----------------------------------------------------------------------------- describing keys


@dataclasses.dataclass
class KeyInfo:
    """One settable key of a config tree, as ``maspo-megatron config`` shows it."""

    key: str
    """Dotted path, as written on the command line (``actor.optimizer.lr``)."""
    type: str
    """The declared type, as the override parser reads it."""
    value: Any
    """The value in the config described (a recipe, after overrides)."""
    default: Any
    """The dataclass field's own default (``dataclasses.MISSING`` when it has none)."""
    doc: str
    """The field's documentation from the source, on one line ('' when it has none)."""


def _source_docs(cls: type) -> dict[str, str]:
    """Field docs written in ``cls``'s own body (not its bases'), from its source.

    Four styles occur in this code base, taken in this order of preference: an attribute
    docstring (a string literal right under the field), a comment at the end of the field's line,
    comment lines right above the field (``#`` or ``#:``), and a ``name: text`` entry in the
    class docstring (continued on more-indented lines).
    """
    import ast
    import inspect
    import io
    import re
    import textwrap
    import tokenize

    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # defined interactively, or no source shipped
        return {}
    node = next((n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)), None)
    if node is None:
        return {}
    comments: dict[int, str] = {}
    code_rows: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").lstrip(":").strip()
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_rows.update(range(tok.start[0], tok.end[0] + 1))

    docs: dict[str, str] = {}
    body = node.body
    for i, stmt in enumerate(body):
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        name = stmt.target.id
        after = body[i + 1] if i + 1 < len(body) else None
        if (isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[name] = after.value.value
            continue
        trailing = [comments[r] for r in range(stmt.lineno, stmt.end_lineno + 1) if r in comments]
        if trailing:
            docs[name] = " ".join(trailing)
            continue
        above, row = [], stmt.lineno - 1
        while row in comments and row not in code_rows:
            above.insert(0, comments[row])
            row -= 1
        if above:
            docs[name] = " ".join(above)

    class_doc = inspect.cleandoc(ast.get_docstring(node, clean=False) or "")
    current = None
    for line in class_doc.splitlines():
        match = re.match(r"(\w+):\s+(\S.*)", line)
        if match:
            current = match.group(1)
            if current not in docs:
                docs[current] = match.group(2)
            else:
                current = None
        elif current is not None and line[:1].isspace() and line.strip():
            docs[current] += " " + line.strip()
        else:
            current = None
    return {k: " ".join(v.split()) for k, v in docs.items()}


def field_docs(cls: type) -> dict[str, str]:
    """Doc line of every documented field of the dataclass ``cls``, inherited fields included."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_source_docs(klass))
    return docs


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def describe(cfg: Any, prefix: str = "") -> list[KeyInfo]:
    """Every settable key of the config tree ``cfg``, depth first in declaration order."""
    out: list[KeyInfo] = []
    types_ = _field_types(cfg)
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        key = f"{prefix}{f.name}"
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            out += describe(value, key + ".")
            continue
        out.append(KeyInfo(key=key, type=_type_name(types_[f.name]), value=value,
                           default=_field_default(f), doc=docs.get(f.name, "")))
    return out


def format_value(value: Any) -> str:
    """A value as one would write it after ``key=`` on a command line."""
    if value is dataclasses.MISSING:
        return "(required)"
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        plain = value and not any(c.isspace() or c in "\"'\\" for c in value)
        return value if plain else json.dumps(value)
    return json.dumps(to_dict(value), separators=(",", ":"))


def format_keys(keys: list[KeyInfo], width: int = 100) -> str:
    """The text ``maspo-megatron config`` prints: ``key = value  [type; default D]`` + doc."""
    import textwrap

    lines = []
    for k in keys:
        lines.append(f"{k.key} = {format_value(k.value)}  [{k.type}; default {format_value(k.default)}]")
        if k.doc:
            lines += textwrap.wrap(k.doc, width=width, initial_indent="    ", subsequent_indent="    ")
    return "\n".join(lines)
