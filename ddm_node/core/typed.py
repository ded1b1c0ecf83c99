"""Typed dataclasses from plain data (YAML, JSON, `--set`), and their canonical JSON and hash.

Generic over any dataclass: config.py's sections, and the artifact configs written by `to_dict`. Values are checked
against the annotations (`coerce`), unknown keys are refused, and a field that a saved config lacks takes its
`ABSENT` value (the value that config stood for before the field existed), which `config_hash` also leaves out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from typing import Any, Literal

from ddm_node.core.errors import DDMError

# Field metadata key: the value a saved config (a plan, an artifact's config.json) that lacks the field stands for,
# because it was written before the field existed (`from_dict(..., saved=True)`); the default is for new configs.
ABSENT = "absent"


_EXPONENT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise DDMError(f"{where} must be a mapping, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, where)
            except DDMError as exc:
                errors.append(str(exc))
        raise DDMError(errors[0] if errors else f"{where} has an invalid value")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise DDMError(f"{where} must be a list of {len(args)} values, got {value!r}")
        return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        (arg,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise DDMError(f"{where} must be a list, got {type(value).__name__}")
        return [coerce(v, arg, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            quoted = [f"'{a}'" for a in allowed]
            raise DDMError(f"{where} must be {', '.join(quoted[:-1])} or {quoted[-1]}, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _EXPONENT.match(value):  # YAML 1.1 reads 1e-3 (no dot) as a string
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DDMError(f"{where} must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise DDMError(f"{where} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise DDMError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise DDMError(f"{where} must be a string, got {type(value).__name__} {value!r}")
        return value
    raise DDMError(f"{where}: unsupported type {tp!r}")


def _build(cls: type, values: dict, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise DDMError(f"unknown config key '{prefix}{unknown[0]}' (known: {', '.join(sorted(names))})")
    kwargs = {k: coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in values.items()}
    return cls(**kwargs)


def from_dict(values: dict, cls: type, source: str = "config", saved: bool = False) -> Any:
    """Build a dataclass of type `cls` from plain data, naming `source` in any error. `saved`: the data is a whole
    config written by `to_dict` (a plan, an artifact), so a field it lacks takes its `ABSENT` value."""
    try:
        obj = _build(cls, _fill_absent(values, cls) if saved else values, "")
        return obj.validate() if hasattr(obj, "validate") else obj
    except DDMError as exc:
        raise DDMError(f"{source}: {exc}") from None


def _fill_absent(values: Any, cls: type) -> Any:
    """`values` with the `ABSENT` value of every field of `cls` (and of its nested sections) that it lacks."""
    if not isinstance(values, dict):
        return values  # _build names the problem
    out = dict(values)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in out and ABSENT in f.metadata:
            out[f.name] = f.metadata[ABSENT]
        elif f.name in out and dataclasses.is_dataclass(hints[f.name]):
            out[f.name] = _fill_absent(out[f.name], hints[f.name])
    return out


def to_dict(obj: Any) -> dict:
    """Plain-data form of a config dataclass (tuples become lists, as in JSON)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))


def canonical_json(data: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no spaces, UTF-8. Hashes and signatures are over these."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def config_hash(obj: Any) -> str:
    """sha256 of a dataclass's canonical JSON, without the fields at their `ABSENT` value: a config written before
    such a field existed hashes as it always did (a run's checkpoints keep matching its config hash)."""
    return hashlib.sha256(canonical_json(_drop_absent(to_dict(obj), type(obj)))).hexdigest()


def _drop_absent(values: dict, cls: type) -> dict:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        value = values[f.name]
        if ABSENT in f.metadata and value == f.metadata[ABSENT]:
            continue
        out[f.name] = _drop_absent(value, hints[f.name]) if dataclasses.is_dataclass(hints[f.name]) else value
    return out

