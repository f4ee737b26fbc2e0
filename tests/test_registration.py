"""
Discovery documents, dynamic client registration and CORS, as an MCP client
meets them.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from fjmcp.oauth.clients import ClientRegistry
from fjmcp.oauth.registration import (
    RegistrationError,
    check_client_metadata,
    check_redirect_uri,
    redirect_host,
    redirect_uri_registered,
)
from fjmcp.secrets.crypto import token_hash
from fjmcp.store import ClientRecord, Store, migrate_database
from tests.helpers import http_client, make_config, routes_over, serve


class RedirectURITests(SynchronousTestCase):
    def test_accepted(self) -> None:
        for uri in (
            "https://claude.ai/api/mcp/auth_callback",
            "https://claude.com/api/mcp/auth_callback",
            "http://localhost:6274/oauth/callback",
            "http://127.0.0.1:33418/callback",
            "http://[::1]:8080/cb",
            "cursor://anysphere.cursor-retrieval/oauth/callback",
            "com.example.app:/oauth2redirect",
        ):
            self.assertEqual(check_redirect_uri(uri), uri)

    def test_refused(self) -> None:
        for uri in (
            "http://example.com/cb",
            "http://10.0.0.1/cb",
            "https://example.com/cb#frag",
            "javascript:alert(1)",
            "data:text/html,hi",
            "file:///etc/passwd",
            "/relative/path",
            "https:///nohost",
            "https://example.com/a b",
            "",
            42,
        ):
            with self.assertRaises(RegistrationError, msg=repr(uri)) as cm:
                check_redirect_uri(uri)
            self.assertEqual(cm.exception.error, "invalid_redirect_uri")

    def test_user_info_refused(self) -> None:
        """
        User info reads like a host to a person and is not one: the first
        of these goes to evil.example.  A backslash is a slash to browsers
        (but not to Python), which moves the host just as well.
        """
        for uri, says in (
            ("https://claude.ai@evil.example/api/mcp/auth_callback", "user info"),
            ("https://user:password@a.example/cb", "user info"),
            ("https://:password@a.example/cb", "user info"),
            ("http://claude.ai@127.0.0.1:9/cb", "user info"),
            ("cursor://someone@anysphere.cursor-retrieval/oauth/callback", "user info"),
            ("https://evil.example\\@claude.ai/cb", "user info"),
            ("https://evil.example\\.claude.ai/cb", "backslash"),
        ):
            with self.assertRaises(RegistrationError, msg=uri) as cm:
                check_redirect_uri(uri)
            self.assertEqual(cm.exception.error, "invalid_redirect_uri")
            self.assertIn(says, cm.exception.description)

    @given(st.text(max_size=60))
    def test_never_crashes(self, text: str) -> None:
        """
        Any string is either accepted as-is or refused with an RFC 7591 error;
        what is accepted shows a person the host it goes to.
        """
        try:
            self.assertEqual(check_redirect_uri(text), text)
        except RegistrationError as e:
            self.assertEqual(e.error, "invalid_redirect_uri")
        else:
            self.assertNotIn("@", urlsplit(text).netloc)
            self.assertNotIn("@", redirect_host(text))
            # Look-alike letters never reach the page as such.
            self.assertTrue(redirect_host(text).isascii() or not urlsplit(text).hostname)

    def test_redirect_host(self) -> None:
        for uri, shown in (
            ("https://claude.ai/api/mcp/auth_callback", "claude.ai"),
            ("https://Claude.AI:443/cb", "claude.ai"),
            ("https://a.example:8443/cb?x=1", "a.example:8443"),
            ("http://127.0.0.1:9/callback", "127.0.0.1:9"),
            ("http://[::1]:8080/cb", "[::1]:8080"),
            ("http://localhost/cb", "localhost"),
            ("cursor://anysphere.cursor-retrieval/oauth/callback", "anysphere.cursor-retrieval"),
            ("com.example.app:/oauth2redirect?x=1", "com.example.app:/oauth2redirect"),
            # Registered before user info was refused: only the host shows.
            ("https://claude.ai@evil.example/cb", "evil.example"),
            ("https://claude.ai:x@evil.example:444/cb", "evil.example:444"),
            # A Cyrillic a (U+0430) in place of the Latin one: shown as browsers do.
            ("https://\u0430pple.com/cb", "xn--pple-43d.com"),
            ("https://b\u00fccher.example:8443/cb", "xn--bcher-kva.example:8443"),
        ):
            self.assertEqual(redirect_host(uri), shown, uri)

    @given(
        st.integers(1, 65535),
        st.integers(1, 65535),
        st.sampled_from(["127.0.0.1", "localhost", "[::1]"]),
    )
    def test_loopback_any_port(self, registered: int, used: int, host: str) -> None:
        """
        RFC 8252 7.3: a loopback redirect matches whatever port the native
        app got; the path must still match.
        """
        uris = (f"http://{host}:{registered}/callback",)
        self.assertTrue(redirect_uri_registered(uris, f"http://{host}:{used}/callback"))
        self.assertFalse(redirect_uri_registered(uris, f"http://{host}:{used}/other"))
        self.assertFalse(redirect_uri_registered(uris, f"https://{host}:{used}/callback"))

    def test_exact_otherwise(self) -> None:
        uris = ("https://claude.ai/api/mcp/auth_callback",)
        self.assertTrue(redirect_uri_registered(uris, uris[0]))
        for other in (
            "https://claude.ai/api/mcp/auth_callback/",
            "https://claude.ai:444/api/mcp/auth_callback",
            "https://CLAUDE.ai/api/mcp/auth_callback",
            "https://claude.ai/api/mcp/auth_callback?x=1",
            "http://127.0.0.1:99999/cb",
        ):
            self.assertFalse(redirect_uri_registered(uris, other), other)


class MetadataCheckTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        md = check_client_metadata({"redirect_uris": ["https://a.example/cb"]})
        self.assertEqual(md.token_endpoint_auth_method, "client_secret_basic")
        self.assertEqual(md.grant_types, ("authorization_code",))
        self.assertEqual(md.response_types, ("code",))

    def test_errors_name_the_field(self) -> None:
        cases: list[tuple[Any, str, str]] = [
            ([], "invalid_client_metadata", "JSON object"),
            ({}, "invalid_redirect_uri", "redirect_uris"),
            ({"redirect_uris": "https://a/cb"}, "invalid_redirect_uri", "redirect_uris"),
            (
                {
                    "redirect_uris": ["https://a/cb"],
                    "token_endpoint_auth_method": "private_key_jwt",
                },
                "invalid_client_metadata",
                "token_endpoint_auth_method",
            ),
            (
                {"redirect_uris": ["https://a/cb"], "grant_types": ["client_credentials"]},
                "invalid_client_metadata",
                "grant_types",
            ),
            (
                {"redirect_uris": ["https://a/cb"], "grant_types": ["refresh_token"]},
                "invalid_client_metadata",
                "authorization_code",
            ),
            (
                {"redirect_uris": ["https://a/cb"], "response_types": ["token"]},
                "invalid_client_metadata",
                "response_types",
            ),
            (
                {"redirect_uris": ["https://a/cb"], "client_name": 5},
                "invalid_client_metadata",
                "client_name",
            ),
            (
                {"redirect_uris": ["https://a/cb"], "logo_uri": "javascript:x"},
                "invalid_client_metadata",
                "logo_uri",
            ),
        ]
        for body, error, needle in cases:
            with self.assertRaises(RegistrationError, msg=repr(body)) as cm:
                check_client_metadata(body)
            self.assertEqual(cm.exception.error, error)
            self.assertIn(needle, cm.exception.description)

    def test_client_chosen_credentials_dropped(self) -> None:
        md = check_client_metadata(
            {
                "redirect_uris": ["https://a.example/cb"],
                "client_id": "mine",
                "client_secret": "mine-too",
                "software_id": "kept",
            }
        )
        out = md.to_json()
        self.assertNotIn("client_id", out)
        self.assertNotIn("client_secret", out)
        self.assertEqual(out["software_id"], "kept")

    @given(
        st.dictionaries(
            st.sampled_from(
                ["redirect_uris", "grant_types", "response_types", "client_name",
                 "token_endpoint_auth_method", "scope", "logo_uri", "x"]
            ),
            st.none() | st.text(max_size=10) | st.lists(st.text(max_size=20), max_size=3)
            | st.integers(),
        )
    )  # fmt: skip
    def test_any_body(self, body: dict[str, Any]) -> None:
        """
        Whatever a client sends, the answer is metadata or an RFC 7591 error.
        """
        try:
            md = check_client_metadata(body)
        except RegistrationError as e:
            self.assertIn(e.error, ("invalid_client_metadata", "invalid_redirect_uri"))
        else:
            self.assertTrue(md.redirect_uris)
            json.dumps(md.to_json())


class BrokerHTTPTests(TestCase):
    def setUp(self) -> None:
        self.tmp = Path(self.mktemp()).resolve()
        self.config = make_config(str(self.tmp), public_url="https://mcp.example.org")
        migrate_database(self.config.db_path)
        self.store = Store.open(self.config.db_path, reactor)
        self.addCleanup(self.store.close)
        app = routes_over(self.config, reactor, self.store, clients=ClientRegistry(self.store))
        self.url = serve(self, app.resource())
        self.http = http_client()

    async def post_json(self, path: str, body: Any) -> tuple[int, Any, Headers]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await self.http.post(
            self.url + path, data=data, headers=Headers({b"Content-Type": [b"application/json"]})
        )
        text = await response.content()
        return response.code, json.loads(text) if text else None, response.headers


class DiscoveryTests(BrokerHTTPTests):
    async def test_authorization_server_metadata(self) -> None:
        response = await self.http.get(
            self.url + "/.well-known/oauth-authorization-server",
            headers=Headers({b"Host": [b"evil.example"]}),
        )
        body = await response.json()
        self.assertEqual(body["issuer"], "https://mcp.example.org")
        self.assertEqual(body["authorization_endpoint"], "https://mcp.example.org/oauth/authorize")
        self.assertEqual(body["registration_endpoint"], "https://mcp.example.org/oauth/register")
        self.assertEqual(body["code_challenge_methods_supported"], ["S256"])
        self.assertIn("none", body["token_endpoint_auth_methods_supported"])
        self.assertTrue(body["client_id_metadata_document_supported"])
        self.assertTrue(body["authorization_response_iss_parameter_supported"])
        self.assertEqual(response.headers.getRawHeaders(b"access-control-allow-origin"), [b"*"])

    async def test_protected_resource_metadata(self) -> None:
        for path in (
            "/.well-known/oauth-protected-resource",
            "/.well-known/oauth-protected-resource/mcp",
        ):
            response = await self.http.get(self.url + path)
            body = await response.json()
            self.assertEqual(body["resource"], "https://mcp.example.org/mcp")
            # Byte-identical to the issuer, or clients refuse the pairing.
            self.assertEqual(body["authorization_servers"], ["https://mcp.example.org"])

    async def test_preflight_never_401(self) -> None:
        for path in (
            "/oauth/register",
            "/oauth/token",
            "/mcp",
            "/.well-known/oauth-authorization-server",
        ):
            response = await self.http.request(
                "OPTIONS",
                self.url + path,
                headers=Headers(
                    {
                        b"Origin": [b"http://localhost:6274"],
                        b"Access-Control-Request-Method": [b"POST"],
                        b"Access-Control-Request-Headers": [b"authorization, mcp-protocol-version"],
                    }
                ),
            )
            await response.content()
            self.assertEqual(response.code, 204, path)
            allowed = response.headers.getRawHeaders(b"access-control-allow-headers")[0].lower()
            for header in (
                b"authorization",
                b"mcp-session-id",
                b"mcp-protocol-version",
                b"last-event-id",
            ):
                self.assertIn(header, allowed)


class RegistrationHTTPTests(BrokerHTTPTests):
    async def test_public_client_gets_no_secret(self) -> None:
        code, body, headers = await self.post_json(
            "/oauth/register",
            {
                "redirect_uris": ["http://localhost:6274/oauth/callback"],
                "token_endpoint_auth_method": "none",
                "grant_types": ["authorization_code", "refresh_token"],
                "client_name": "MCP Inspector",
            },
        )
        self.assertEqual(code, 201)
        self.assertNotIn("client_secret", body)
        self.assertEqual(body["client_name"], "MCP Inspector")
        self.assertEqual(body["token_endpoint_auth_method"], "none")
        self.assertTrue(body["client_id"])
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-store"])

    async def test_confidential_clients_get_a_secret_stored_hashed(self) -> None:
        for method in ("client_secret_post", "client_secret_basic"):
            code, body, _ = await self.post_json(
                "/oauth/register",
                {
                    "redirect_uris": ["https://claude.ai/api/mcp/auth_callback"],
                    "token_endpoint_auth_method": method,
                },
            )
            self.assertEqual(code, 201)
            secret = body["client_secret"]
            self.assertEqual(body["client_secret_expires_at"], 0)
            record = await self.store.get_client(body["client_id"])
            assert record is not None
            self.assertEqual(record.client_secret_hash, token_hash(secret))
            self.assertTrue(ClientRegistry.secret_matches(record, secret))
            self.assertFalse(ClientRegistry.secret_matches(record, secret + "x"))
        conn = sqlite3.connect(self.config.db_path)
        dump = "\n".join(conn.iterdump())
        conn.close()
        self.assertNotIn(secret, dump)

    async def test_bad_requests(self) -> None:
        code, body, _ = await self.post_json(
            "/oauth/register", {"redirect_uris": ["http://evil.example/cb"]}
        )
        self.assertEqual((code, body["error"]), (400, "invalid_redirect_uri"))
        self.assertIn("loopback", body["error_description"])
        code, body, _ = await self.post_json(
            "/oauth/register",
            {"redirect_uris": ["https://claude.ai@evil.example/api/mcp/auth_callback"]},
        )
        self.assertEqual((code, body["error"]), (400, "invalid_redirect_uri"))
        self.assertIn("user info", body["error_description"])
        code, body, _ = await self.post_json("/oauth/register", b"{not json")
        self.assertEqual((code, body["error"]), (400, "invalid_client_metadata"))
        code, body, _ = await self.post_json(
            "/oauth/register", {"redirect_uris": ["https://a.example/cb"], "pad": "x" * 20000}
        )
        self.assertEqual(code, 413)
        self.assertIn("larger than", body["error_description"])
        code, body, _ = await self.post_json("/oauth/register", [1, 2])
        self.assertEqual((code, body["error"]), (400, "invalid_client_metadata"))

    async def test_hostile_json_is_a_400_with_its_reason(self) -> None:
        """
        JSON that Python's decoder takes but the broker cannot use (nesting
        that ends in a RecursionError, a lone surrogate the database cannot
        store, NaN, a number too large for a float) is refused with the
        reason, not a 500 and a traceback.
        """
        good = b'{"redirect_uris": ["https://a.example/cb"], '
        for body, reason in [
            (good + b'"x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested deeper"),
            (good + b'"x": ' + b"[" * 100 + b"]" * 100 + b"}", "nested deeper"),
            (good + b'"client_name": "\\ud800"}', "surrogate"),
            (b'{"redirect_uris": ["https://a.example/\\udfff"]}', "surrogate"),
            (good + b'"x": {"\\ud83d": 1}}', "surrogate"),
            (good + b'"x": NaN}', "NaN"),
            (good + b'"x": 1e999}', "too large"),
            (b"\xff{}", "not UTF-8"),
        ]:
            code, answer, _ = await self.post_json("/oauth/register", body)
            self.assertEqual((code, answer["error"]), (400, "invalid_client_metadata"), body[:60])
            self.assertIn(reason, answer["error_description"])
            self.assertIn("not valid JSON", answer["error_description"])
        self.assertEqual(self.flushLoggedErrors(), [])
        # Non-ASCII text that is valid Unicode is welcome.
        code, answer, _ = await self.post_json(
            "/oauth/register",
            {"redirect_uris": ["https://a.example/cb"], "client_name": "Clé 🔑"},
        )
        self.assertEqual((code, answer["client_name"]), (201, "Clé 🔑"))


class BindingStore:
    """
    The store's C{create_client}, synchronous: binds the text it would
    write the way SQLite does (as UTF-8), so what the real store refuses
    fails here too.
    """

    def __init__(self) -> None:
        self._db = sqlite3.connect(":memory:")

    def create_client(
        self, client_id: str, kind: str, secret_hash: bytes | None, metadata: dict[str, Any]
    ) -> Deferred[ClientRecord]:
        self._db.execute(
            "SELECT ?, ?, ?", (client_id, metadata.get("client_name"), json.dumps(metadata))
        )
        return succeed(ClientRecord(client_id, kind, secret_hash, metadata, 0.0, None))


def _json_text(value: Any) -> bytes:
    return json.dumps(value).encode()


# Text with lone surrogates too, which st.text() leaves out.
_TEXT = st.text(st.characters() | st.integers(0xD800, 0xDFFF).map(chr), max_size=8)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=12,
)


class RegistrationBodyProperties(SynchronousTestCase):
    @given(
        st.binary(max_size=200)
        | st.integers(0, 3000).map(lambda n: b"[" * n + b"]" * n)
        | st.builds(
            lambda extra, name: _json_text(
                {"redirect_uris": ["https://a.example/cb"], "client_name": name, "x": extra}
            ),
            _JSON,
            _TEXT,
        )
        | _JSON.map(_json_text)
    )
    def test_any_body_is_answered_without_a_server_error(self, body: bytes) -> None:
        """
        Whatever bytes come to /oauth/register, the answer is 201 or a 4xx
        with a JSON error, and nothing is logged as an error.
        """
        config = make_config(self.mktemp())
        clients = ClientRegistry(BindingStore())  # type: ignore[arg-type]
        stub = StubTreq(routes_over(config, reactor, clients=clients).resource())
        d = stub.post(
            "https://mcp.example.org/oauth/register",
            data=body,
            headers={b"Content-Type": [b"application/json"]},
        )
        stub.flush()
        response = self.successResultOf(d)
        answer = json.loads(self.successResultOf(response.content()))
        self.assertIn(response.code, (201, 400, 413), answer)
        if response.code != 201:
            self.assertTrue(answer["error_description"])
        self.assertEqual(self.flushLoggedErrors(), [])
