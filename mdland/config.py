"""The one config loader: YAML files into dataclasses, with `key=value` overrides from the command line."""

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def _coerce(value: Any, kind: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0], where)
    if kind is bool:
        if isinstance(value, str):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{where}: expected true/false, got {value!r}")
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if kind in (int, float):
        if isinstance(value, bool):  # YAML's `yes` for a count is a slip, not 1
            raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}")
        try:
            number = kind(value)
        except (TypeError, ValueError, OverflowError):  # OverflowError: int(.inf)
            raise ValueError(f"{where}: expected {kind.__name__}, got {value!r}") from None
        if not math.isfinite(number):
            raise ValueError(f"{where}: expected a finite number, got {value!r}")
        if kind is int and isinstance(value, float) and value != number:  # 2.7 epochs is a typo, not 2
            raise ValueError(f"{where}: expected int, got {value!r}")
        return number
    if kind is str:
        # An empty YAML value is None: as a path it would become the file "None".
        if value is None or isinstance(value, (list, dict)):
            raise ValueError(f"{where}: expected text, got {value!r}")
        return str(value)
    if origin is list:
        if isinstance(value, str):  # one item may be given alone
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(kind) or (Any,)
        return [v if item is Any else _coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass `cls` from `data`; unknown keys and ill-typed values fail naming the key."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], f"{where}: {k}") for k, v in data.items()})


def check_count(name: str, value: int | None) -> None:
    """Fail naming the count `name` when it is below 1 (None is unset and passes)."""
    if value is not None and value < 1:
        raise ValueError(f"{name}: must be at least 1, got {value}")


def check_counts(cfg, names: tuple[str, ...]) -> None:
    """`check_count` for each of `cfg`'s count fields `names`, in order."""
    for name in names:
        check_count(name, getattr(cfg, name))


def check_learning_rate(value: float) -> None:
    """A learning rate the optimizer takes (its own message names no field)."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"learning_rate: a positive number, got {value}")


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """`cls` from a YAML file (optional) with `key=value` overrides (values parsed as YAML scalars)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML ({e})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of config keys, got a {type(data).__name__}")
    sets = parse_overrides(overrides or [], cls)
    # Each part checked alone first, so an error names where the bad key or value was given (the file or --set).
    from_dict(cls, data, str(path))
    from_dict(cls, sets, "--set")
    return from_dict(cls, {**data, **sets})


def _is_text(kind: Any) -> bool:
    return kind is str or (typing.get_origin(kind) in (typing.Union, types.UnionType)
                           and set(typing.get_args(kind)) == {str, type(None)})


def parse_overrides(items: list[str], cls: type | None = None) -> dict:
    """`key=value` command-line overrides as a mapping, values parsed as YAML scalars, except that a text field of
    dataclass `cls` takes the text as typed (YAML reads `name=0123` as the number 83 and `name=yes` as true)."""
    text = {k for k, kind in typing.get_type_hints(cls).items() if _is_text(kind)} if cls else set()
    data = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise ValueError(f"override {item!r}: expected key=value")
        # Quoted text and null are YAML's to read.
        if key in text and value.strip() not in ("", "null", "~") and value.strip()[:1] not in ("'", '"'):
            data[key] = value
            continue
        try:
            data[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"override {item!r}: not a YAML value ({str(e).splitlines()[0]})") from None
    return data
