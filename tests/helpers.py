"""
Shared test plumbing: real loopback HTTP without leaving the reactor dirty.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from fjmcp.config import Config


def http_client() -> HTTPClient:
    """
    A treq client that closes every connection after its response, so a
    test ends with no sockets left open.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent(reactor, pool=pool))


def listen(test: TestCase, resource: Any = None, parse_forms: bool = True) -> tuple[Site, str]:
    """
    A site on a loopback port for the length of C{test}, and its base URL.
    Its C{resource} can be set later, once the URL is known.  The broker's
    own site is built with C{parse_forms=False}, as fjmcp.app.tap builds it.
    """
    site = Site(
        resource if resource is not None else Resource(), parsePOSTFormSubmission=parse_forms
    )
    site.timeOut = None
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type]
    test.addCleanup(port.stopListening)
    site.port = port  # for tests that take a server down
    address: Any = port.getHost()
    return site, f"http://127.0.0.1:{address.port}"


def serve(test: TestCase, resource: Any) -> str:
    """
    Serve C{resource} on a loopback port for the length of C{test}; returns
    its base URL.
    """
    return listen(test, resource)[1]


def sleep(seconds: float) -> Deferred[None]:
    """
    Fires after C{seconds} of the real reactor's time.
    """
    return deferLater(reactor, seconds, lambda: None)


def make_config(tmp: str, public_url: str = "https://mcp.example.org", **overrides: Any) -> Config:
    """
    A valid Config for tests that need one without going through argv.
    """
    data = Path(tmp).resolve()
    data.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = dict(
        listen=("tcp:0:interface=127.0.0.1",),
        public_url=public_url,
        forgejo_url="http://127.0.0.1:3000",
        forgejo_client_id="fjmcp",
        forgejo_client_secret="gto_test-client-secret",
        forgejo_scopes=("read:user", "read:repository"),
        forgejo_mcp="/bin/false",
        data_dir=data,
        secret_key=os.urandom(32),
        max_sessions=10,
        max_sessions_per_user=3,
        session_idle_timeout=1800.0,
        trusted_proxies=(),
        log_format="text",
        log_level=LogLevel.info,
    )
    values.update(overrides)
    return Config(**values)


def self_signed(name: str) -> tuple[bytes, bytes]:
    """
    A key and a self-signed certificate for C{name}, both PEM.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


class Answer:
    """
    The response stream of one request sent straight to a session's router.
    """

    def __init__(self) -> None:
        self.done: Deferred[dict[str, Any]] = Deferred()

    def message(self, message: dict[str, Any]) -> None:
        pass

    def finish(self, response: dict[str, Any]) -> None:
        self.done.callback(response)


class _RawExchange(Protocol):
    """
    Send bytes as they are (no client library would send these), collect
    the answer until the server closes.
    """

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._received: list[bytes] = []
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._data)

    def dataReceived(self, data: bytes) -> None:
        self._received.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.done.callback(b"".join(self._received))


async def raw_http(url: str, data: bytes) -> bytes:
    """
    Send C{data} as it is to the server at C{url} (http://127.0.0.1:PORT) and
    return everything it answers until it closes the connection.
    """
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    protocol = _RawExchange(data)
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), protocol)
    return await protocol.done


def routes_over(
    config: Config,
    clock: Any,
    store: Any = None,
    sessions: Any = (),
    clients: Any = None,
    flow: Any = None,
    tokens: Any = None,
    credentials: Any = None,
    mcp: Any = None,
    connections: Any = None,
    limiter: Any = None,
    signin: Any = None,
) -> Any:
    """
    The broker's HTTP tree over whatever a route test needs (fakes, or None
    for what its routes never reach), rate limits off unless C{limiter} is
    given.  Whole brokers come from the composition root instead
    (L{tests.broker_support.Broker}).
    """
    from fjmcp.http.browser import BrowserPages
    from fjmcp.http.common import RateGuard
    from fjmcp.http.gate import MCPGate
    from fjmcp.http.oauth_endpoints import OAuthEndpoints
    from fjmcp.http.ratelimit import DEFAULT_LIMITS, Limit, RateLimiter
    from fjmcp.http.routes import BrokerApp, Health

    if limiter is None:
        endless = Limit(per_minute=1e9, burst=10**9)
        limiter = RateLimiter(clock, {k: endless for k in DEFAULT_LIMITS})
    limits = RateGuard(limiter, config.trusted_proxies)
    return BrokerApp(
        Health(store, sessions, clock),
        MCPGate(config, tokens, credentials, mcp),
        OAuthEndpoints(config, clients, tokens, limits),
        BrowserPages(config, flow, connections, signin, limits),
    )


class NoSessions:
    """
    A session table with no sessions, for token tests without children.
    """

    def live_families(self) -> set[str]:
        return set()

    def end_matching(self, predicate: Any, why: str) -> int:
        return 0


def token_service(store: Any, config: Config, clock: Any) -> Any:
    """
    A token service over C{store} with its bearer cache kept as the broker
    keeps it: L{fjmcp.oauth.grants.GrantEnds} forgets what the store says
    was revoked (its periodic check is not started).
    """
    from fjmcp.oauth.grants import BearerCache, GrantEnds
    from fjmcp.oauth.tokens import TokenService

    bearers = BearerCache(clock)
    GrantEnds(store, NoSessions(), bearers, clock)  # type: ignore[arg-type]
    return TokenService(store, config, clock, bearers)


async def wait_until(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    """
    Poll C{predicate} until it is true; fail after C{timeout} seconds.  The
    one polling helper of the suite, only for conditions no event announces
    (a process gone, a descriptor closed, another process's effect).
    """
    import time

    from twisted.internet.task import deferLater

    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        await deferLater(reactor, 0.02, lambda: None)


def process_gone(pid: int) -> bool:
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False
