"""
What C{fjmcp-admin} tells the operator: a command's L{Result} (a JSON object
for C{--json}, text otherwise) in tables and fields, times in UTC, and the
L{AdminError} that carries a one-line message and the exit status.
"""

from __future__ import annotations

import datetime
from collections.abc import Sequence
from typing import Any

import attrs

PROG = "fjmcp-admin"


class AdminError(Exception):
    """
    What the operator is told, and the exit status that goes with it.
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    moment = datetime.datetime.fromtimestamp(t, datetime.UTC).replace(microsecond=0)
    return moment.isoformat().replace("+00:00", "Z")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [list(headers), *cells]
    return "\n".join(
        "  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def fields(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs) + 1
    out = []
    for k, v in pairs:
        if isinstance(v, list | tuple):
            v = ", ".join(str(x) for x in v) or "-"
        out.append(f"{(k + ':').ljust(width)} {'-' if v is None else v}")
    return "\n".join(out)


@attrs.frozen
class Result:
    """
    What a command prints: C{data} with --json, else C{text}.
    """

    data: dict[str, Any]
    text: str
