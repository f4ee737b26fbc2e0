"""
What a fetched client ID metadata document must be before it is used: UTF-8
JSON as the broker's strict decoder accepts it, with no repeated member
(L{parse_document}), and passing the identity and secret checks
(L{check_document}): its C{client_id} is exactly its URL, it carries no
client secret, it asks for no token endpoint authentication but C{none},
and it names redirect URIs.

Field-by-field validation of the metadata (redirect URI rules, names, logos)
belongs to L{fjmcp.oauth.registration}.
"""

from __future__ import annotations

import json
from typing import Any

from fjmcp import safejson
from fjmcp.oauth.cimd.errors import CIMDError, plain, show

# Token endpoint authentication methods built on a secret shared with the
# authorization server; a document anyone can read must not use them.
SHARED_SECRET_METHODS = frozenset(
    {"client_secret_basic", "client_secret_post", "client_secret_jwt"}
)


class _DuplicateKeyError(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKeyError(key)
        result[key] = value
    return result


def parse_document(body: bytes) -> Any:
    """
    Parse a document body: UTF-8 JSON (a leading byte order mark is
    tolerated) as L{fjmcp.safejson} accepts it (no C{NaN}, C{Infinity},
    lone surrogates or deep nesting), with no repeated member names
    (parsers disagree on which one wins).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise CIMDError("the document is not UTF-8 text") from None
    text = text.removeprefix("\ufeff")
    try:
        # The broker's strict decoder first: it refuses what Python's takes
        # but the store cannot write (lone surrogates) or nothing can walk
        # (deep nesting), so a document cannot turn into a 500 later.
        document = safejson.loads(text)
    except safejson.JSONInputError as e:
        raise CIMDError(f"the document is not valid JSON: {plain(str(e))}") from None
    try:
        # A second pass (documents are a few KiB) for what safejson does not
        # look at: a repeated member, of which it would silently keep the last.
        json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKeyError as e:
        raise CIMDError(f"the document repeats the member {show(e.args[0])}") from None
    return document


def check_document(url: str, document: Any) -> dict[str, Any]:
    """
    The identity and secret checks of a fetched document: a JSON object
    whose C{client_id} is exactly C{url}, without C{client_secret} or
    C{client_secret_expires_at}, whose C{token_endpoint_auth_method} is
    absent or C{none}, with a non-empty list of string C{redirect_uris}.
    The redirect URIs themselves are checked by the registration validator.
    """
    if not isinstance(document, dict):
        raise CIMDError("the document is not a JSON object")
    if "client_id" not in document:
        raise CIMDError("the document has no client_id")
    client_id = document["client_id"]
    if client_id != url:
        raise CIMDError(
            f"the document's client_id {show(client_id)} is not its own URL "
            "(they must be exactly equal)"
        )
    for name in ("client_secret", "client_secret_expires_at"):
        if name in document:
            raise CIMDError(f"the document contains {name}: a public document cannot hold secrets")
    if "token_endpoint_auth_method" in document:
        method = document["token_endpoint_auth_method"]
        if method in SHARED_SECRET_METHODS:
            raise CIMDError(
                f"token_endpoint_auth_method {show(method)} needs a shared secret, "
                "which a client ID metadata document cannot have; use none"
            )
        if method != "none":
            raise CIMDError(
                f"token_endpoint_auth_method {show(method)} is not supported; "
                "only none is accepted for client ID metadata documents"
            )
    uris = document.get("redirect_uris")
    if not isinstance(uris, list) or not uris or not all(isinstance(u, str) for u in uris):
        raise CIMDError("the document's redirect_uris must be a non-empty list of strings")
    return document
