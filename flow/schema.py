"""Checking the structure of untrusted data before use: a parsed JSON header or body, an
unpickled dict. Readers describe what they expect as a small spec and call `check`, which
raises InputError naming the place and the fix (a list where an object was expected, a missing
key, text where numbers were, nesting too deep) instead of letting an AttributeError, KeyError
or RecursionError surface later.

A spec is
  a type or a tuple of types   isinstance (bool is never taken for a number),
  NUMBER                       an int or a float (numpy scalars included), not a bool,
  {key: spec}                  a dict holding each key (Optional(spec): may be missing or None),
  [spec]                       a list (or tuple) whose items all match spec.
"""

import dataclasses
import json
from typing import Any

import numpy as np

from flow.errors import InputError

MAX_DEPTH = 32  # containers nested deeper than this are refused before anything walks them


class _Number:
    def __repr__(self) -> str:
        return "NUMBER"


NUMBER = _Number()


@dataclasses.dataclass(frozen=True)
class Optional:
    spec: Any


_NAMES = {dict: "an object", list: "a list", str: "text", bool: "true or false", int: "an integer"}


def _describe(spec) -> str:
    if spec is NUMBER:
        return "a number"
    if isinstance(spec, dict):
        return "an object"
    if isinstance(spec, list):
        return "a list"
    if isinstance(spec, tuple):
        return " or ".join(_describe(s) for s in spec)
    return _NAMES.get(spec, f"a {getattr(spec, '__name__', spec)}")


def _kind(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, str):
        return "text"
    if is_number(value):
        return "a number"
    return f"a {type(value).__name__}"


def is_number(value) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _matches(value, spec) -> bool:
    if spec is NUMBER:
        return is_number(value)
    if isinstance(spec, tuple):
        return any(_matches(value, s) for s in spec)
    if isinstance(spec, dict):
        return isinstance(value, dict)
    if isinstance(spec, list):
        return isinstance(value, list | tuple)
    if spec in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, spec)


def check_depth(value, where: str, fix: str, limit: int = MAX_DEPTH) -> None:
    """Refuse containers (dicts, lists, tuples) nested deeper than `limit`, without recursion."""
    stack = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            if depth >= limit:
                raise InputError(f"{where}: nested more than {limit} levels deep; {fix}")
            items = item.values() if isinstance(item, dict) else item
            stack.extend((v, depth + 1) for v in items)


def check(value, spec, where: str, fix: str, path: str = ""):
    """`value` if it matches `spec`, else one InputError: "{where}: {path} must be ...; {fix}"."""
    if not path:
        check_depth(value, where, fix)
    name = path or "it"
    if isinstance(spec, Optional):
        return value if value is None else check(value, spec.spec, where, fix, path)
    if not _matches(value, spec):
        raise InputError(f"{where}: {name} must be {_describe(spec)}, not {_kind(value)}; {fix}")
    if isinstance(spec, dict):
        for key, sub in spec.items():
            if key not in value:
                if isinstance(sub, Optional):
                    continue
                raise InputError(f"{where}: {_join(path, key)} is missing; {fix}")
            check(value[key], sub, where, fix, _join(path, key))
    elif isinstance(spec, list) and spec:
        for i, item in enumerate(value):
            check(item, spec[0], where, fix, f"{path or 'it'}[{i}]")
    return value


def optional(value: dict, key, default):
    """A checked object's Optional `key`: `default` when it is missing or null, as the spec
    allows both."""
    got = value.get(key)
    return default if got is None else got


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def parse_json(text: bytes | str, where: str, fix: str = "send a JSON object") -> dict:
    """A JSON object from untrusted text: not JSON, nested too deep or not an object is one
    InputError."""
    try:
        value = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise InputError(f"{where} is not JSON; {fix}") from None
    return check(value, dict, where, fix)


def numbers(value, where: str, fix: str) -> np.ndarray:
    """A numeric numpy array as it is, or nested lists/tuples of numbers as f64; text, nesting or
    ragged lists are one InputError."""
    check_depth(value, where, fix)
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise InputError(f"{where}: holds {value.dtype} data, not numbers; {fix}")
        return value
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, np.ndarray):
            if item.dtype.kind not in "biuf":
                raise InputError(f"{where}: holds {item.dtype} data, not numbers; {fix}")
        elif not is_number(item):
            raise InputError(f"{where}: holds {_kind(item)} where numbers belong; {fix}")
    try:
        return np.asarray(value, np.float64)
    except (ValueError, TypeError):
        raise InputError(f"{where}: its lists have different lengths; {fix}") from None
