"""
Log output: text or JSON lines through C{twisted.logger}, a level filter, and
a last line of defence that scrubs secrets from every event before it is
written.

Code must not log secrets in the first place; the scrubber is there because a
child's stderr, an exception message or a library's debug line can carry one
we did not put there ourselves.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    formatTime,
)
from zope.interface import implementer

REDACTED = "[REDACTED]"

# Bearer-ish values that can show up in text we did not write ourselves:
# HTTP authorization headers, OAuth parameters and JSON fields.
_TOKEN_PATTERNS = [
    re.compile(r"(?i)(\b(?:bearer|token|basic)\s+)[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(
        r"(?i)((?:access_token|refresh_token|client_secret|code_verifier|id_token|"
        r"password|code)[\"']?\s*[:=]\s*[\"']?)[^\s\"'&,;}]{4,}"
    ),
]


class Redactor:
    """
    Replaces known secret values and token-shaped substrings in text.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        for s in secrets:
            self.add(s)

    def add(self, secret: str) -> None:
        # Short strings would redact ordinary words; real secrets are long.
        if secret and len(secret) >= 8 and secret not in self._secrets:
            self._secrets.append(secret)
            self._secrets.sort(key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        for pattern in _TOKEN_PATTERNS:
            text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
        return text


@implementer(ILogObserver)
class RedactingObserver:
    """
    Formats each event to text first, scrubs it, and hands the scrubbed event
    on.  Formatting here (instead of redacting fields one by one) also
    catches secrets inside failures and C{repr}s of arbitrary objects.
    """

    def __init__(self, redact: Redactor, downstream: ILogObserver) -> None:
        self._redact = redact
        self._downstream = downstream

    def __call__(self, event: dict[str, Any]) -> None:
        text = formatEvent(event)
        clean: dict[str, Any] = {
            "log_time": event.get("log_time"),
            "log_level": event.get("log_level", LogLevel.info),
            "log_namespace": event.get("log_namespace", "-"),
            "log_system": event.get("log_system") or event.get("log_namespace", "-"),
            "log_format": "{text}",
            "text": self._redact(text),
        }
        failure = event.get("log_failure")
        if failure is not None:
            clean["log_format"] = "{text}\n{traceback}"
            clean["traceback"] = self._redact(failure.getTraceback())
        self._downstream(clean)


def _json_line_observer(out: IO[str]) -> ILogObserver:
    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        record = {
            "time": event.get("log_time"),
            "level": level.name,
            "namespace": event.get("log_namespace"),
            "message": event["text"],
        }
        if "traceback" in event:
            record["traceback"] = event["traceback"]
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()

    return observe


class _SecondStamp:
    """
    Twisted's C{formatTime}, which shows whole seconds, computed once per
    second: with an access-log line per request it was an eighth of the
    logging's cost (docs/benchmarks.md).
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._text = ""

    def __call__(self, when: float | None) -> str:
        if when is None:
            return formatTime(None)
        second = math.floor(when)
        if not _MARGIN <= when - second <= 1 - _MARGIN:
            # Within a microsecond of a whole second, where datetime's
            # rounding decides which second it shows: ask it.
            return formatTime(when)
        if second != self._second:
            self._second, self._text = second, formatTime(second + 0.5)
        return self._text


_MARGIN = 2e-6


def _text_observer(out: IO[str]) -> ILogObserver:
    """
    Twisted's classic line (time, [system], text), built straight from the
    already formatted and scrubbed text: formatting an event twice was a
    tenth of the broker's CPU per request (docs/benchmarks.md).
    """

    stamp = _SecondStamp()

    @implementer(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        text = event["text"]
        if "traceback" in event:
            text = f"{text}\n{event['traceback']}"
        text = text.replace("\n", "\n\t")
        out.write(f"{stamp(event.get('log_time'))} [{event['log_system']}] {text}\n")
        out.flush()

    return observe


def make_observer(
    out: IO[str], log_format: str, level: LogLevel, secrets: Iterable[str]
) -> ILogObserver:
    """
    The broker's whole log pipeline: level filter, redaction, formatting.
    """
    sink = _json_line_observer(out) if log_format == "json" else _text_observer(out)
    redacting = RedactingObserver(Redactor(secrets), sink)
    return FilteringLogObserver(redacting, [LogLevelFilterPredicate(defaultLogLevel=level)])


def open_log_output(logfile: str | None) -> IO[str]:
    """
    twistd's C{--logfile}: C{-} or nothing means standard output.
    """
    if not logfile or logfile == "-":
        return sys.stdout
    return open(logfile, "a", encoding="utf-8")


_twistd_settings: dict[str, Any] = {}


def prepare_twistd_observer(config: Any, logfile: str | None) -> None:
    """
    Remember what L{twistd_observer} should build; called while options
    are parsed, before twistd asks for its observer.
    """
    _twistd_settings.update(
        logfile=logfile,
        log_format=config.log_format,
        level=config.log_level,
        secrets=config.secrets(),
    )


def twistd_observer() -> ILogObserver:
    """
    The observer factory named to twistd's C{--logger}.
    """
    s = _twistd_settings
    return make_observer(open_log_output(s["logfile"]), s["log_format"], s["level"], s["secrets"])
