"""Parsing a manifest's fields: every field's JSON type and range checked, any flaw a
``FieldError`` naming the field (``Manifest.from_dict`` turns it into a ``ManifestError``).

A manifest is untrusted input (docs/trust.md); these helpers are the one
place its values are type-checked. Stdlib only.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

#: Limits on what a manifest may hold (a crafted one must not exhaust memory or the stack).
MAX_MANIFEST_BYTES = 64 * 2**20
MAX_NESTING = 32
#: Largest dimension, batch size or count a manifest may record (fits every index type).
MAX_DIM = 2**31 - 1
#: A file name a manifest may list: a plain name inside the folder (checked by ``check_file_name``).
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")


class FieldError(ValueError):
    """A manifest field of the wrong type or value; ``Manifest.from_dict`` turns it into a
    ``ManifestError`` naming the manifest."""


_KINDS: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "a list",
    dict: "an object",
}


def describe(value: Any) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, dict | list) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def expect(value: Any, kind: type, path: str, *, low: float | None = None, high: float | None = None) -> Any:
    """``value`` if it is of JSON ``kind`` (ints are not bools, floats accept ints), within
    [low, high] for numbers; else FieldError naming ``path``."""
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise FieldError(f"field '{path}' is {describe(value)}, expected {_KINDS[kind]}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise FieldError(f"field '{path}' is {value}, expected a value in [{low}, {high}]")
    return float(value) if kind is float else value


def field_of(data: Any, key: str, kind: type, path: str, **bounds: float) -> Any:
    """``data[key]`` checked by :func:`expect`; ``data`` must be an object holding ``key``."""
    where = f"{path}.{key}" if path else key
    expect(data, dict, path or "(top level)")
    if key not in data:
        raise FieldError(f"field '{where}' is missing")
    return expect(data[key], kind, where, **bounds)


def list_of(data: Any, key: str, path: str, item: Callable[[Any, str], Any]) -> tuple[Any, ...]:
    """``data[key]`` as a list, each element converted by ``item(element, its path)``."""
    values = field_of(data, key, list, path)
    where = f"{path}.{key}" if path else key
    return tuple(item(value, f"{where}[{index}]") for index, value in enumerate(values))


def optional_of(data: Any, key: str, kind: type, path: str, **bounds: float) -> Any:
    """``data[key]`` checked by :func:`expect` when it is present and not null, else None."""
    where = f"{path}.{key}" if path else key
    expect(data, dict, path or "(top level)")
    value = data.get(key)
    return None if value is None else expect(value, kind, where, **bounds)


def no_unknown_keys(data: dict[str, Any], known: tuple[str, ...], path: str) -> None:
    """FieldError when ``data`` holds a key outside ``known`` (a typed section lists them all)."""
    unknown = sorted(str(key) for key in data if key not in known)
    if unknown:
        raise FieldError(f"field '{path}' has unknown keys {unknown}, expected some of {list(known)}")


def check_file_name(name: Any, where: str) -> str:
    """``name`` if it is a plain file name inside the engine folder: no separators, no ``..``,
    not absolute, no leading dot; else FieldError (checked before any file is touched)."""
    if not (isinstance(name, str) and _PLAIN_NAME.fullmatch(name) and ".." not in name and len(name) <= 255):
        raise FieldError(
            f"{where} names file {describe(name)}: an engine folder's files are plain names inside it "
            "(letters, digits, _ . + -; no path separators, '..' or absolute paths)"
        )
    return name
