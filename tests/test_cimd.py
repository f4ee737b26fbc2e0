"""
Tests for L{fjmcp.oauth.cimd}: client ID metadata documents fetched from real
loopback servers, the SSRF guard driven by injected resolvers over a memory
reactor (so a broken guard still cannot send a packet anywhere), and
property tests of the URL and address rules.

No test connects to anything but 127.0.0.0/8: resolvers that answer with
public addresses are only ever used where the fetch must be refused before
connecting, and over L{MemoryReactorClock}, which connects nowhere.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from hypothesis import assume, given
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from fjmcp.oauth.cimd import (
    CIMDError,
    ClientMetadataFetcher,
    blocked_address_reason,
    cache_lifetime,
    check_document,
    is_cimd_client_id,
    parse_client_id,
    parse_document,
    system_resolver,
)
from tests.helpers import self_signed, serve

REDIRECT = "http://127.0.0.1/callback"


def valid_document(url: str, **extra: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "client_id": url,
        "client_name": "Test Client",
        "redirect_uris": [REDIRECT],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
        "token_endpoint_auth_method": "none",
    }
    document.update(extra)
    return document


class DocumentResource(Resource):
    """
    Serves one configurable answer at any path and counts requests.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.code = 200
        self.content_type: bytes | None = b"application/json"
        self.body = b""
        self.headers: dict[bytes, bytes] = {}
        self.hits = 0
        self.host_headers: list[bytes | None] = []
        self.hold: Deferred[None] | None = None
        self.arrived: Deferred[None] = Deferred()

    def set_document(self, document: Any) -> None:
        self.body = json.dumps(document).encode("utf-8")

    def render_GET(self, request: Request) -> Any:
        self.hits += 1
        self.host_headers.append(request.getHeader(b"host"))
        request.setResponseCode(self.code)
        if self.content_type is not None:
            request.setHeader(b"content-type", self.content_type)
        for name, value in self.headers.items():
            request.setHeader(name, value)
        if not self.arrived.called:
            self.arrived.callback(None)
        if self.hold is not None:
            hold = self.hold

            def release(_: object) -> None:
                request.write(self.body)
                request.finish()

            hold.addCallback(release)
            return NOT_DONE_YET
        return self.body


def serve_document(test: TestCase, document: Any = None) -> tuple[DocumentResource, str]:
    """
    A L{DocumentResource} on loopback and the URL of its document (by
    default a valid one naming that URL).
    """
    resource = DocumentResource()
    url = serve(test, resource) + "/client.json"
    resource.set_document(valid_document(url) if document is None else document)
    return resource, url


class RawServer(Protocol):
    """
    Answers a request with the factory's fixed bytes, then closes: for
    responses twisted.web would not produce (say, neither Content-Length
    nor chunking).
    """

    def __init__(self, source: RawFactory) -> None:
        self.source = source
        self.answered = False

    def dataReceived(self, data: bytes) -> None:
        if not self.answered:
            self.answered = True
            self.transport.write(self.source.payload)  # type: ignore[union-attr]
            self.transport.loseConnection()  # type: ignore[union-attr]


class RawFactory(ServerFactory):
    payload = b""

    def buildProtocol(self, addr: Any) -> RawServer:
        return RawServer(self)


def serve_raw(test: TestCase, payload: bytes = b"") -> tuple[RawFactory, str]:
    factory = RawFactory()
    factory.payload = payload
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    test.addCleanup(port.stopListening)
    return factory, f"http://127.0.0.1:{port.getHost().port}"


def raw_response(body: bytes, *headers: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def assert_readable(test: SynchronousTestCase, message: str) -> None:
    """
    An error description as RFC 6749 allows it: printable ASCII without
    double quotes or backslashes, one line, no traceback.
    """
    for character in message:
        test.assertTrue(" " <= character <= "~", repr(message))
    test.assertNotIn('"', message)
    test.assertNotIn("\\", message)
    test.assertNotIn("Traceback", message)


class FetchingTestCase(TestCase):
    def fetcher(self, **options: Any) -> ClientMetadataFetcher:
        options.setdefault("allow_loopback", True)
        options.setdefault("timeout", 5.0)
        options.setdefault("resolver", self.no_dns)
        return ClientMetadataFetcher(reactor, **options)

    async def no_dns(self, host: str, port: int) -> list[str]:
        """
        The tests' default resolver: the system's would send DNS queries.
        """
        raise AssertionError(f"unexpected name resolution of {host}")

    async def assertRefused(
        self, fetcher: ClientMetadataFetcher, url: str, *fragments: str
    ) -> CIMDError:
        try:
            await fetcher.fetch(url)
        except CIMDError as e:
            assert_readable(self, e.message)
            for fragment in fragments:
                self.assertIn(fragment, e.message)
            return e
        self.fail(f"{url} was accepted")


class FetchTests(FetchingTestCase):
    """
    Fetching over real loopback HTTP.
    """

    async def test_valid_document(self) -> None:
        resource, url = serve_document(self)
        document = await self.fetcher().fetch(url)
        self.assertEqual(document, valid_document(url))
        self.assertEqual(resource.hits, 1)

    async def test_close_delimited_body(self) -> None:
        """
        A body ended by closing the connection (no length, no chunks) is
        accepted when complete and small.
        """
        factory, base = serve_raw(self)
        url = base + "/client.json"
        body = json.dumps(valid_document(url)).encode()
        factory.payload = raw_response(body, b"Content-Type: application/json")
        document = await self.fetcher().fetch(url)
        self.assertEqual(document["client_id"], url)

    async def test_content_type_parameters(self) -> None:
        resource, url = serve_document(self)
        resource.content_type = b"Application/JSON; charset=utf-8"
        document = await self.fetcher().fetch(url)
        self.assertEqual(document["client_id"], url)

    async def test_client_id_mismatch(self) -> None:
        resource, url = serve_document(self)
        resource.set_document(valid_document(url + "/other"))
        await self.assertRefused(self.fetcher(), url, "client_id", "not its own URL")

    async def test_client_id_missing(self) -> None:
        resource, url = serve_document(self)
        document = valid_document(url)
        del document["client_id"]
        resource.set_document(document)
        await self.assertRefused(self.fetcher(), url, "no client_id")

    async def test_not_json(self) -> None:
        resource, url = serve_document(self)
        resource.body = b"<html>hello</html>"
        await self.assertRefused(self.fetcher(), url, "not valid JSON")

    async def test_not_an_object(self) -> None:
        resource, url = serve_document(self)
        resource.set_document([valid_document(url)])
        await self.assertRefused(self.fetcher(), url, "not a JSON object")

    async def test_oversized_with_content_length(self) -> None:
        resource, url = serve_document(self)
        resource.set_document(valid_document(url, client_name="x" * 6000))
        await self.assertRefused(self.fetcher(), url, "larger than 5120 bytes")

    async def test_oversized_chunked(self) -> None:
        """
        Without a Content-Length (chunked), the cap is enforced while
        reading: the fetch fails fast, long before the body ends.
        """

        class Endless(Resource):
            isLeaf = True

            def render_GET(self, request: Request) -> Any:
                request.setHeader(b"content-type", b"application/json")
                request.write(b'{"client_name": "')
                for _ in range(64):
                    request.write(b"x" * 1024)
                return NOT_DONE_YET  # never finished: only the cap can end this

        url = serve(self, Endless()) + "/client.json"
        started = reactor.seconds()
        await self.assertRefused(self.fetcher(timeout=10), url, "larger than 5120 bytes")
        self.assertLess(reactor.seconds() - started, 5)

    async def test_oversized_close_delimited(self) -> None:
        _, base = serve_raw(
            self, raw_response(b" " * 20000 + b"{}", b"Content-Type: application/json")
        )
        await self.assertRefused(self.fetcher(), base + "/client.json", "larger than")

    async def test_small_content_length_larger_body(self) -> None:
        """
        A Content-Length smaller than what is sent frames the body: the
        rest is never read as document.
        """
        _, base = serve_raw(
            self,
            raw_response(
                b"{}" + b" " * 20000, b"Content-Type: application/json", b"Content-Length: 2"
            ),
        )
        await self.assertRefused(self.fetcher(), base + "/client.json", "no client_id")

    async def test_http_errors(self) -> None:
        for code in (404, 500):
            resource, url = serve_document(self)
            resource.code = code
            await self.assertRefused(self.fetcher(), url, f"HTTP {code}")

    async def test_redirect_not_followed(self) -> None:
        target, target_url = serve_document(self)
        resource, url = serve_document(self)
        resource.code = 302
        resource.headers[b"location"] = target_url.encode()
        await self.assertRefused(self.fetcher(), url, "redirect", "302")
        self.assertEqual(target.hits, 0)

    async def test_wrong_content_type(self) -> None:
        resource, url = serve_document(self)
        resource.content_type = b"text/html"
        await self.assertRefused(self.fetcher(), url, "'text/html'", "application/json")

    async def test_missing_content_type(self) -> None:
        # twisted.web adds text/html when none is set; a raw server sends none
        _, base = serve_raw(self, raw_response(b"{}", b"Content-Length: 2"))
        await self.assertRefused(self.fetcher(), base + "/c.json", "Content-Type is missing")

    async def test_client_secret(self) -> None:
        for name in ("client_secret", "client_secret_expires_at"):
            resource, url = serve_document(self)
            resource.set_document(valid_document(url, **{name: "s3cret"}))
            error = await self.assertRefused(self.fetcher(), url, name, "secret")
            self.assertNotIn("s3cret", error.message)

    async def test_shared_secret_auth_method(self) -> None:
        for method in ("client_secret_basic", "client_secret_post", "client_secret_jwt"):
            resource, url = serve_document(self)
            resource.set_document(valid_document(url, token_endpoint_auth_method=method))
            await self.assertRefused(self.fetcher(), url, method, "shared secret")

    async def test_other_auth_method(self) -> None:
        resource, url = serve_document(self)
        resource.set_document(valid_document(url, token_endpoint_auth_method="private_key_jwt"))
        await self.assertRefused(self.fetcher(), url, "private_key_jwt", "only none")

    async def test_absent_auth_method(self) -> None:
        resource, url = serve_document(self)
        document = valid_document(url)
        del document["token_endpoint_auth_method"]
        resource.set_document(document)
        self.assertEqual(await self.fetcher().fetch(url), document)

    async def test_redirect_uris_required(self) -> None:
        for uris in (None, [], "http://127.0.0.1/cb", [1]):
            resource, url = serve_document(self)
            document = valid_document(url, redirect_uris=uris)
            if uris is None:
                del document["redirect_uris"]
            resource.set_document(document)
            await self.assertRefused(self.fetcher(), url, "redirect_uris")

    async def test_slow_server_times_out(self) -> None:
        resource, url = serve_document(self)
        resource.hold = Deferred()  # never released
        started = reactor.seconds()
        await self.assertRefused(self.fetcher(timeout=0.3), url, "within 0.3 seconds")
        self.assertLess(reactor.seconds() - started, 3)
        self.assertEqual(resource.hits, 1)

    async def test_connection_refused(self) -> None:
        # a port that was listening a moment ago and is now closed
        listening = reactor.listenTCP(0, ServerFactory(), interface="127.0.0.1")
        closed = listening.getHost().port
        await maybeDeferred(listening.stopListening)
        await self.assertRefused(
            self.fetcher(), f"http://127.0.0.1:{closed}/client.json", "could not connect"
        )

    async def test_invalid_url(self) -> None:
        for url in (
            "https://example.com/",
            "https://example.com/a#b",
            "https://user@example.com/a",
            "https://example.com/a/../b",
            'https://example.com/"\\',
        ):
            await self.assertRefused(self.fetcher(), url)

    async def test_loopback_refused_without_allow_loopback(self) -> None:
        resource, url = serve_document(self)
        fetcher = self.fetcher(allow_loopback=False)
        # plain http is refused outright ...
        await self.assertRefused(fetcher, url, "https")
        # ... and https to a loopback address before any connection
        port = url.split(":")[2].split("/")[0]
        for host in ("127.0.0.1", "[::1]", "[::ffff:127.0.0.1]"):
            await self.assertRefused(
                fetcher, f"https://{host}:{port}/client.json", "loopback", "public addresses"
            )
        self.assertEqual(resource.hits, 0)

    async def test_connects_to_vetted_address(self) -> None:
        """
        DNS rebinding cannot redirect the request: the name is resolved
        once, by the injected resolver, and the connection goes to that
        address.  C{client.test} resolves nowhere else, so the answer
        proves it; the Host header still names the host.
        """
        resource, served = serve_document(self)
        port = int(served.split(":")[2].split("/")[0])
        url = f"http://client.test:{port}/client.json"
        resource.set_document(valid_document(url))
        asked: list[tuple[str, int]] = []
        answers = [["127.0.0.1"], ["10.0.0.1"]]  # a rebinding resolver

        async def resolver(host: str, port: int) -> list[str]:
            asked.append((host, port))
            return answers.pop(0)

        document = await self.fetcher(resolver=resolver).fetch(url)
        self.assertEqual(document["client_id"], url)
        self.assertEqual(asked, [("client.test", port)])
        self.assertEqual(resource.host_headers, [f"client.test:{port}".encode()])

    async def test_falls_back_to_next_address(self) -> None:
        """
        When the first vetted address refuses, the next one is tried (a
        host with a broken IPv6 route still works over IPv4).
        """
        resource, served = serve_document(self)
        port = int(served.split(":")[2].split("/")[0])
        url = f"http://client.test:{port}/client.json"
        resource.set_document(valid_document(url))

        answers = ["127.0.0.2"]

        async def resolver(host: str, port: int) -> list[str]:
            return answers

        # the server listens on 127.0.0.1 only: 127.0.0.2 alone refuses ...
        await self.assertRefused(self.fetcher(resolver=resolver), url, "could not connect")
        # ... and is passed over when 127.0.0.1 follows it
        answers.append("127.0.0.1")
        document = await self.fetcher(resolver=resolver).fetch(url)
        self.assertEqual(document["client_id"], url)
        self.assertEqual(resource.hits, 1)

    async def test_resolver_failure(self) -> None:
        async def resolver(host: str, port: int) -> list[str]:
            raise OSError("no such host")

        await self.assertRefused(
            self.fetcher(resolver=resolver), "http://client.test/client.json", "could not resolve"
        )

    async def test_system_resolver(self) -> None:
        """
        The default resolver runs getaddrinfo in a thread (numeric host
        only: no DNS traffic).
        """
        answers = await system_resolver(reactor)("127.0.0.1", 80)
        self.assertEqual(answers, ["127.0.0.1"])


class CacheTests(FetchingTestCase):
    """
    Documents are cached by URL for their max-age, within bounds, on the
    injected clock; concurrent fetches share one request.
    """

    async def test_cached_for_max_age(self) -> None:
        clock = Clock()
        resource, url = serve_document(self)
        resource.headers[b"cache-control"] = b"public, max-age=120"
        fetcher = self.fetcher(clock=clock)
        await fetcher.fetch(url)
        await fetcher.fetch(url)
        self.assertEqual(resource.hits, 1)
        clock.advance(119)
        await fetcher.fetch(url)
        self.assertEqual(resource.hits, 1)
        clock.advance(2)
        await fetcher.fetch(url)
        self.assertEqual(resource.hits, 2)

    async def test_default_ttl(self) -> None:
        clock = Clock()
        resource, url = serve_document(self)
        fetcher = self.fetcher(clock=clock, default_ttl=300)
        await fetcher.fetch(url)
        clock.advance(299)
        await fetcher.fetch(url)
        self.assertEqual(resource.hits, 1)
        clock.advance(2)
        await fetcher.fetch(url)
        self.assertEqual(resource.hits, 2)

    async def test_no_store_gives_minimum(self) -> None:
        clock = Clock()
        resource, url = serve_document(self)
        resource.headers[b"cache-control"] = b"no-store"
        fetcher = self.fetcher(clock=clock, min_ttl=60)
        await fetcher.fetch(url)
        clock.advance(59)
        await fetcher.fetch(url)
        self.assertEqual(resource.hits, 1)
        clock.advance(2)
        await fetcher.fetch(url)
        self.assertEqual(resource.hits, 2)

    async def test_copies(self) -> None:
        """
        Callers get their own copy; changing it changes nothing cached.
        """
        _, url = serve_document(self)
        fetcher = self.fetcher()
        first = await fetcher.fetch(url)
        first["redirect_uris"].append("https://evil.example/cb")
        second = await fetcher.fetch(url)
        self.assertEqual(second["redirect_uris"], [REDIRECT])

    async def test_failure_remembered_briefly(self) -> None:
        clock = Clock()
        resource, url = serve_document(self)
        resource.code = 500
        fetcher = self.fetcher(clock=clock, failure_ttl=10)
        await self.assertRefused(fetcher, url, "HTTP 500")
        await self.assertRefused(fetcher, url, "HTTP 500")
        self.assertEqual(resource.hits, 1)
        resource.code = 200
        clock.advance(11)
        self.assertEqual((await fetcher.fetch(url))["client_id"], url)
        self.assertEqual(resource.hits, 2)

    async def test_failure_not_remembered(self) -> None:
        resource, url = serve_document(self)
        resource.code = 500
        fetcher = self.fetcher(failure_ttl=0)
        await self.assertRefused(fetcher, url, "HTTP 500")
        resource.code = 200
        await fetcher.fetch(url)
        self.assertEqual(resource.hits, 2)

    async def test_concurrent_fetches_coalesce(self) -> None:
        resource, url = serve_document(self)
        resource.hold = Deferred()
        fetcher = self.fetcher()
        results = [Deferred.fromCoroutine(fetcher.fetch(url)) for _ in range(3)]
        await resource.arrived
        # let any stray duplicate request arrive before counting
        await deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(resource.hits, 1)
        resource.hold.callback(None)
        documents = [await d for d in results]
        self.assertEqual(resource.hits, 1)
        self.assertEqual(documents, [valid_document(url)] * 3)
        documents[0]["client_name"] = "changed"
        self.assertEqual(documents[1]["client_name"], "Test Client")

    async def test_one_caller_cancels(self) -> None:
        resource, url = serve_document(self)
        resource.hold = Deferred()
        fetcher = self.fetcher()
        first = Deferred.fromCoroutine(fetcher.fetch(url))
        second = Deferred.fromCoroutine(fetcher.fetch(url))
        await resource.arrived
        first.cancel()
        self.failureResultOf(first)
        resource.hold.callback(None)
        self.assertEqual((await second)["client_id"], url)

    async def test_cache_bounded(self) -> None:
        clock = Clock()
        served = [serve_document(self) for _ in range(3)]
        fetcher = self.fetcher(clock=clock, max_entries=2)
        for _, url in served:
            await fetcher.fetch(url)
        # the oldest was evicted, the newer two are still cached
        for _, url in served[1:]:
            await fetcher.fetch(url)
        self.assertEqual([r.hits for r, _ in served], [1, 1, 1])
        await fetcher.fetch(served[0][1])
        self.assertEqual(served[0][0].hits, 2)


class TLSTests(FetchingTestCase):
    """
    https connects to the vetted address while the certificate is checked
    against the URL's host name.
    """

    def serve_tls(self, name: str) -> tuple[DocumentResource, int, Certificate]:
        key_pem, cert_pem = self_signed(name)
        resource = DocumentResource()
        site = Site(resource)
        site.timeOut = None
        options = PrivateCertificate.loadPEM(key_pem + cert_pem).options()
        port = reactor.listenSSL(0, site, options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return resource, port.getHost().port, Certificate.loadPEM(cert_pem)

    async def resolve_to_loopback(self, host: str, port: int) -> list[str]:
        return ["127.0.0.1"]

    async def test_certificate_for_the_name(self) -> None:
        resource, port, certificate = self.serve_tls("client.test")
        url = f"https://client.test:{port}/client.json"
        resource.set_document(valid_document(url))
        fetcher = self.fetcher(resolver=self.resolve_to_loopback, tls_trust_root=certificate)
        document = await fetcher.fetch(url)
        self.assertEqual(document["client_id"], url)
        self.assertEqual(resource.host_headers, [f"client.test:{port}".encode()])

    async def test_certificate_for_another_name(self) -> None:
        resource, port, certificate = self.serve_tls("other.test")
        url = f"https://client.test:{port}/client.json"
        resource.set_document(valid_document(url))
        fetcher = self.fetcher(resolver=self.resolve_to_loopback, tls_trust_root=certificate)
        await self.assertRefused(fetcher, url, "TLS", "client.test")
        self.assertEqual(resource.hits, 0)

    async def test_untrusted_certificate(self) -> None:
        resource, port, _ = self.serve_tls("client.test")
        url = f"https://client.test:{port}/client.json"
        resource.set_document(valid_document(url))
        other = Certificate.loadPEM(self_signed("client.test")[1])
        fetcher = self.fetcher(resolver=self.resolve_to_loopback, tls_trust_root=other)
        await self.assertRefused(fetcher, url, "TLS")
        self.assertEqual(resource.hits, 0)


PRIVATE_ANSWERS = [
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "169.254.169.254",
    "169.254.1.1",
    "127.0.0.1",
    "0.0.0.0",  # noqa: S104
    "100.64.0.1",
    "224.0.0.1",
    "255.255.255.255",
    "::1",
    "::",
    "fd00::1",
    "fe80::1",
    "fec0::1",
    "ff02::1",
    "::ffff:10.0.0.1",
    "::ffff:169.254.169.254",
    "64:ff9b::a00:1",
    "2002:a00:1::1",
    "2001:db8::1",
    "not an address",
]


class GuardTests(SynchronousTestCase):
    """
    The SSRF guard over a memory reactor: refusals happen before any
    connection is attempted, and the connection that is made goes to the
    vetted address.
    """

    def fetch(self, url: str, answers: list[str], **options: Any) -> tuple[Any, Deferred[Any]]:
        memory = MemoryReactorClock()
        asked: list[str] = []

        async def resolver(host: str, port: int) -> list[str]:
            asked.append(host)
            return answers

        fetcher = ClientMetadataFetcher(memory, resolver=resolver, **options)
        result = Deferred.fromCoroutine(fetcher.fetch(url))
        self.assertLessEqual(len(asked), 1)
        return memory, result

    def assertRefusedBeforeConnecting(
        self, url: str, answers: list[str], *fragments: str, **options: Any
    ) -> None:
        memory, result = self.fetch(url, answers, **options)
        error = self.failureResultOf(result, CIMDError).value
        assert_readable(self, error.message)
        for fragment in fragments:
            self.assertIn(fragment, error.message)
        self.assertEqual(memory.tcpClients, [])
        self.assertEqual(memory.sslClients, [])
        self.assertEqual(memory.getDelayedCalls(), [])

    def test_private_answers_refused(self) -> None:
        for answer in PRIVATE_ANSWERS:
            self.assertRefusedBeforeConnecting(
                "https://client.example/client.json", [answer], "public addresses"
            )

    def test_one_private_answer_among_public_ones(self) -> None:
        for answer in PRIVATE_ANSWERS:
            self.assertRefusedBeforeConnecting(
                "https://client.example/client.json",
                ["93.184.216.34", answer, "2606:2800:220:1::1"],
                "public addresses",
            )

    def test_allow_loopback_refuses_the_rest(self) -> None:
        for answer in PRIVATE_ANSWERS:
            if answer in ("127.0.0.1", "::1"):
                continue
            self.assertRefusedBeforeConnecting(
                "https://client.example/client.json",
                ["127.0.0.1", answer],
                "public addresses",
                allow_loopback=True,
            )

    def test_plain_http_only_to_loopback(self) -> None:
        self.assertRefusedBeforeConnecting(
            "http://client.example/client.json",
            ["93.184.216.34"],
            "plain http",
            allow_loopback=True,
        )
        self.assertRefusedBeforeConnecting(
            "http://client.example/client.json", ["93.184.216.34"], "https"
        )

    def test_no_answers(self) -> None:
        self.assertRefusedBeforeConnecting("https://client.example/client.json", [], "no addresses")

    def test_ip_literal_not_resolved(self) -> None:
        self.assertRefusedBeforeConnecting("https://[fd00::1]/client.json", [], "unique local")

    def test_connects_to_the_vetted_address_only(self) -> None:
        """
        An https fetch dials the vetted address and the URL's port (TLS on
        top); the timeout then abandons it.  Loopback with allow_loopback,
        so even this memory-only connection names no outside address.
        """
        memory, result = self.fetch(
            "https://client.example:8443/client.json",
            ["127.0.0.5", "127.0.0.6"],
            allow_loopback=True,
        )
        self.assertEqual([(c[0], c[1]) for c in memory.tcpClients], [("127.0.0.5", 8443)])
        self.assertNoResult(result)
        memory.advance(5)
        error = self.failureResultOf(result, CIMDError).value
        self.assertIn("within 5 seconds", error.message)


class ClientIdTests(SynchronousTestCase):
    """
    Which client ids are metadata document URLs.
    """

    def test_examples(self) -> None:
        for good in (
            "https://client.example/client.json",
            "https://client.example:8443/oauth/metadata.json",
            "https://claude.ai/oauth/mcp-oauth-client-metadata",
            "https://client.example/a?b=c",
            "https://192.0.2.1/client",
            "https://[2001:db8::1]:443/client",
            "https://xn--bcher-kva.example/c",
        ):
            self.assertTrue(is_cimd_client_id(good), good)
        for bad in (
            "",
            "client-123",
            "http://client.example/client.json",
            "HTTPS://client.example/client.json",
            "https://client.example",
            "https://client.example/",
            "https://client.example/a#",
            "https://client.example/a#b",
            "https://user@client.example/a",
            "https://user:pw@client.example/a",
            "https://client.example/a/./b",
            "https://client.example/a/../b",
            "https://client.example/..",
            "https://client.example/a/%2e%2E/b",
            "https://client.example/a b",
            "https://client.example/a\\b",
            "https://client.exämple/a",
            "https://client.example./a",
            "https://client.example:/a",
            "https://client.example:0/a",
            "https://client.example:99999/a",
            "https://0x7f.1/a",
            "https://2130706433/a",
            "https://1.2.3/a",
            "https://[fe80::1%25eth0]/a",
            "https://-bad-.example/a",
            "https://client.example/%zz",
            "https:///a",
            "https://client.example/" + "a" * 3000,
        ):
            self.assertFalse(is_cimd_client_id(bad), bad)

    def test_http_when_allowed(self) -> None:
        self.assertTrue(is_cimd_client_id("http://127.0.0.1:8080/c", allow_http=True))
        self.assertFalse(is_cimd_client_id("ftp://127.0.0.1/c", allow_http=True))
        fetcher = ClientMetadataFetcher(MemoryReactorClock(), allow_loopback=True)
        self.assertTrue(fetcher.is_client_id("http://127.0.0.1:8080/c"))
        self.assertFalse(ClientMetadataFetcher(MemoryReactorClock()).is_client_id("http://a/c"))

    def test_target(self) -> None:
        target = parse_client_id("https://Client.Example:8443/c.json?x=1")
        self.assertEqual((target.host, target.port, target.address), ("client.example", 8443, None))
        target = parse_client_id("https://[2001:DB8::1]/c")
        self.assertEqual(target.address, ipaddress.IPv6Address("2001:db8::1"))
        self.assertEqual(target.port, 443)

    @given(
        labels=st.lists(
            st.from_regex(r"[a-z][a-z0-9]{0,10}", fullmatch=True), min_size=1, max_size=8
        ),
        tld=st.from_regex(r"[a-z]{2,6}", fullmatch=True),
        port=st.none() | st.integers(1, 65535),
        segments=st.lists(
            st.from_regex(r"[A-Za-z0-9_~\-]{1,8}", fullmatch=True), min_size=1, max_size=5
        ),
    )
    def test_generated(
        self, labels: list[str], tld: str, port: int | None, segments: list[str]
    ) -> None:
        host = ".".join([*labels, tld])
        authority = host if port is None else f"{host}:{port}"
        path = "/" + "/".join(segments)
        url = f"https://{authority}{path}"
        self.assertTrue(is_cimd_client_id(url))
        self.assertFalse(is_cimd_client_id(f"http://{authority}{path}"))
        self.assertFalse(is_cimd_client_id(f"https://{authority}"))
        self.assertFalse(is_cimd_client_id(f"https://{authority}/"))
        self.assertFalse(is_cimd_client_id(url + "#"))
        self.assertFalse(is_cimd_client_id(url + "#frag"))
        self.assertFalse(is_cimd_client_id(f"https://someone@{authority}{path}"))
        self.assertFalse(is_cimd_client_id(f"https://{authority}{path}/../x"))
        self.assertFalse(is_cimd_client_id(f"https://{authority}/.{path}"))

    @given(st.text(max_size=300))
    def test_never_raises(self, text: str) -> None:
        result = is_cimd_client_id(text)
        if result:
            self.assertTrue(text.startswith("https://"))
            self.assertNotIn("#", text)
            self.assertNotIn("@", text.split("/")[2])


PRIVATE_NETWORKS = [
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "::ffff:10.0.0.0/104",
    "::ffff:127.0.0.0/104",
    "::ffff:169.254.0.0/112",
    "64:ff9b::a00:0/104",
    "100::/64",
    "2001::/32",
    "2001:db8::/32",
    "2002:a00::/24",
    "fc00::/7",
    "fe80::/10",
    "fec0::/10",
    "ff00::/8",
]


class AddressTests(SynchronousTestCase):
    """
    The address classifier.
    """

    def test_examples(self) -> None:
        self.assertEqual(blocked_address_reason("169.254.169.254"), "the cloud metadata address")
        self.assertEqual(
            blocked_address_reason("100.64.0.1"), "a shared (carrier-grade NAT) address"
        )
        self.assertEqual(blocked_address_reason("fd00::1"), "a unique local address")
        self.assertEqual(
            blocked_address_reason("::ffff:10.0.0.1"), "a private address embedded in IPv6"
        )
        self.assertEqual(blocked_address_reason("bogus"), "not an IP address")
        for public in ("93.184.216.34", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8"):
            self.assertIsNone(blocked_address_reason(public), public)

    def test_allow_loopback(self) -> None:
        for loopback in ("127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"):
            self.assertIsNotNone(blocked_address_reason(loopback))
            self.assertIsNone(blocked_address_reason(loopback, allow_loopback=True))
        for other in ("10.0.0.1", "169.254.169.254", "0.0.0.0", "::", "fd00::1"):  # noqa: S104
            self.assertIsNotNone(blocked_address_reason(other, allow_loopback=True))

    @given(data=st.data(), network=st.sampled_from(PRIVATE_NETWORKS), loopback=st.booleans())
    def test_private_ranges_refused(self, data: Any, network: str, loopback: bool) -> None:
        address = data.draw(st.ip_addresses(network=network))
        reason = blocked_address_reason(address, allow_loopback=loopback)
        if (loopback and "127.0.0." in network) or (loopback and network == "::1/128"):
            self.assertIsNone(reason)
        else:
            self.assertIsNotNone(reason, str(address))

    @given(st.ip_addresses(v=4))
    def test_ipv4_public_means_global(self, address: ipaddress.IPv4Address) -> None:
        """
        Agrees with the standard library, and is stricter where it knows
        better (multicast, all of 192.0.0.0/24, the 6to4 relay anycast).
        """
        stricter = (
            address.is_multicast
            or address in ipaddress.IPv4Network("192.0.0.0/24")
            or address in ipaddress.IPv4Network("192.88.99.0/24")
        )
        expected_public = address.is_global and not stricter
        self.assertEqual(blocked_address_reason(address) is None, expected_public, str(address))
        self.assertEqual(blocked_address_reason(str(address)) is None, expected_public)

    @given(st.ip_addresses(v=4))
    def test_ipv4_mapped_judged_as_ipv4(self, address: ipaddress.IPv4Address) -> None:
        mapped = ipaddress.IPv6Address(f"::ffff:{address}")
        self.assertEqual(
            blocked_address_reason(mapped) is None, blocked_address_reason(address) is None
        )

    @given(st.ip_addresses(v=6))
    def test_ipv6_public_only_global_unicast(self, address: ipaddress.IPv6Address) -> None:
        assume(address.ipv4_mapped is None and address.sixtofour is None)
        assume(address not in ipaddress.IPv6Network("64:ff9b::/96"))
        if blocked_address_reason(address) is None:
            self.assertIn(address, ipaddress.IPv6Network("2000::/3"))
            self.assertTrue(address.is_global, str(address))

    @given(
        st.tuples(st.integers(1, 223), *[st.integers(0, 255)] * 3).map(
            lambda octets: ipaddress.IPv4Address(".".join(map(str, octets)))
        )
    )
    def test_public_ipv4_accepted(self, address: ipaddress.IPv4Address) -> None:
        """
        Any unicast IPv4 address outside the special-purpose blocks is
        accepted (allow_loopback or not).
        """
        blocked = [ipaddress.IPv4Network(n) for n in PRIVATE_NETWORKS if ":" not in n]
        blocked.append(ipaddress.IPv4Network("192.88.99.0/24"))
        assume(not any(address in network for network in blocked))
        self.assertIsNone(blocked_address_reason(address), str(address))
        self.assertIsNone(blocked_address_reason(address, allow_loopback=True), str(address))


class DocumentTests(SynchronousTestCase):
    """
    Parsing and the identity checks, without the network.
    """

    url = "https://client.example/client.json"

    def refused(self, body: bytes) -> str:
        with self.assertRaises(CIMDError) as caught:
            check_document(self.url, parse_document(body))
        assert_readable(self, caught.exception.message)
        return caught.exception.message

    def test_valid(self) -> None:
        body = json.dumps(valid_document(self.url)).encode()
        self.assertEqual(check_document(self.url, parse_document(body)), valid_document(self.url))
        self.assertEqual(parse_document(b"\xef\xbb\xbf{}"), {})

    def test_duplicate_members(self) -> None:
        body = (
            b'{"client_id": "https://evil.example/x", "client_id": "'
            + self.url.encode()
            + b'", "redirect_uris": ["https://a.example/cb"]}'
        )
        self.assertIn("repeats the member 'client_id'", self.refused(body))

    def test_not_json(self) -> None:
        for body in (b"", b"{", b"\xff\xfe{}", b'{"a": NaN}', b"[" * 5000 + b"]" * 5000):
            self.refused(body)

    def test_huge_number(self) -> None:
        self.assertIn("not valid JSON", self.refused(b"9" * 5000))
        self.assertIn("too large", self.refused(b'{"x": 1e999}'))

    def test_what_the_broker_could_not_store_or_walk(self) -> None:
        """
        A lone surrogate (valid JSON, not Unicode: the database cannot
        store it) and deep nesting are refused with the reason.
        """
        named = valid_document(self.url)
        body = json.dumps(named).replace("Test Client", "\\ud800 Client").encode()
        self.assertIn("surrogate", self.refused(body))
        deep = json.dumps(valid_document(self.url, x=[])).replace("[]", "[" * 100 + "]" * 100)
        self.assertIn("nested deeper", self.refused(deep.encode()))

    def test_quoting(self) -> None:
        """
        Values from the document are quoted safely and bounded.
        """
        body = json.dumps({"client_id": 'x"\\\n\u00e9' + "y" * 500}).encode()
        message = self.refused(body)
        self.assertLess(len(message), 300)

    def test_cache_lifetime(self) -> None:
        from twisted.web.http_headers import Headers

        def lifetime(*values: bytes) -> float:
            headers = Headers({b"cache-control": list(values)} if values else {})
            return cache_lifetime(headers, default=3600, minimum=60, maximum=86400)

        self.assertEqual(lifetime(), 3600)
        self.assertEqual(lifetime(b"max-age=600"), 600)
        self.assertEqual(lifetime(b'public, max-age="600"'), 600)
        self.assertEqual(lifetime(b"max-age=5"), 60)
        self.assertEqual(lifetime(b"max-age=0"), 60)
        self.assertEqual(lifetime(b"max-age=99999999"), 86400)
        self.assertEqual(lifetime(b"no-store"), 60)
        self.assertEqual(lifetime(b"public", b"no-cache, max-age=600"), 60)
        self.assertEqual(lifetime(b"max-age=-5"), 3600)
        self.assertEqual(lifetime(b"max-age=abc"), 3600)
