"""
How a client ID metadata document travels: the connection goes to the
vetted addresses only, never to the name again, so a DNS answer that changes
between check and connect cannot steer the request, while TLS still checks
the certificate against the host name (L{PinnedEndpointFactory}); the body
is read up to a cap enforced while reading (L{CappedBody}); and a transport
failure is told as a sentence about the client's server
(L{describe_failure}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.error import ConnectError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import (
    IProtocol,
    IProtocolFactory,
    IReactorTCP,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory
from zope.interface import implementer

from fjmcp.oauth.cimd.addresses import IPAddress
from fjmcp.oauth.cimd.client_ids import Target
from fjmcp.oauth.cimd.errors import CIMDError

# --- connecting to the vetted addresses only --------------------------------------


@implementer(IStreamClientEndpoint)
class _PinnedEndpoint:
    """
    Connect to the vetted addresses in turn (so a host whose IPv6 route is
    broken still works over IPv4), never to a name.
    """

    def __init__(
        self, reactor: IReactorTCP, addresses: list[IPAddress], port: int, timeout: float
    ) -> None:
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
class PinnedEndpointFactory:
    """
    The Agent's only way out: the one vetted URL, over the vetted addresses,
    with TLS checked against the URL's host name (SNI included).
    """

    def __init__(
        self,
        reactor: IReactorTCP,
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


class BodyTooLargeError(Exception):
    pass


class CappedBody(Protocol):
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
            self.finished.errback(BodyTooLargeError())
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)


class Discard(Protocol):
    """
    Read nothing of a body we will not use, and close the connection.
    """

    def connectionMade(self) -> None:
        self.transport.stopProducing()  # type: ignore[union-attr]


def describe_failure(error: BaseException, target: Target) -> str:
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
