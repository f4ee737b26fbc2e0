"""
Which client ids are client ID metadata document URLs: the draft's rules
for a client identifier URL (https, a host, a path, no fragment, no user
info, no dot segments), checked more strictly than the URL grammar, and
where such a URL points (L{Target}).  Anything else is a registered
client's opaque id.
"""

from __future__ import annotations

import ipaddress
import re

import attrs

from fjmcp.oauth.cimd.addresses import IPAddress
from fjmcp.oauth.cimd.errors import CIMDError, show

MAX_CLIENT_ID_LENGTH = 2048


# The characters RFC 3986 allows in a URI; anything else (spaces, backslashes,
# non-ASCII) is refused rather than guessed at, since parsers disagree on it.
_URI_CHARACTERS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*\Z")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SPLIT = re.compile(r"(?P<scheme>[a-z]+)://(?P<authority>[^/?#]*)(?P<path>[^?#]*)(?:\?[^#]*)?\Z")
_BRACKETED = re.compile(r"\[(?P<host>[0-9A-Fa-f:.]+)\](?::(?P<port>[0-9]{1,5}))?\Z")
_NAMED = re.compile(r"(?P<host>[A-Za-z0-9.\-]+)(?::(?P<port>[0-9]{1,5}))?\Z")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\Z")
_NUMERIC_LABEL = re.compile(r"(?:[0-9]+|0[xX][0-9A-Fa-f]*)\Z")


@attrs.frozen
class Target:
    """
    Where a metadata document lives: C{host} as written in the URL (lower
    case, IPv6 without brackets), C{address} when the host is an IP literal.
    """

    url: str
    scheme: str
    host: str
    port: int
    address: IPAddress | None


def parse_client_id(client_id: str, *, allow_http: bool = False) -> Target:
    """
    Check C{client_id} against the draft's rules for a client identifier URL
    (https, a host, a path other than C{/}, no fragment, no user info, no
    dot segments) and return where it points.  Stricter than the URL
    grammar on purpose: only RFC 3986 characters, well-formed percent
    escapes, an explicit port only with digits, host names made of LDH
    labels and no trailing dot, and numeric-looking hosts only as a
    canonical dotted quad.  C{allow_http} admits C{http} too (tests serve
    documents over plain http on loopback; the fetcher still insists on a
    loopback address for those).

    @raise CIMDError: why C{client_id} is not a metadata document URL.
    """
    if not isinstance(client_id, str) or not client_id:
        raise CIMDError("the client_id is empty")
    if len(client_id) > MAX_CLIENT_ID_LENGTH:
        raise CIMDError(f"the client_id is longer than {MAX_CLIENT_ID_LENGTH} characters")
    if not _URI_CHARACTERS.match(client_id) or _BAD_PERCENT.search(client_id):
        raise CIMDError(f"the client_id {show(client_id)} is not a well-formed URL")
    if "#" in client_id:
        raise CIMDError("a client ID metadata document URL must not have a fragment")
    parts = _SPLIT.match(client_id)
    if parts is None:
        raise CIMDError(f"the client_id {show(client_id)} is not an absolute URL")
    scheme = parts["scheme"]
    if scheme != "https" and not (allow_http and scheme == "http"):
        raise CIMDError("a client ID metadata document URL must use https")
    authority = parts["authority"]
    if "@" in authority:
        raise CIMDError("a client ID metadata document URL must not contain user info")
    address: IPAddress | None = None
    bracketed = _BRACKETED.match(authority)
    named = None if bracketed else _NAMED.match(authority)
    host_port = bracketed or named
    if host_port is None:
        raise CIMDError(f"the client_id host {show(authority)} is not a host name")
    host = host_port["host"].lower()
    if bracketed:
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            raise CIMDError(f"the client_id host {show(host)} is not an IPv6 address") from None
    else:
        labels = host.split(".")
        if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
            raise CIMDError(f"the client_id host {show(host)} is not a host name")
        if _NUMERIC_LABEL.match(labels[-1]):
            try:
                address = ipaddress.IPv4Address(host)
            except ValueError:
                raise CIMDError(
                    f"the client_id host {show(host)} is neither a name nor an IPv4 address"
                ) from None
    port_text = host_port["port"]
    port = int(port_text) if port_text else (443 if scheme == "https" else 80)
    if not 0 < port < 65536:
        raise CIMDError(f"the client_id port {port} is out of range")
    path = parts["path"]
    if path in ("", "/"):
        raise CIMDError("a client ID metadata document URL must have a path")
    for segment in path.split("/"):
        if segment.lower().replace("%2e", ".") in (".", ".."):
            raise CIMDError("a client ID metadata document URL must not contain . or .. segments")
    return Target(client_id, scheme, host, port, address)


def is_cimd_client_id(client_id: str, *, allow_http: bool = False) -> bool:
    """
    Whether C{client_id} is a client ID metadata document URL (see
    L{parse_client_id}); anything else is a registered client's opaque id.
    """
    try:
        parse_client_id(client_id, allow_http=allow_http)
    except CIMDError:
        return False
    return True
