"""
Fetching client ID metadata documents: L{ClientMetadataFetcher} vets the
addresses of a client id's host, fetches the document from them within one
overall timeout (no redirects, HTTP 200 and C{application/json} only, a
size cap), checks it, and keeps it in a per-URL cache that honours
C{Cache-Control} within bounds (L{cache_lifetime}), briefly remembers
failures, and lets concurrent fetches of one URL share one request.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse

from fjmcp import __version__
from fjmcp.oauth.cimd.addresses import (
    IPAddress,
    Resolver,
    blocked_address_reason,
    connect_address,
    system_resolver,
)
from fjmcp.oauth.cimd.client_ids import Target, is_cimd_client_id, parse_client_id
from fjmcp.oauth.cimd.documents import check_document, parse_document
from fjmcp.oauth.cimd.errors import CIMDError, show
from fjmcp.oauth.cimd.transport import (
    BodyTooLargeError,
    CappedBody,
    Discard,
    PinnedEndpointFactory,
    describe_failure,
)

log = Logger()

DEFAULT_FAILURE_TTL = 10.0
DEFAULT_MAX_ENTRIES = 1024


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


@attrs.define
class _Entry:
    expires: float
    document: dict[str, Any] | None = None
    error: str | None = None


class ClientMetadataFetcher:
    """
    Fetch, check and cache client ID metadata documents.

    @param reactor: all sockets (L{IReactorTCP}), the timeout
        (L{IReactorTime}) and, without a C{resolver}, the thread pool
        L{system_resolver} uses: one reactor, adapted to the interfaces
        beyond TCP (adapting a reactor that provides one returns itself).
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
        reactor: IReactorTCP,
        *,
        allow_loopback: bool = False,
        timeout: float = 5.0,
        max_bytes: int = 5 * 1024,
        min_ttl: float = 60,
        max_ttl: float = 24 * 3600,
        default_ttl: float = 3600,
        resolver: Resolver | None = None,
        clock: IReactorTime | None = None,
        failure_ttl: float = DEFAULT_FAILURE_TTL,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        tls_trust_root: Any = None,
    ) -> None:
        self._reactor = reactor
        self._timers = IReactorTime(reactor)
        self._allow_loopback = allow_loopback
        self._timeout = timeout
        self._max_bytes = max_bytes
        self._min_ttl = min_ttl
        self._max_ttl = max_ttl
        self._default_ttl = default_ttl
        self._resolver = resolver if resolver is not None else system_resolver(reactor)
        self._clock = clock if clock is not None else self._timers
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

        timer = self._timers.callLater(self._timeout, give_up)
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
            PinnedEndpointFactory(
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
            raise CIMDError(describe_failure(e, target)) from None

        if response.code != 200:
            response.deliverBody(Discard())
            if 300 <= response.code < 400:
                raise CIMDError(
                    f"the server answered with a redirect (HTTP {response.code}); redirects "
                    "are not followed, so serve the document at its client_id URL"
                )
            raise CIMDError(f"the server answered HTTP {response.code}, not 200")
        media_type = _media_type(response.headers)
        if media_type != "application/json":
            response.deliverBody(Discard())
            shown = "missing" if media_type is None else show(media_type)
            raise CIMDError(f"the Content-Type is {shown}, not application/json")
        too_large = CIMDError(f"the document is larger than {self._max_bytes} bytes")
        if response.length is not UNKNOWN_LENGTH and response.length > self._max_bytes:
            response.deliverBody(Discard())
            raise too_large
        reader = CappedBody(self._max_bytes)
        response.deliverBody(reader)
        try:
            body = await reader.finished
        except BodyTooLargeError:
            raise too_large from None
        except CancelledError:
            raise
        except Exception as e:
            raise CIMDError(describe_failure(e, target)) from None

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
                    f"{target.host} resolves to {show(answer, 50)}, {reason}; "
                    "documents are only fetched from public addresses"
                )
            address = connect_address(ipaddress.ip_address(answer))
            if address not in vetted:
                vetted.append(address)
        return vetted
