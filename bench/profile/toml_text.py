"""A profile given as a dict, written as TOML text, so that it goes through the same parser as a profile file."""
from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from typing import Any

from bench.profile.config import ConfigError

__all__ = ["to_toml"]


def _string(text: str) -> str:
    # JSON's escapes (\", \\, \n, \uXXXX) are TOML's too; DEL is the one control character JSON leaves raw.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any, where: str) -> str:
    """One TOML value on one line: scalars, arrays and (nested) inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        number = float(value)
        return ("nan" if math.isnan(number) else "inf" if number > 0 else "-inf") if not math.isfinite(number) \
            else repr(number)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{_key(k, where)} = {_value(v, f'{where}.{k}')}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(v, f"{where}[{i}]") for i, v in enumerate(value)) + "]"
    raise ConfigError(f"profile dict: {where} is a {type(value).__name__} ({value!r}); a profile holds only "
                      "strings, numbers, booleans, lists and tables")


def _key(key: Any, where: str) -> str:
    if not isinstance(key, str):
        raise ConfigError(f"profile dict: key {key!r} in {where} is a {type(key).__name__}; keys must be strings")
    return _string(key)


def to_toml(profile: Mapping[str, Any]) -> str:
    """TOML text for a profile dict with the TOML file's schema, one top-level key a line (values inline)."""
    if not isinstance(profile, Mapping):
        raise ConfigError(f"a profile dict must be a mapping, got {type(profile).__name__}")
    return "".join(f"{_key(k, 'the top level')} = {_value(v, str(k))}\n" for k, v in profile.items())
