"""
The one error of client ID metadata documents, and how a value taken from
the network is quoted in its message: every refusal is a L{CIMDError} whose
message can be shown to the client as an C{invalid_client} description.
"""

from __future__ import annotations


class CIMDError(Exception):
    """
    A client ID metadata document could not be used.  The message is one
    line for people (the operator's log, the client's C{error_description}):
    ASCII, without quotes or backslashes, never a traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def show(value: object, limit: int = 80) -> str:
    """
    Quote a value taken from the network for an error message: printable
    ASCII only, no double quotes or backslashes (RFC 6749 forbids them in
    C{error_description}), and bounded.
    """
    text = value if isinstance(value, str) else repr(value)
    safe = "".join(c if " " <= c <= "~" and c not in "\"\\'" else "?" for c in text)
    if len(safe) > limit:
        safe = safe[: limit - 3] + "..."
    return f"'{safe}'"


def plain(text: str, limit: int = 160) -> str:
    """
    A message of our own making (which may quote a fragment of the input)
    as an C{error_description} may carry it: see L{show}, without quotes.
    """
    safe = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."
