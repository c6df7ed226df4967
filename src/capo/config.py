"""One config dataclass per stage: YAML files and CLI flags load into the same dataclass.

Each field documents itself once, through ``field(metadata={"help": ...})``. Unknown keys and
values of the wrong type are errors that name the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from capo.errors import CapoError

T = TypeVar("T")


def doc(help: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """A dataclass field with its one-line documentation."""
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, is_list) for annotations like ``int``, ``float | None``, ``list[str]``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (list, tuple):
        return typing.get_args(tp)[0], True
    return tp, False


def _coerce(key: str, value: Any, tp: Any, source: str) -> Any:
    inner, is_list = _base_type(tp)
    if value is None:
        return None
    if is_list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise CapoError(f"config key '{key}' expects a list, got {value!r}", path=source)
        return [_coerce(key, v, inner, source) for v in value]
    try:
        if inner is bool:
            if isinstance(value, str):
                low = value.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return low in ("true", "1", "yes")
            return bool(value)
        if inner in (int, float, str):
            if inner is int and isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return inner(value)
        if inner is dict or typing.get_origin(inner) is dict:
            if isinstance(value, str):  # a flag: --model-options '{load_t5: false}'
                value = yaml.safe_load(value) or {}
            if not isinstance(value, dict):
                raise ValueError(value)
            return dict(value)
    except (TypeError, ValueError, yaml.YAMLError):
        raise CapoError(
            f"config key '{key}' expects {getattr(inner, '__name__', inner)}, got {value!r}",
            path=source,
        ) from None
    return value


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<config>") -> T:
    """Build ``cls`` from a mapping; unknown keys and bad values raise CapoError naming the key."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CapoError(
            f"unknown config key '{unknown[0]}' for {cls.__name__} (known: {', '.join(sorted(names))})",
            path=source,
        )
    kwargs = {k: _coerce(k, v, hints[k], source) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping is a CapoError."""
    p = Path(path)
    if not p.is_file():
        raise CapoError("config file not found", path=str(p))
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise CapoError(f"invalid YAML: {str(e).splitlines()[0]}", path=str(p)) from None
    if not isinstance(data, dict):
        raise CapoError("config must be a mapping of key: value", path=str(p))
    return data


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per dataclass field (default None so YAML values are not overridden)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        inner, is_list = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else "[]"
        help_ = f"{f.metadata.get('help', '')} (default: {default})"
        if is_list:
            parser.add_argument(flag, dest=f.name, action="append", default=None, help=help_)
        elif inner is bool:  # a bare --flag means true; --flag false also works
            parser.add_argument(flag, dest=f.name, default=None, nargs="?", const="true", help=help_)
        else:
            parser.add_argument(flag, dest=f.name, default=None, help=help_)


def build(cls: type[T], args: argparse.Namespace, config_path: str | None = None,
          section: str | None = None) -> T:
    """YAML file (optionally one section of it) overridden by explicitly given CLI flags."""
    data: dict[str, Any] = {}
    source = "<cli>"
    if config_path:
        data = load_yaml(config_path)
        source = str(config_path)
        if section is not None:
            data = data.get(section, {}) or {}
    names = {f.name for f in dataclasses.fields(cls)}
    for name in names:
        value = getattr(args, name, None)
        if value is not None:
            if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
                value = [v for v in value[0].split(",") if v]
            data[name] = value
            source = source if config_path else "<cli>"
    return from_dict(cls, data, source)


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain dict of a config dataclass (for saving the resolved config)."""
    return dataclasses.asdict(obj)
