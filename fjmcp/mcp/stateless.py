"""
The MCP 2026-07-28 revision ("stateless") on top of handshake-era children:
which requests are of that revision, the checks of their envelope against
their headers, what goes to the child instead, and how the child's answers
are stamped for a client of that revision.

No sessions and no C{initialize}: every request carries, in
C{params._meta}, the protocol version and the client's capabilities, and
repeats the version, its method and (for C{tools/call}, C{prompts/get},
C{resources/read}) its target in the C{MCP-Protocol-Version},
C{Mcp-Method} and C{Mcp-Name} headers.  The broker initializes the child
itself (L{fjmcp.mcp.warm}) and answers C{server/discover} from the child's
C{initialize} result; everything else goes to the child with the envelope
taken off, and comes back with C{resultType} (and, for lists and reads,
C{ttlMs} and C{cacheScope}) and the server's identity added.

C{subscriptions/listen} streams the child's list changes (those its
capabilities announce) to the grant's listeners.  Not served (yet):
server-to-client requests (the revision's C{input_required} results) and
resource subscriptions; discover says so (no C{subscribe}), and a child's
request to the client is refused to the child.
"""

from __future__ import annotations

import base64
import binascii
import copy
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from fjmcp.mcp.jsonrpc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    classify,
    known_id,
)
from fjmcp.mcp.jsonrpc import error as rpc_error

STATELESS_VERSIONS = ("2026-07-28",)
# The versions of the handshake era, each chosen by initialize.
HANDSHAKE_VERSIONS = ("2025-03-26", "2025-06-18", "2025-11-25")

META_PREFIX = "io.modelcontextprotocol/"
META_VERSION = META_PREFIX + "protocolVersion"
META_CAPABILITIES = META_PREFIX + "clientCapabilities"
META_SERVER_INFO = META_PREFIX + "serverInfo"
SUBSCRIPTION_ID = META_PREFIX + "subscriptionId"
LISTEN = "subscriptions/listen"
# What a listen request may ask for: the capability that announces it, and
# the child's notification that delivers it.
LIST_CHANGES = {
    "toolsListChanged": ("tools", "notifications/tools/list_changed"),
    "promptsListChanged": ("prompts", "notifications/prompts/list_changed"),
    "resourcesListChanged": ("resources", "notifications/resources/list_changed"),
}

HEADER_MISMATCH = -32020
MISSING_CAPABILITY = -32021
UNSUPPORTED_VERSION = -32022
# A handshake-era server's "resource not found"; the revision uses
# invalid params with the resource's URI instead.
RESOURCE_NOT_FOUND = -32002

# Which header names the request's target, and where the body has it.
NAME_PARAMS = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
# The requests a child answers for a stateless client.
FORWARDED = frozenset(
    {
        "tools/list",
        "tools/call",
        "prompts/list",
        "prompts/get",
        "resources/list",
        "resources/templates/list",
        "resources/read",
        "completion/complete",
    }
)
# Results a client may cache: they carry ttlMs and cacheScope.
CACHEABLE = frozenset(
    {
        "server/discover",
        "tools/list",
        "prompts/list",
        "resources/list",
        "resources/templates/list",
        "resources/read",
    }
)
# Children are per user: nothing they answer may be shared across users,
# and a child's lists can change (a tool set per Forgejo version), so a
# client asks again rather than trusting an old answer.
CACHE_HINTS = {"ttlMs": 0, "cacheScope": "private"}

# The handshake the broker makes with a child that serves stateless
# clients: no client capabilities, so the child never asks the client for
# anything (sampling, elicitation, roots) the broker could not relay.
CHILD_VERSION = "2025-06-18"


def child_initialize(broker_version: str) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": 0,
        "method": "initialize",
        "params": {
            "protocolVersion": CHILD_VERSION,
            "capabilities": {},
            "clientInfo": {"name": "fjmcp (MCP 2026-07-28 clients)", "version": broker_version},
        },
    }


def is_stateless(version_header: str | None, message: Any) -> bool:
    """
    Whether a POST is of the stateless revision: its C{MCP-Protocol-Version}
    is none of the handshake era's (a version the broker does not know is
    answered as the stateless revision answers it, naming the versions it
    serves), or it has no such header but the revision's envelope (which
    then fails the header check).
    """
    if version_header is not None:
        return version_header not in HANDSHAKE_VERSIONS
    if not isinstance(message, dict):
        return False
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return isinstance(meta, dict) and META_VERSION in meta


@attrs.frozen
class Refusal:
    """
    A request the broker answers itself with an error: the HTTP status and
    the JSON-RPC error response (under the request's id when it has one).
    """

    status: int
    response: dict[str, Any]


def _refuse(status: int, message: Any, code: int, text: str, data: Any = None) -> Refusal:
    return Refusal(status, rpc_error(known_id(message), code, text, data))


def decode_header_value(value: str) -> str | None:
    """
    A header value as the client meant it: the revision sends values that
    are not plain ASCII (or that have surrounding spaces) as
    C{=?base64?<UTF-8 in base64>?=}.  None: a sentinel that does not decode.
    """
    if value.startswith("=?base64?") and value.endswith("?=") and len(value) >= 11:
        try:
            return base64.b64decode(value[9:-2], validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
    return value


def check(message: Any, headers: Mapping[str, Sequence[str]]) -> Refusal | None:
    """
    What the broker answers instead of the child, in the revision's order:
    a message that is no request or notification (-32600); an envelope
    without the version or the client's capabilities (-32602); headers that
    are missing, repeated or disagree with the body (-32020); a version the
    broker does not serve (-32022, naming those it does); a method the
    revision removed, or one no child serves (-32601).  None: the request
    may go on.

    @param headers: the request's header values by lower-case name.
    """
    what = classify(message)
    if what.kind == "invalid":
        return Refusal(400, what.refusal(message))
    if what.kind == "response":
        return _refuse(
            400,
            message,
            INVALID_REQUEST,
            "Invalid Request: a 2026-07-28 client answers no server requests",
        )
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    if not isinstance(meta, dict):
        return _refuse(400, message, INVALID_PARAMS, "Invalid params: params._meta is required")
    version = meta.get(META_VERSION)
    if not isinstance(version, str):
        return _refuse(
            400, message, INVALID_PARAMS, f"Invalid params: _meta[{META_VERSION!r}] is required"
        )
    if not isinstance(meta.get(META_CAPABILITIES), dict):
        return _refuse(
            400,
            message,
            INVALID_PARAMS,
            f"Invalid params: _meta[{META_CAPABILITIES!r}] must be an object",
        )
    method = message["method"]
    expected = {"mcp-protocol-version": version, "mcp-method": method}
    if method in NAME_PARAMS:
        target = params.get(NAME_PARAMS[method])
        if not isinstance(target, str):
            return _refuse(
                400, message, INVALID_PARAMS, f"Invalid params: {NAME_PARAMS[method]} is required"
            )
        expected["mcp-name"] = target
    for name, value in expected.items():
        values = headers.get(name, ())
        if len(values) != 1:
            return _refuse(
                400,
                message,
                HEADER_MISMATCH,
                f"the {name} header is {'missing' if not values else 'repeated'}",
            )
        if decode_header_value(values[0]) != value:
            return _refuse(
                400,
                message,
                HEADER_MISMATCH,
                f"the {name} header does not match the request body",
            )
    if version not in STATELESS_VERSIONS:
        return _refuse(
            400,
            message,
            UNSUPPORTED_VERSION,
            "Unsupported protocol version",
            {"supported": list(STATELESS_VERSIONS), "requested": version},
        )
    if what.kind == "request" and method not in FORWARDED | {"server/discover", LISTEN}:
        return _refuse(404, message, METHOD_NOT_FOUND, "Method not found", method)
    return None


def to_child(message: dict[str, Any]) -> dict[str, Any]:
    """
    The request as a handshake-era child reads it: the envelope's keys taken
    out of C{params._meta} (a progress token stays).
    """
    out = dict(message)
    params = dict(out["params"])
    meta = {k: v for k, v in params["_meta"].items() if not k.startswith(META_PREFIX)}
    if meta:
        params["_meta"] = meta
    else:
        del params["_meta"]
    out["params"] = params
    return out


def stamp(method: str, request: dict[str, Any], response: dict[str, Any], server_info: Any) -> None:
    """
    Make a child's answer (changed in place) one of the revision: a result
    gets C{resultType}, the cache hints of the lists and reads, and the
    server's identity in C{_meta}; a resource the child did not find (or
    could not read for its parameters) is invalid params naming its URI.
    """
    result = response.get("result")
    if isinstance(result, dict):
        result.setdefault("resultType", "complete")
        # A question is never cached.
        if method in CACHEABLE and result["resultType"] != "input_required":
            for key, value in CACHE_HINTS.items():
                result.setdefault(key, value)
        if server_info is not None:
            meta = result.get("_meta")
            meta = dict(meta) if isinstance(meta, dict) else {}
            meta.setdefault(META_SERVER_INFO, server_info)
            result["_meta"] = meta
        return
    error = response.get("error")
    if (
        method == "resources/read"
        and isinstance(error, dict)
        and error.get("code") in (RESOURCE_NOT_FOUND, INVALID_PARAMS)
    ):
        # The revision's "resource not found": invalid params naming the
        # URI (handshake-era servers use -32002, or -32602 without it).
        data = error.get("data")
        data = dict(data) if isinstance(data, dict) else {}
        data.setdefault("uri", request.get("params", {}).get("uri"))
        response["error"] = {
            "code": INVALID_PARAMS,
            "message": error.get("message") or "Resource not found",
            "data": data,
        }


def http_status(response: dict[str, Any]) -> int:
    """
    The HTTP status of an answer: the revision gives errors about the
    request itself a 4xx.
    """
    error = response.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    if code == METHOD_NOT_FOUND:
        return 404
    if code in (
        PARSE_ERROR,
        INVALID_REQUEST,
        INVALID_PARAMS,
        HEADER_MISMATCH,
        MISSING_CAPABILITY,
        UNSUPPORTED_VERSION,
    ):
        return 400
    return 200


def discover_result(initialize_result: Mapping[str, Any]) -> dict[str, Any]:
    """
    C{server/discover}'s result, from what the child said to the broker's
    C{initialize}: its capabilities (without what the broker does not relay:
    resource subscriptions, log levels), instructions and identity.
    """
    capabilities = copy.deepcopy(initialize_result.get("capabilities"))
    if not isinstance(capabilities, dict):
        capabilities = {}
    capabilities.pop("logging", None)
    for kind in ("tools", "prompts", "resources"):
        entry = capabilities.get(kind)
        if isinstance(entry, dict):
            # List changes go to subscriptions/listen; resource
            # subscriptions are not relayed.
            entry.pop("subscribe", None)
    result: dict[str, Any] = {
        "resultType": "complete",
        "supportedVersions": list(STATELESS_VERSIONS),
        "capabilities": capabilities,
        **CACHE_HINTS,
    }
    instructions = initialize_result.get("instructions")
    if isinstance(instructions, str):
        result["instructions"] = instructions
    server_info = initialize_result.get("serverInfo")
    if server_info is not None:
        result["_meta"] = {META_SERVER_INFO: server_info}
    return result


def honoured(asked: Any, child_capabilities: Any) -> dict[str, bool]:
    """
    The part of a listen request's filter (its C{params.notifications})
    that the broker delivers: the list changes the child announces.
    """
    out: dict[str, bool] = {}
    if not isinstance(asked, dict) or not isinstance(child_capabilities, dict):
        return out
    for flag, (kind, _) in LIST_CHANGES.items():
        capability = child_capabilities.get(kind)
        if (
            asked.get(flag) is True
            and isinstance(capability, dict)
            and capability.get("listChanged") is True
        ):
            out[flag] = True
    return out


def acknowledgement(subscription_id: Any, delivered: Mapping[str, bool]) -> dict[str, Any]:
    """
    The first message of a listen stream: what it will carry.
    """
    return {
        "jsonrpc": "2.0",
        "method": "notifications/subscriptions/acknowledged",
        "params": {"_meta": {SUBSCRIPTION_ID: subscription_id}, "notifications": dict(delivered)},
    }


def for_listener(
    message: Mapping[str, Any], subscription_id: Any, delivered: Mapping[str, bool]
) -> dict[str, Any] | None:
    """
    A child's notification as a listen stream with that filter carries it
    (tagged with the subscription), or None when the stream does not.
    """
    wanted = {LIST_CHANGES[flag][1] for flag in delivered if delivered[flag]}
    if message.get("method") not in wanted:
        return None
    params = message.get("params")
    params = dict(params) if isinstance(params, dict) else {}
    meta = params.get("_meta")
    meta = dict(meta) if isinstance(meta, dict) else {}
    meta[SUBSCRIPTION_ID] = subscription_id
    params["_meta"] = meta
    return {"jsonrpc": "2.0", "method": message["method"], "params": params}


def refusal_to_child(server_request: Mapping[str, Any]) -> dict[str, Any]:
    """
    The broker's answer to a child's request to a stateless client (which
    it does not relay), so the child's work goes on instead of waiting.
    """
    return rpc_error(
        server_request.get("id"),
        METHOD_NOT_FOUND,
        f"the client (MCP 2026-07-28, through fjmcp) cannot be asked for "
        f"{server_request.get('method')!r}",
    )
