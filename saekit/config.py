"""Strict configs: dataclasses whose fields carry docstrings, loaded from YAML or dicts.

Why strict: a misspelt key that is silently dropped trains the wrong model for hours. Unknown
keys raise `ConfigError` naming the key and the closest valid one (or warn with strict=False);
wrong types and out-of-range values raise naming the field, the expected and the found value.

Declare fields with `param(default, "docstring", ge=..., le=..., choices=...)`.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml

from saekit.errors import ConfigError, nearest

log = logging.getLogger(__name__)
T = TypeVar("T", bound="Config")
_MISSING = dataclasses.MISSING
REDACT_KEYS = ("token", "hf_token", "api_key", "password")


def param(default: Any = _MISSING, doc: str = "", *, ge=None, gt=None, le=None, lt=None, choices=None,
          default_factory: Any = _MISSING):
    """A dataclass field with a docstring and optional range/choice validation."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass
class Config:
    """Base of every config: strict from_dict/to_dict and YAML I/O."""

    @classmethod
    def from_dict(cls: type[T], data: dict | None, strict: bool = True, where: str = "") -> T:
        data = {} if data is None else data
        if not isinstance(data, dict):  # checked before dict(): a YAML list or scalar is named, not a raw error
            raise ConfigError(f"{where or cls.__name__}: expected a mapping of keys to values, "
                              f"found {type(data).__name__} {str(data)[:80]!r}")
        data = dict(data)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        for key in list(data):
            if key not in fields:
                close = nearest(key, fields, n=1)
                msg = (f"{where or cls.__name__}: unknown key '{key}'"
                       + (f" (did you mean '{close[0]}'?)" if close else "")
                       + f"; valid keys: {', '.join(sorted(fields))}")
                if strict:
                    raise ConfigError(msg)
                log.warning(msg)
                data.pop(key)
        kwargs = {}
        for name, f in fields.items():
            path = f"{where}.{name}" if where else name
            if name not in data:
                if f.default is _MISSING and f.default_factory is _MISSING:
                    raise ConfigError(f"{where or cls.__name__}: missing required key '{name}' ({f.metadata.get('doc', '')})")
                continue
            value = _coerce(data[name], hints[name], path, strict)
            _check_range(value, f, path)
            kwargs[name] = value
        obj = cls(**kwargs)
        obj.validate()
        return obj

    def validate(self) -> None:
        """Cross-field checks; subclasses override and raise ConfigError."""

    def to_dict(self, redact: bool = True) -> dict:
        """Plain data; secrets (REDACT_KEYS) are redacted unless redact is turned off, so every writer that
        records a config (run folders, checkpoints, bundles) leaves tokens out by default (promise 13)."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Config):
                v = v.to_dict(redact)
            elif isinstance(v, list):
                v = [x.to_dict(redact) if isinstance(x, Config) else x for x in v]
            elif isinstance(v, dict):
                v = {k: (x.to_dict(redact) if isinstance(x, Config) else x) for k, x in v.items()}
            if redact and f.name in REDACT_KEYS and v:
                v = "<redacted>"
            out[f.name] = v
        return out

    @classmethod
    def from_yaml(cls: type[T], path: str | Path, strict: bool = True) -> T:
        return cls.from_dict(read_yaml_mapping(path, f"a {cls.__name__} YAML file"), strict=strict)

    @classmethod
    def describe(cls) -> dict[str, str]:
        """Field name -> docstring, for help texts."""
        return {f.name: f.metadata.get("doc", "") for f in dataclasses.fields(cls)}


def read_yaml_mapping(path: str | Path, what: str = "a YAML config file") -> dict:
    """The top-level mapping of a YAML file. A missing, unreadable, empty or malformed file, or one whose
    top level is not a mapping, is a ConfigError that says which: an empty file is never read as "all
    defaults" (a run on the defaults is hours of work nobody asked for)."""
    path = Path(path)
    if not path.is_file():
        found = "a folder" if path.is_dir() else "no such file"
        raise ConfigError(f"{path}: expected {what}, found {found}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: expected {what} (UTF-8 text), found binary data ({e})") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if data is None:
        raise ConfigError(f"{path}: expected {what}, found an empty file")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level of {what}, found {type(data).__name__}")
    return data


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, path: str, strict: bool) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path, strict)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{path}: expected {' or '.join(_type_name(a) for a in args)}, found {value!r}")
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{path}: expected one of {list(get_args(tp))}, found {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, found {type(value).__name__} {value!r}")
        (inner,) = get_args(tp)[:1] or (Any,)
        return [_coerce(v, inner, f"{path}[{i}]", strict) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, found {type(value).__name__} {value!r}")
        _, inner = get_args(tp) or (Any, Any)
        return {k: _coerce(v, inner, f"{path}.{k}", strict) for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, found {type(value).__name__} {value!r}")
        return tp.from_dict(value, strict=strict, where=path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, found {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{path}: expected an integer, found {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):
                try:
                    return float(value)  # YAML reads 1e-3 as a string
                except ValueError:
                    pass
            raise ConfigError(f"{path}: expected a number, found {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, found {value!r}")
        return value
    return value


def _check_range(value: Any, f: dataclasses.Field, path: str) -> None:
    m = f.metadata
    if value is None:
        return
    checks = [("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<")]
    for key, ok, sym in checks:
        bound = m.get(key)
        if bound is not None and isinstance(value, (int, float)) and not ok(value, bound):
            raise ConfigError(f"{path}: expected a value {sym} {bound}, found {value!r}")
    if m.get("choices") is not None and value not in m["choices"]:
        raise ConfigError(f"{path}: expected one of {list(m['choices'])}, found {value!r}")
