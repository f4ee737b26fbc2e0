"""
JSON from strangers: one decoder for every body the broker parses (/mcp,
client registration, client metadata documents) that either returns a value
the rest of the broker can serialise again, or raises L{JSONInputError} with
a message fit for the 400 answer.

What it refuses beyond what C{json.loads} refuses: bytes that are not UTF-8,
C{NaN}/C{Infinity} and numbers too large for a float (Python would read them
as C{inf} and write C{Infinity} back, which no peer parses), lone UTF-16
surrogates (C{"\\ud800"}: valid JSON text, but not Unicode, so it cannot be
written out as UTF-8), and nesting deeper than a bound (which otherwise ends
in a C{RecursionError} in the decoder or in whoever walks the value next).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# Deeper than any MCP message or client metadata document needs; shallow
# enough that nothing that walks a value recursively runs out of stack.
MAX_DEPTH = 64

# A \u escape of a UTF-16 surrogate: the only way a surrogate gets into text
# decoded strictly from UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class JSONInputError(ValueError):
    """
    The body is not JSON the broker accepts; the message says why.
    """


def _no_constant(name: str) -> Any:
    raise JSONInputError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JSONInputError(f"the number {text[:40]} is too large")
    return value


def loads(data: bytes | str, max_depth: int = MAX_DEPTH) -> Any:
    """
    Decode C{data} (UTF-8 bytes, or text) as one JSON value.

    @raise JSONInputError: with a one-line reason.
    """
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JSONInputError(
                f"the body is not UTF-8 (invalid byte at offset {e.start})"
            ) from None
    else:
        text = data
    try:
        value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    except RecursionError:
        raise JSONInputError(f"JSON nested deeper than {max_depth} levels") from None
    except JSONInputError:
        raise
    except ValueError as e:
        detail = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        raise JSONInputError(f"not JSON: {detail}") from None
    # Cheap tests first: a value cannot nest deeper than it has brackets,
    # and without a surrogate escape there is no surrogate to find.
    deep = text.count("[") + text.count("{") > max_depth
    if deep or _SURROGATE_ESCAPE.search(text):
        check(value, max_depth)
    return value


def check(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """
    Walk a decoded value (without recursion): nesting within C{max_depth},
    every string and key valid Unicode.

    @raise JSONInputError: where it is not.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _unicode(item)
        elif isinstance(item, dict | list):
            if depth > max_depth:
                raise JSONInputError(f"JSON nested deeper than {max_depth} levels")
            if isinstance(item, dict):
                for key, child in item.items():
                    _unicode(key)
                    stack.append((child, depth + 1))
            else:
                stack.extend((child, depth + 1) for child in item)


def _unicode(text: str) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise JSONInputError("a string holds a lone UTF-16 surrogate (not valid Unicode)") from None


def dumps(value: Any) -> bytes:
    """
    C{value} as compact UTF-8 JSON.  Should a lone surrogate have got into
    it anyway, it is written as its \\u escape rather than failing the
    answer it belongs to.
    """
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode("ascii")
