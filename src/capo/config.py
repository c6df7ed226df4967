"""One config dataclass per stage: YAML files and CLI flags load into the same dataclass.

Each field documents itself once, through ``doc()``: its help, its allowed range (``ge``, ``gt``,
``le``, ``lt``) or values (``choices``), and whether it belongs to the identity of what the stage
makes (``identity=False``: it does not change the result, e.g. a logging option). The range drives
validation and ``--help``; the choices drive argparse, validation and help. Unknown keys, values of
the wrong type, non-finite floats and values out of range are errors that name the key.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from capo.errors import CapoError

T = TypeVar("T")


#: range bound in doc() -> (comparison that must hold, how --help and errors show it)
BOUNDS: dict[str, tuple[Any, str]] = {
    "ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
    "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<"),
}
#: longest user text quoted in an error message
QUOTE_CHARS = 200


def doc(help: str, default: Any = dataclasses.MISSING, *, choices: Any = None, identity: bool = True,
        **kw: Any) -> Any:
    """A dataclass field with its one-line documentation, allowed range (``ge=0``, ``gt=0``, ``le``,
    ``lt``) or ``choices`` (any iterable, e.g. a name -> factory table), and ``identity=False`` for
    a setting that does not change what the stage makes."""
    meta = {"help": help, "identity": identity, **{k: kw.pop(k) for k in BOUNDS if k in kw}}
    if choices is not None:
        meta["choices"] = tuple(choices)
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata=meta)
    return dataclasses.field(default=default, metadata=meta, **kw)


def quote(value: Any) -> str:
    """``repr(value)`` cut to QUOTE_CHARS characters (errors never echo a whole file)."""
    text = repr(value)
    return text if len(text) <= QUOTE_CHARS else f"{text[:QUOTE_CHARS]}... ({len(text)} characters)"


def range_text(f: dataclasses.Field) -> str:
    """'> 0', '>= 0, <= 1', 'one of a, b' for --help and errors ('' if unconstrained)."""
    if "choices" in f.metadata:
        return "one of " + ", ".join(map(str, f.metadata["choices"]))
    return ", ".join(f"{BOUNDS[k][1]} {f.metadata[k]}" for k in BOUNDS if k in f.metadata)


def identity_keys(cls: type) -> tuple[str, ...]:
    """Fields of ``cls`` that change what its stage makes (all but those declared identity=False)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("identity", True))


def _check_value(f: dataclasses.Field, value: Any, source: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise CapoError(f"config key '{f.name}' must be a finite number, got {value}", path=source)
    choices = f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise CapoError(f"config key '{f.name}' must be {range_text(f)}, got {quote(value)}", path=source)
    for key, (holds, _) in BOUNDS.items():
        if key in f.metadata and isinstance(value, (int, float)) and not holds(value, f.metadata[key]):
            raise CapoError(f"config key '{f.name}' must be {range_text(f)}, got {value}", path=source)


def check_fields(obj: Any, source: str = "<config>") -> None:
    """Every field of a config dataclass finite and within its declared range or choices."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v is not None:
                _check_value(f, v, source)


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
            raise CapoError(f"config key '{key}' expects a list, got {quote(value)}", path=source)
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
            f"config key '{key}' expects {getattr(inner, '__name__', inner)}, got {quote(value)}",
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
            f"unknown config key {quote(unknown[0])} for {cls.__name__} (known: {', '.join(sorted(names))})",
            path=source,
        )
    kwargs = {k: _coerce(k, v, hints[k], source) for k, v in data.items()}
    obj = cls(**kwargs)
    check_fields(obj, source)
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
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as e:
        raise CapoError(f"not UTF-8 text (byte {e.start})", path=str(p)) from None
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
        allowed = range_text(f)
        help_ = f"{f.metadata.get('help', '')} ({allowed + '; ' if allowed else ''}default: {default})"
        choices = f.metadata.get("choices") if inner is str and not is_list else None
        metavar = "{" + ",".join(choices) + "}" if choices else None  # checked by check_fields: one line
        if is_list:
            parser.add_argument(flag, dest=f.name, action="append", default=None, help=help_)
        elif inner is bool:  # a bare --flag means true; --flag false also works
            parser.add_argument(flag, dest=f.name, default=None, nargs="?", const="true", help=help_)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=metavar, help=help_)


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
