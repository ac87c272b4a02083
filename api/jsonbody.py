"""Request bodies -> a JSON object, refusing what is valid JSON but no sane request: 400, naming the place.

Python's json module accepts things a server should not: numbers past the float range (1e999 parses to inf),
integers of thousands of digits (slow to convert; past 4,300 digits json.loads raises a bare ValueError),
nesting deep enough to exhaust the interpreter's recursion limit, and duplicate keys (the last one silently
wins, so two parsers could read one body two ways). Each is caught here, before any field is looked at.
"""
from __future__ import annotations

import json
import math
from typing import Any

from .errors import APIError

MAX_DEPTH = 32         # the deepest real request (chat content parts) is 4 levels
MAX_INT_DIGITS = 40    # more than any field's bound needs (seeds go to 2**63, 19 digits)


class _Refused(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class _OutOfRange(str):
    """A number json.loads met that no field can take, kept as its text until the walk below names its place."""


def _int(text: str) -> int | _OutOfRange:
    return _OutOfRange(text) if len(text.lstrip("-")) > MAX_INT_DIGITS else int(text)


def _float(text: str) -> float | _OutOfRange:
    value = float(text)
    return value if math.isfinite(value) else _OutOfRange(text)


def _constant(name: str):
    raise _Refused(f"{name} is not JSON")  # json.loads accepts NaN and Infinity unless told otherwise


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Refused(f"the key '{dup[:100]}' appears twice in one object")
    return obj


def _problem(data: Any) -> str | None:
    """The first place nested deeper than MAX_DEPTH or holding an out-of-range number, walked without
    recursion, or None."""
    stack = [(data, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, _OutOfRange):
            digits = len(value.lstrip("-"))
            what = (f"an integer of {digits} digits (at most {MAX_INT_DIGITS})" if value.lstrip("-").isdigit()
                    else f"{value[:30]}, beyond the float range")
            return f"'{path}' holds {what}"
        if depth > MAX_DEPTH:
            return f"'{path}' is nested too deeply (at most {MAX_DEPTH} levels)"
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for k, v in items:
            if isinstance(v, (dict, list, _OutOfRange)):
                child = f"{path}[{k}]" if isinstance(value, list) else f"{path}.{k}" if path else str(k)
                stack.append((v, child[:200], depth + 1))
    return None


def parse_json(body: bytes) -> dict[str, Any]:
    def bad(why: str, valid: bool = True) -> APIError:
        return APIError(400, f"the body {'is refused' if valid else 'is not valid JSON'}: {why}", code="invalid_json")

    try:
        data = json.loads(body, parse_int=_int, parse_float=_float, parse_constant=_constant,
                          object_pairs_hook=_object)
    except _Refused as e:
        raise bad(e.message) from None
    except RecursionError:
        raise bad(f"it is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
        raise bad(str(e)[:200], valid=False) from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    if problem := _problem(data):
        raise bad(problem)
    return data
