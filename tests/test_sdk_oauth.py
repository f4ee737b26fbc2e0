"""
The official MCP Python SDK's OAuth client against the broker, end to end
over loopback sockets: discovery, registration (dynamic, or a client ID
metadata document served over https), authorization with the consent form
submitted as a browser would, the Forgejo stand-in's login, the callback,
the token request, and the authenticated retry of the MCP request.

The SDK runs in its own process (L{tests.sdk_oauth_client}, asyncio and
httpx) while the broker runs in the test's reactor; the script reports what
happened as JSON, and the store says what the broker made of it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from fjmcp.app.tap import store_location
from tests.broker_support import REDIRECT, Broker, run_sdk_client
from tests.helpers import self_signed
from tests.store_engines import OnPostgreSQL, rows

SCRIPT = str(Path(__file__).with_name("sdk_oauth_client.py"))
SCRIPT_TIMEOUT = 60
# What /mcp answers the SDK's initialize with a valid token: a new session
# whose (scripted) child answers.
WITH_TOKEN = 200

log = Logger()

# The SDK is an optional test dependency (the "test" extra).
try:
    import mcp.client.auth  # noqa: F401
except ImportError:
    SDK_MISSING: str | None = "the mcp SDK is not installed"
else:
    SDK_MISSING = None


class MetadataDocument(Resource):
    """
    A client ID metadata document, counting its fetches.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.document: dict[str, Any] = {}
        self.hits = 0

    def render_GET(self, request: Any) -> bytes:
        self.hits += 1
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.document).encode()


class SDKClientTests(TestCase):
    timeout = SCRIPT_TIMEOUT + 30

    def setUp(self) -> None:
        if SDK_MISSING:
            raise SkipTest(SDK_MISSING)

    def start_broker(self, tls_trust_root: Any = None, **config: Any) -> Broker:
        self.broker = Broker(self, tls_trust_root=tls_trust_root, **config)
        self.mcp_url = self.broker.url + "/mcp"
        return self.broker

    async def run_client(self, *args: str) -> dict[str, Any]:
        """
        Run the SDK client against the broker and return its summary.
        """
        argv = [
            SCRIPT,
            self.mcp_url,
            "--redirect-uri",
            REDIRECT,
            "--timeout",
            str(SCRIPT_TIMEOUT),
            *args,
        ]
        summary, _ = await run_sdk_client(self, argv)
        self.summary = summary
        return summary

    def requests_to(self, path: str, method: str | None = None) -> list[dict[str, Any]]:
        return [
            r
            for r in self.summary["requests"]
            if r["path"] == path and (method is None or r["method"] == method)
        ]

    def check_flow(self, summary: dict[str, Any], client_id: str, method: str) -> None:
        """
        What every run must show, whatever the client kind.
        """
        broker = self.broker.url
        requests = summary["requests"]
        # 1. The first MCP request went without a token and was challenged.
        first = requests[0]
        self.assertEqual((first["method"], first["path"]), ("POST", "/mcp"))
        self.assertEqual(first["status"], 401)
        self.assertFalse(first["bearer"])
        self.assertIn(
            f'resource_metadata="{broker}/.well-known/oauth-protected-resource/mcp"',
            first["www_authenticate"],
        )
        # 2. Discovery: protected resource metadata, then the authorization
        # server's, each found at the first place the SDK looked.
        prm = self.requests_to("/.well-known/oauth-protected-resource/mcp", "GET")
        self.assertEqual([r["status"] for r in prm], [200])
        asm = self.requests_to("/.well-known/oauth-authorization-server", "GET")
        self.assertEqual([r["status"] for r in asm], [200])
        self.assertEqual(self.requests_to("/.well-known/openid-configuration"), [])
        # 3. The browser leg: consent page, approval, Forgejo, callback, client.
        steps = [(s["step"], s["status"]) for s in summary["browser"]]
        self.assertEqual(
            steps, [("authorize", 200), ("consent", 303), ("forgejo", 303), ("callback", 303)]
        )
        hops = summary["browser"]
        self.assertEqual(hops[0]["url"], broker + "/oauth/authorize")
        self.assertEqual(hops[1]["location"], self.broker.forgejo_url + "/login/oauth/authorize")
        self.assertEqual(hops[2]["location"], broker + "/oauth/callback")
        self.assertEqual(hops[3]["location"], REDIRECT)
        asked = summary["authorization_request"]
        self.assertEqual(asked["client_id"], client_id)
        self.assertEqual(asked["redirect_uri"], REDIRECT)
        self.assertEqual(asked["response_type"], "code")
        self.assertEqual(asked["code_challenge_method"], "S256")
        self.assertEqual(asked["resource"], self.mcp_url)
        answered = summary["authorization_response"]
        self.assertIs(answered["code"], True)
        self.assertTrue(answered["state"])
        self.assertEqual(answered["iss"], broker)
        # 4. One token request, authenticated the way the client registered.
        token = self.requests_to("/oauth/token", "POST")[0]
        self.assertEqual(token["status"], 200, token)
        self.assertEqual(token["form"]["grant_type"], "authorization_code")
        self.assertEqual(token["form"]["resource"], self.mcp_url)
        self.assertEqual(token["basic"], method == "client_secret_basic")
        self.assertEqual("client_secret" in token["form_keys"], method == "client_secret_post")
        self.assertIn("code_verifier", token["form_keys"])
        self.assertIs(token["response"]["access_token"], True)
        self.assertEqual(token["response"]["token_type"], "Bearer")
        self.assertIs(summary["tokens"]["access_token"], True)
        # 5. The MCP request again, now with the token: past the gate.
        mcp = [(r["bearer"], r["status"]) for r in self.requests_to("/mcp")]
        self.assertEqual(mcp[:2], [(False, 401), (True, WITH_TOKEN)])
        self.assertNotIn((True, 401), mcp)
        self.assertEqual(requests[-1]["path"], "/mcp")
        self.assertTrue(summary["initialize"]["ok"], summary["initialize"])
        self.assertIn("echo", summary["initialize"]["tools"])
        self.assertEqual(summary["initialize"]["echo"], ['{"hello": "world"}'])
        # The client the SDK ended up with.
        info = summary["client_info"]
        self.assertEqual(info["client_id"], client_id)
        self.assertEqual(info["token_endpoint_auth_method"], method)
        self.assertEqual(info["client_secret_issued"], method != "none")

    async def check_broker(self, client_id: str, kind: str, method: str) -> None:
        """
        What the broker recorded: the client, alice's Forgejo credential and
        one live grant of alice's to that client for the MCP URL.
        """
        store = self.broker.store
        record = await store.get_client(client_id)
        assert record is not None
        self.assertEqual(record.kind, kind)
        self.assertEqual(record.metadata["token_endpoint_auth_method"], method)
        self.assertEqual(record.client_secret_hash is not None, method != "none")
        self.assertEqual(record.metadata["redirect_uris"], [REDIRECT])
        user = await store.get_user(1)
        assert user is not None
        self.assertEqual(user.login, "alice")
        self.assertIsNotNone(await store.get_upstream_credential(1))
        (family,) = await store.list_families(client_id=client_id)
        self.assertEqual(family.forgejo_user_id, 1)
        self.assertEqual(family.resource, self.mcp_url)

    async def registered(self, method: str, *args: str, **config: Any) -> dict[str, Any]:
        """
        The SDK registers itself with C{method} and goes through the flow.
        """
        self.start_broker(**config)
        summary = await self.run_client("--auth-method", method, *args)
        (registration,) = self.requests_to("/oauth/register", "POST")
        self.assertEqual(registration["status"], 201, registration)
        response = registration["response"]
        self.assertEqual(response["token_endpoint_auth_method"], method)
        self.assertEqual(response.get("client_secret", False), method != "none")
        client_id = response["client_id"]
        self.check_flow(summary, client_id, method)
        await self.check_broker(client_id, "dcr", method)
        return summary

    async def test_public_client(self) -> None:
        summary = await self.registered("none")
        self.assertEqual(len(self.requests_to("/oauth/token")), 1)
        # 401, initialize, notifications/initialized (202), tools/list,
        # tools/call, and the GET stream the SDK opens; none refused.
        statuses = [r["status"] for r in self.requests_to("/mcp")]
        self.assertEqual(statuses[:2], [401, 200])
        self.assertIn(202, statuses)
        self.assertNotIn(401, statuses[1:])
        self.assertNotIn(500, statuses)
        self.assertIsNone(summary.get("initialize_again"))

    async def test_confidential_client_secret_post(self) -> None:
        await self.registered("client_secret_post")

    async def test_confidential_client_secret_basic(self) -> None:
        await self.registered("client_secret_basic")

    async def test_no_auth_method_means_client_secret_basic(self) -> None:
        """
        RFC 7591 section 2: without C{token_endpoint_auth_method} the
        client gets C{client_secret_basic}; the SDK reads that from the
        registration response and authenticates accordingly.
        """
        self.start_broker()
        summary = await self.run_client("--auth-method", "omit")
        (registration,) = self.requests_to("/oauth/register", "POST")
        self.assertEqual(
            registration["response"]["token_endpoint_auth_method"], "client_secret_basic"
        )
        client_id = registration["response"]["client_id"]
        self.check_flow(summary, client_id, "client_secret_basic")
        await self.check_broker(client_id, "dcr", "client_secret_basic")

    async def refreshed(self, method: str) -> None:
        """
        Access tokens that live one second: the SDK's next request finds its
        token expired, refreshes it at the token endpoint (the refresh token
        rotates) and retries with the new access token, within one grant.
        """
        summary = await self.registered(method, "--again-after", "1.5", access_token_lifetime=1.0)
        tokens = self.requests_to("/oauth/token", "POST")
        self.assertEqual(
            [(t["form"]["grant_type"], t["status"]) for t in tokens],
            [("authorization_code", 200), ("refresh_token", 200)],
        )
        refresh = tokens[1]
        self.assertEqual(refresh["form"]["resource"], self.mcp_url)
        self.assertEqual(refresh["basic"], method == "client_secret_basic")
        self.assertEqual("client_secret" in refresh["form_keys"], method == "client_secret_post")
        self.assertIs(refresh["response"]["refresh_token"], True)
        self.assertEqual(summary["tokens_changed"], {"access_token": True, "refresh_token": True})
        mcp = [(r["bearer"], r["status"]) for r in self.requests_to("/mcp")]
        self.assertEqual(mcp[:2], [(False, 401), (True, WITH_TOKEN)])
        self.assertNotIn((True, 401), mcp)
        # Across the refresh the same session goes on answering.
        self.assertTrue(summary["initialize_again"]["ok"], summary["initialize_again"])
        self.assertEqual(summary["initialize_again"]["echo"], ['{"hello": "world"}'])

    async def test_refresh_public_client(self) -> None:
        await self.refreshed("none")

    async def test_refresh_confidential_client(self) -> None:
        await self.refreshed("client_secret_basic")

    async def test_client_id_metadata_document(self) -> None:
        """
        The SDK's C{client_metadata_url}: no registration; the broker fetches
        the document over https from loopback (with this test's certificate
        as its trust root) and records a C{cimd} client.
        """
        key_pem, cert_pem = self_signed("localhost")
        document = MetadataDocument()
        site = Site(document)
        site.timeOut = None
        port = reactor.listenSSL(
            0, site, PrivateCertificate.loadPEM(key_pem + cert_pem).options(), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        client_id = f"https://localhost:{port.getHost().port}/client.json"
        document.document = {
            "client_id": client_id,
            "client_name": "SDK Metadata Client",
            "redirect_uris": [REDIRECT],
            "grant_types": ["authorization_code", "refresh_token"],
            "response_types": ["code"],
            "token_endpoint_auth_method": "none",
        }
        self.start_broker(tls_trust_root=Certificate.loadPEM(cert_pem))
        summary = await self.run_client("--client-metadata-url", client_id)
        self.assertEqual(self.requests_to("/oauth/register"), [])
        self.check_flow(summary, client_id, "none")
        await self.check_broker(client_id, "cimd", "none")
        self.assertGreaterEqual(document.hits, 1)
        kinds = rows(
            store_location(self.broker.config), "SELECT kind, count(*) FROM clients GROUP BY kind"
        )
        self.assertEqual(kinds, [("cimd", 1)])


class SDKClientOnPostgreSQL(OnPostgreSQL, SDKClientTests):
    """
    The SDK's whole flow (registration or metadata document, login,
    refresh, MCP) with the broker's state in PostgreSQL.
    """
