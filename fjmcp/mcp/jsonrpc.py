"""
JSON-RPC 2.0 messages as MCP uses them: what a well-formed message from a
client is, the error codes the broker answers with, and error answers that
carry the request's id whenever it is known.

Every message the broker forwards to a child passes L{classify} first, so a
child never sees a message it could only answer with C{"id": null}; and the
client whose message is refused learns why, under its own id.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

JSONRPC = "2.0"

# The JSON-RPC 2.0 codes.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Implementation-defined server errors (-32000 to -32099), as the MCP SDKs
# use them: the session is unknown, a request ran out of time.
SERVER_ERROR = -32000
SESSION_NOT_FOUND = -32001
REQUEST_TIMEOUT = -32001
# What the MCP Python SDK answers a cancelled request with on the 2025-era
# Streamable HTTP wire (LSP's RequestCancelled).
REQUEST_CANCELLED = -32800

Kind = Literal["request", "notification", "response", "invalid"]


def valid_id(value: Any) -> bool:
    """
    An id MCP allows: a string or an integer (not null, not a boolean, not a
    fraction).
    """
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def known_id(message: Any) -> str | int | None:
    """
    The id to answer C{message} with: its own when it has a valid one,
    otherwise null (JSON-RPC's answer to a message whose id cannot be told).
    """
    if isinstance(message, dict):
        value = message.get("id")
        if valid_id(value):
            return value
    return None


def error(id: str | int | None, code: int, message: str, data: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        body["data"] = data
    return {"jsonrpc": JSONRPC, "id": id, "error": body}


@attrs.frozen
class Classified:
    """
    What a message from a client is; for an invalid one, the error answer
    (under the message's id when it has a valid one).
    """

    kind: Kind
    problem: str = ""

    def refusal(self, message: Any) -> dict[str, Any]:
        return error(known_id(message), INVALID_REQUEST, f"Invalid Request: {self.problem}")


def _invalid(problem: str) -> Classified:
    return Classified("invalid", problem)


def classify(message: Any) -> Classified:
    """
    A request (method and id), a notification (method, no id), a response
    to one of the server's requests (id and exactly one of result or error),
    or invalid, with the reason.  The values inside have already passed
    L{fjmcp.safejson} (no NaN, valid Unicode, bounded nesting).
    """
    if not isinstance(message, dict):
        return _invalid("a message must be a JSON object")
    if message.get("jsonrpc") != JSONRPC:
        return _invalid('"jsonrpc" must be "2.0"')
    if "method" in message:
        method = message["method"]
        if not isinstance(method, str) or not method:
            return _invalid('"method" must be a non-empty string')
        if "params" in message and not isinstance(message["params"], dict | list):
            return _invalid('"params" must be an object or an array')
        if "result" in message or "error" in message:
            return _invalid("a request cannot carry a result or an error")
        if "id" not in message:
            return Classified("notification")
        if not valid_id(message["id"]):
            return _invalid('"id" must be a string or an integer')
        return Classified("request")
    if "id" not in message:
        return _invalid('a message needs a "method" or an "id"')
    if not valid_id(message["id"]):
        return _invalid('"id" must be a string or an integer')
    if ("result" in message) == ("error" in message):
        return _invalid('a response carries exactly one of "result" and "error"')
    if "error" in message:
        problem = _error_problem(message["error"])
        if problem:
            return _invalid(problem)
    return Classified("response")


def _error_problem(value: Any) -> str:
    if not isinstance(value, dict):
        return '"error" must be an object'
    code = value.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        return '"error.code" must be an integer'
    if not isinstance(value.get("message"), str):
        return '"error.message" must be a string'
    return ""
