"""
Client ID Metadata Documents (draft-ietf-oauth-client-id-metadata-document,
MCP authorization 2025-11-25): a client whose C{client_id} is an https URL
publishes its metadata as JSON at that URL, and the authorization server
fetches it.  This module owns that fetch and nothing else:

  - which client ids are metadata-document URLs (L{is_cimd_client_id});
  - the SSRF guard: the host name is resolved once, every address it
    resolves to must be public (L{blocked_address_reason}), and the
    connection then goes to a vetted address, never to the name again, so a
    DNS answer that changes between check and connect cannot steer the
    request; TLS still verifies the certificate against the host name;
  - the limits: one overall timeout, a size cap enforced while reading, no
    redirects, HTTP 200 and C{application/json} only;
  - the identity and secret checks a document must pass (L{check_document}):
    its C{client_id} is exactly its URL, it carries no client secret, it
    asks for no token endpoint authentication but C{none}, and it names
    redirect URIs;
  - a per-URL cache that honours C{Cache-Control} within bounds, briefly
    remembers failures, and lets concurrent fetches of one URL share one
    request.

Field-by-field validation of the metadata (redirect URI rules, names, logos)
belongs to L{fjmcp.oauth.registration}; every refusal here is a L{CIMDError}
whose message can be shown to the client as an C{invalid_client}
description.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IResponse
from zope.interface import implementer

from fjmcp import __version__, safejson

log = Logger()

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

MAX_CLIENT_ID_LENGTH = 2048
DEFAULT_FAILURE_TTL = 10.0
DEFAULT_MAX_ENTRIES = 1024

# Token endpoint authentication methods built on a secret shared with the
# authorization server; a document anyone can read must not use them.
SHARED_SECRET_METHODS = frozenset(
    {"client_secret_basic", "client_secret_post", "client_secret_jwt"}
)


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


def _show(value: object, limit: int = 80) -> str:
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


def _plain(text: str, limit: int = 160) -> str:
    """
    A message of our own making (which may quote a fragment of the input)
    as an C{error_description} may carry it: see L{_show}, without quotes.
    """
    safe = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)
    return safe if len(safe) <= limit else safe[: limit - 3] + "..."


# --- which client ids are metadata document URLs ---------------------------------

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
        raise CIMDError(f"the client_id {_show(client_id)} is not a well-formed URL")
    if "#" in client_id:
        raise CIMDError("a client ID metadata document URL must not have a fragment")
    parts = _SPLIT.match(client_id)
    if parts is None:
        raise CIMDError(f"the client_id {_show(client_id)} is not an absolute URL")
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
        raise CIMDError(f"the client_id host {_show(authority)} is not a host name")
    host = host_port["host"].lower()
    if bracketed:
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            raise CIMDError(f"the client_id host {_show(host)} is not an IPv6 address") from None
    else:
        labels = host.split(".")
        if len(host) > 253 or not all(_LABEL.match(label) for label in labels):
            raise CIMDError(f"the client_id host {_show(host)} is not a host name")
        if _NUMERIC_LABEL.match(labels[-1]):
            try:
                address = ipaddress.IPv4Address(host)
            except ValueError:
                raise CIMDError(
                    f"the client_id host {_show(host)} is neither a name nor an IPv4 address"
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


# --- which addresses may be fetched from ------------------------------------------


def _networks(*rows: tuple[str, str]) -> tuple[tuple[Any, str], ...]:
    return tuple((ipaddress.ip_network(net), reason) for net, reason in rows)


# First match wins, so specific blocks come before the ranges holding them.
_IPV4_BLOCKED = _networks(
    ("169.254.169.254/32", "the cloud metadata address"),
    ("0.0.0.0/32", "the unspecified address"),
    ("0.0.0.0/8", "a this-network address"),
    ("10.0.0.0/8", "a private address"),
    ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("172.16.0.0/12", "a private address"),
    ("192.0.0.0/24", "an IETF protocol assignment address"),
    ("192.0.2.0/24", "a documentation address"),
    ("192.88.99.0/24", "a 6to4 relay anycast address"),
    ("192.168.0.0/16", "a private address"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("198.51.100.0/24", "a documentation address"),
    ("203.0.113.0/24", "a documentation address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
)
_IPV6_BLOCKED = _networks(
    ("::/128", "the unspecified address"),
    ("::1/128", "the loopback address"),
    ("64:ff9b:1::/48", "a local-use NAT64 address"),
    ("100::/64", "a discard-only address"),
    ("2001::/23", "an IETF protocol assignment address"),
    ("2001:db8::/32", "a documentation address"),
    ("3fff::/20", "a documentation address"),
    ("5f00::/16", "a segment routing address"),
    ("fc00::/7", "a unique local address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address"),
    ("ff00::/8", "a multicast address"),
)
_IPV4_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
_IPV6_LOOPBACK = ipaddress.IPv6Address("::1")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


def _ipv4_reason(address: ipaddress.IPv4Address, allow_loopback: bool) -> str | None:
    if allow_loopback and address in _IPV4_LOOPBACK:
        return None
    for network, reason in _IPV4_BLOCKED:
        if address in network:
            return reason
    if not address.is_global:  # whatever the standard library knows and we forgot
        return "a non-public address"
    return None


def blocked_address_reason(address: str | IPAddress, *, allow_loopback: bool = False) -> str | None:
    """
    Why a metadata document must not be fetched from C{address} (a phrase
    like C{"a private address"}), or L{None} when it is a public unicast
    address.  Private, loopback, link-local, shared, multicast, reserved,
    documentation, unspecified and cloud metadata addresses are refused, in
    IPv6 too; an address embedding an IPv4 address (IPv4-mapped, NAT64,
    6to4) is judged by that IPv4 address; IPv6 outside 2000::/3 is
    reserved.  C{allow_loopback} (tests only) admits 127.0.0.0/8 and ::1,
    nothing else.
    """
    if isinstance(address, str):
        try:
            address = ipaddress.ip_address(address)
        except ValueError:
            return "not an IP address"
    if isinstance(address, ipaddress.IPv4Address):
        return _ipv4_reason(address, allow_loopback)
    if address.scope_id:
        return "a scoped address"
    embedded = address.ipv4_mapped or address.sixtofour
    if embedded is None and address in _NAT64:
        embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if embedded is not None:
        reason = _ipv4_reason(embedded, allow_loopback)
        return None if reason is None else f"{reason} embedded in IPv6"
    if allow_loopback and address == _IPV6_LOOPBACK:
        return None
    for network, reason in _IPV6_BLOCKED:
        if address in network:
            return reason
    if address not in _GLOBAL_UNICAST:
        return "a reserved address"
    return None


def _connect_address(address: IPAddress) -> IPAddress:
    """
    The address to dial: an IPv4-mapped IPv6 address is dialled as IPv4.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def system_resolver(reactor: Any) -> Resolver:
    """
    The default resolver: C{getaddrinfo} in the reactor's thread pool,
    returning every address for the name, in the system's order.
    """

    async def resolve(host: str, port: int) -> list[str]:
        infos = await deferToThreadPool(
            reactor,
            reactor.getThreadPool(),
            socket.getaddrinfo,
            host,
            port,
            0,
            socket.SOCK_STREAM,
            socket.IPPROTO_TCP,
        )
        return [str(info[4][0]) for info in infos]

    return resolve


# --- connecting to the vetted addresses only --------------------------------------


@implementer(IStreamClientEndpoint)
class _PinnedEndpoint:
    """
    Connect to the vetted addresses in turn (so a host whose IPv6 route is
    broken still works over IPv4), never to a name.
    """

    def __init__(self, reactor: Any, addresses: list[IPAddress], port: int, timeout: float) -> None:
        self._reactor = reactor
        self._addresses = addresses
        self._port = port
        self._timeout = max(1, int(timeout + 0.999))

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:  # noqa: N803
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        last: Exception = ConnectError("no address to connect to")
        for address in self._addresses:
            endpoint: IStreamClientEndpoint
            if address.version == 4:
                endpoint = TCP4ClientEndpoint(
                    self._reactor, str(address), self._port, timeout=self._timeout
                )
            else:
                endpoint = TCP6ClientEndpoint(
                    self._reactor, str(address), self._port, timeout=self._timeout
                )
            try:
                return await endpoint.connect(factory)
            except (ConnectError, ConnectTimeoutError) as e:
                last = e
        raise last


@implementer(IAgentEndpointFactory)
class _PinnedEndpointFactory:
    """
    The Agent's only way out: the one vetted URL, over the vetted addresses,
    with TLS checked against the URL's host name (SNI included).
    """

    def __init__(
        self,
        reactor: Any,
        target: Target,
        addresses: list[IPAddress],
        timeout: float,
        trust_root: Any,
    ) -> None:
        self._reactor = reactor
        self._target = target
        self._addresses = addresses
        self._timeout = timeout
        self._trust_root = trust_root

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        if uri.scheme.decode("ascii") != self._target.scheme or uri.port != self._target.port:
            raise CIMDError("the request left the metadata document URL")
        endpoint: IStreamClientEndpoint = _PinnedEndpoint(
            self._reactor, self._addresses, self._target.port, self._timeout
        )
        if self._target.scheme == "https":
            options = optionsForClientTLS(self._target.host, trustRoot=self._trust_root)
            endpoint = wrapClientTLS(options, endpoint)
        return endpoint


# --- reading a bounded body -------------------------------------------------------


class _BodyTooLargeError(Exception):
    pass


class _CappedBody(Protocol):
    """
    Collect a response body, giving up (and closing the connection) as soon
    as it grows past C{limit}, whatever the headers said.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.finished: Deferred[bytes] = Deferred(lambda _: self._stop())

    def _stop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._stop()
            self.finished.errback(_BodyTooLargeError())
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)


class _Discard(Protocol):
    """
    Read nothing of a body we will not use, and close the connection.
    """

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


# --- checking the document --------------------------------------------------------


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
        raise CIMDError(f"the document is not valid JSON: {_plain(str(e))}") from None
    try:
        # A second pass (documents are a few KiB) for what safejson does not
        # look at: a repeated member, of which it would silently keep the last.
        json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKeyError as e:
        raise CIMDError(f"the document repeats the member {_show(e.args[0])}") from None
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
            f"the document's client_id {_show(client_id)} is not its own URL "
            "(they must be exactly equal)"
        )
    for name in ("client_secret", "client_secret_expires_at"):
        if name in document:
            raise CIMDError(f"the document contains {name}: a public document cannot hold secrets")
    if "token_endpoint_auth_method" in document:
        method = document["token_endpoint_auth_method"]
        if method in SHARED_SECRET_METHODS:
            raise CIMDError(
                f"token_endpoint_auth_method {_show(method)} needs a shared secret, "
                "which a client ID metadata document cannot have; use none"
            )
        if method != "none":
            raise CIMDError(
                f"token_endpoint_auth_method {_show(method)} is not supported; "
                "only none is accepted for client ID metadata documents"
            )
    uris = document.get("redirect_uris")
    if not isinstance(uris, list) or not uris or not all(isinstance(u, str) for u in uris):
        raise CIMDError("the document's redirect_uris must be a non-empty list of strings")
    return document


def _media_type(headers: Headers) -> str | None:
    values = headers.getRawHeaders(b"content-type")
    if not values:
        return None
    return values[0].decode("latin-1").split(";", 1)[0].strip().lower()


_MAX_AGE = re.compile(r"[0-9]{1,12}\Z")


def cache_lifetime(headers: Headers, *, default: float, minimum: float, maximum: float) -> float:
    """
    How long to keep a document: its C{Cache-Control: max-age}, or
    C{default} without one, clamped to [C{minimum}, C{maximum}].
    C{no-store} and C{no-cache} give C{minimum}: we never revalidate, and
    fetching on every authorization request would let anyone use us to
    hammer a server.  C{Expires} is not consulted.
    """
    directives: dict[str, str] = {}
    for raw in headers.getRawHeaders(b"cache-control") or []:
        for part in raw.decode("latin-1").split(","):
            name, _, argument = part.partition("=")
            name = name.strip().lower()
            if name:
                directives.setdefault(name, argument.strip().strip('"'))
    if "no-store" in directives or "no-cache" in directives:
        return minimum
    lifetime = default
    max_age = directives.get("max-age")
    if max_age is not None and _MAX_AGE.match(max_age):
        lifetime = float(max_age)
    return min(max(lifetime, minimum), maximum)


def _describe_failure(error: BaseException, target: Target) -> str:
    """
    A transport failure as a sentence about the client's server.
    """
    reasons = getattr(error, "reasons", None) or []
    causes = [getattr(r, "value", r) for r in reasons] + [error]
    for cause in causes:
        module = type(cause).__module__
        if (
            module.startswith(("OpenSSL", "service_identity"))
            or "Verification" in type(cause).__name__
        ):
            return (
                f"the TLS connection to {target.host} failed "
                "(its certificate is not valid for that name, or not trusted)"
            )
    if isinstance(error, ConnectError | ConnectTimeoutError):
        return f"could not connect to {target.host} port {target.port}"
    return f"the connection to {target.host} failed before a complete response"


# --- the fetcher ------------------------------------------------------------------


@attrs.define
class _Entry:
    expires: float
    document: dict[str, Any] | None = None
    error: str | None = None


class ClientMetadataFetcher:
    """
    Fetch, check and cache client ID metadata documents.

    @param reactor: provides TCP, time and a thread pool; all sockets and
        the timeout use it.
    @param allow_loopback: tests only: admit loopback addresses (and plain
        http to them); every other non-public address stays refused.
    @param timeout: seconds for the whole fetch: resolution, connection,
        TLS, request and body.
    @param max_bytes: the largest body accepted.
    @param min_ttl, max_ttl, default_ttl: cache lifetime bounds and the
        lifetime without C{max-age} (see L{cache_lifetime}).
    @param resolver: C{(host, port) -> addresses}; L{system_resolver} by
        default.
    @param clock: the cache's clock (C{seconds()}); the reactor by default.
    @param failure_ttl: seconds a failure is remembered, so a client id
        that fails is not fetched again on every request (0: not at all).
    @param max_entries: how many URLs the cache holds; expired entries go
        first, then the oldest.
    @param tls_trust_root: tests only: the trust root for https (the
        platform's by default).
    """

    def __init__(
        self,
        reactor: Any,
        *,
        allow_loopback: bool = False,
        timeout: float = 5.0,
        max_bytes: int = 5 * 1024,
        min_ttl: float = 60,
        max_ttl: float = 24 * 3600,
        default_ttl: float = 3600,
        resolver: Resolver | None = None,
        clock: Any = None,
        failure_ttl: float = DEFAULT_FAILURE_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        tls_trust_root: Any = None,
    ) -> None:
        self._reactor = reactor
        self._allow_loopback = allow_loopback
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._default_ttl = default_ttl
        self._resolver = resolver if resolver is not None else system_resolver(reactor)
        self._clock = clock if clock is not None else reactor
        self._failure_ttl = failure_ttl
        self._max_entries = max_entries
        self._trust_root = tls_trust_root
        self._cache: dict[str, _Entry] = {}
        self._in_flight: dict[str, list[Deferred[dict[str, Any]]]] = {}

    def is_client_id(self, client_id: str) -> bool:
        """
        L{is_cimd_client_id} as this fetcher sees it (with C{allow_loopback},
        plain http URLs count too).
        """
        return is_cimd_client_id(client_id, allow_http=self._allow_loopback)

    async def fetch(self, url: str) -> dict[str, Any]:
        """
        The checked document at C{url} (a fresh copy the caller may change),
        from the cache while it is fresh.  Concurrent calls for one URL share
        one request.

        @raise CIMDError: why there is no usable document.
        """
        target = parse_client_id(url, allow_http=self._allow_loopback)
        now = self._clock.seconds()
        entry = self._cache.get(url)
        if entry is not None:
            if entry.expires > now:
                if entry.error is not None:
                    raise CIMDError(entry.error)
                assert entry.document is not None
                return copy.deepcopy(entry.document)
            del self._cache[url]
        waiter: Deferred[dict[str, Any]] = Deferred()
        waiters = self._in_flight.get(url)
        if waiters is None:
            self._in_flight[url] = [waiter]
            Deferred.fromCoroutine(self._fetch_for_all(target))
        else:
            waiters.append(waiter)
        return copy.deepcopy(await waiter)

    async def _fetch_for_all(self, target: Target) -> None:
        """
        Fetch once for everyone waiting on C{target}, and remember the
        outcome: a document for its lifetime, a failure for C{failure_ttl}.
        """
        url = target.url
        result: dict[str, Any] | Failure
        try:
            document, lifetime = await self._fetch_within_timeout(target)
        except CIMDError as e:
            message = f"client metadata document {url}: {e.message}"
            log.info("{message}", message=message)
            self._remember(url, _Entry(self._clock.seconds() + self._failure_ttl, error=message))
            result = Failure(CIMDError(message))
        except Exception:
            log.failure("client metadata document {url}: unexpected error", url=url)
            result = Failure(CIMDError(f"client metadata document {url}: could not fetch it"))
        else:
            self._remember(url, _Entry(self._clock.seconds() + lifetime, document=document))
            result = document
        for waiter in self._in_flight.pop(url):
            if not waiter.called:  # a caller may have given up
                if isinstance(result, Failure):
                    waiter.errback(result)
                else:
                    waiter.callback(result)

    def _remember(self, url: str, entry: _Entry) -> None:
        now = self._clock.seconds()
        if entry.expires <= now:
            return
        if len(self._cache) >= self._max_entries:
            for key in [k for k, e in self._cache.items() if e.expires <= now]:
                del self._cache[key]
            while len(self._cache) >= self._max_entries:
                del self._cache[next(iter(self._cache))]
        self._cache[url] = entry

    async def _fetch_within_timeout(self, target: Target) -> tuple[dict[str, Any], float]:
        """
        L{_fetch_uncached}, abandoned (connection closed, whatever stage it
        reached) once C{timeout} seconds have passed.
        """
        attempt = Deferred.fromCoroutine(self._fetch_uncached(target))
        timed_out = False

        def give_up() -> None:
            nonlocal timed_out
            timed_out = True
            attempt.cancel()

        timer = self._reactor.callLater(self._timeout, give_up)
        try:
            return await attempt
        except Exception:
            if timed_out:
                raise CIMDError(f"no complete answer within {self._timeout:g} seconds") from None
            raise
        finally:
            if timer.active():
                timer.cancel()

    async def _fetch_uncached(self, target: Target) -> tuple[dict[str, Any], float]:
        addresses = await self._vetted_addresses(target)
        if target.scheme == "http" and not all(a.is_loopback for a in addresses):
            raise CIMDError("plain http is only allowed to loopback; use https")
        agent = Agent.usingEndpointFactory(
            self._reactor,
            _PinnedEndpointFactory(
                self._reactor, target, addresses, self._timeout, self._trust_root
            ),
        )
        headers = Headers(
            {
                b"Accept": [b"application/json"],
                b"User-Agent": [f"fjmcp/{__version__} (client metadata)".encode()],
            }
        )
        try:
            response: IResponse = await agent.request(b"GET", target.url.encode("ascii"), headers)
        except (CIMDError, CancelledError):
            raise
        except Exception as e:
            raise CIMDError(_describe_failure(e, target)) from None

        if response.code != 200:
            response.deliverBody(_Discard())
            if 300 <= response.code < 400:
                raise CIMDError(
                    f"the server answered with a redirect (HTTP {response.code}); redirects "
                    "are not followed, so serve the document at its client_id URL"
                )
            raise CIMDError(f"the server answered HTTP {response.code}, not 200")
        media_type = _media_type(response.headers)
        if media_type != "application/json":
            response.deliverBody(_Discard())
            shown = "missing" if media_type is None else _show(media_type)
            raise CIMDError(f"the Content-Type is {shown}, not application/json")
        too_large = CIMDError(f"the document is larger than {self._max_bytes} bytes")
        if response.length is not UNKNOWN_LENGTH and response.length > self._max_bytes:
            response.deliverBody(_Discard())
            raise too_large
        reader = _CappedBody(self._max_bytes)
        response.deliverBody(reader)
        try:
            body = await reader.finished
        except _BodyTooLargeError:
            raise too_large from None
        except CancelledError:
            raise
        except Exception as e:
            raise CIMDError(_describe_failure(e, target)) from None

        document = check_document(target.url, parse_document(body))
        lifetime = cache_lifetime(
            response.headers,
            default=self._default_ttl,
            minimum=self._min_ttl,
            maximum=self._max_ttl,
        )
        return document, lifetime

    async def _vetted_addresses(self, target: Target) -> list[IPAddress]:
        """
        Every address the host resolves to, each checked; one bad address
        refuses the whole host (answers rotate; we will not pick the good
        one and hope).
        """
        if target.address is not None:
            answers: list[str] = [str(target.address)]
        else:
            try:
                answers = list(await self._resolver(target.host, target.port))
            except (CIMDError, CancelledError):
                raise
            except Exception:
                raise CIMDError(f"could not resolve the host name {target.host}") from None
        if not answers:
            raise CIMDError(f"the host name {target.host} has no addresses")
        vetted: list[IPAddress] = []
        for answer in answers:
            reason = blocked_address_reason(answer, allow_loopback=self._allow_loopback)
            if reason is not None:
                raise CIMDError(
                    f"{target.host} resolves to {_show(answer, 50)}, {reason}; "
                    "documents are only fetched from public addresses"
                )
            address = _connect_address(ipaddress.ip_address(answer))
            if address not in vetted:
                vetted.append(address)
        return vetted
