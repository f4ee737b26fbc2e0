"""
The authorization flow end to end over real sockets: an MCP client's
authorize request, our consent page, the Forgejo stand-in's login, the
callback, and the code handed to the client.
"""

from __future__ import annotations

import json
import sqlite3
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from fjmcp.authorize import AuthorizationFlow
from fjmcp.cimd import ClientMetadataFetcher
from fjmcp.clients import ClientRegistry
from fjmcp.credentials import UpstreamCredentials
from fjmcp.crypto import SecretBox, new_pkce_pair
from fjmcp.standin.model import Forge, seed
from fjmcp.standin.web import StandinForgejo
from fjmcp.store import Store, migrate_database
from fjmcp.upstream import ForgejoClient
from fjmcp.web import BrokerApp
from tests.helpers import listen, make_config

REDIRECT = "http://127.0.0.1:9/callback"


class browser:
    """
    A client that keeps cookies like a browser and does not follow
    redirects on its own, so each hop can be checked.
    """

    def __init__(self) -> None:
        self._http = HTTPClient(
            Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)),
            cookiejar=CookieJar(),  # type: ignore[arg-type]
        )

    def get(self, url: str, **kwargs: Any) -> Any:
        return self._http.get(url, allow_redirects=False, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        return self._http.post(url, allow_redirects=False, **kwargs)


class Broker:
    """
    The broker's routes over a real store, pointed at a stand-in Forgejo.
    """

    def __init__(self, test: TestCase, data: Path | None = None) -> None:
        self.test = test
        self.forgejo_site, self.forgejo_url = listen(test)
        self.forge = Forge(reactor.seconds)
        seed(self.forge)
        self.site, self.url = listen(test)
        self.data = data or Path(test.mktemp()).resolve()
        self.config = make_config(
            str(self.data),
            public_url=self.url,
            forgejo_url=self.forgejo_url,
            forgejo_client_id="fjmcp-broker",
            forgejo_client_secret="gto_brokersecret",
            cimd_allow_loopback=True,
        )
        self.forge.add_app(
            "fjmcp",
            [self.url + "/oauth/callback"],
            confidential=True,
            client_id="fjmcp-broker",
            client_secret="gto_brokersecret",
        )
        standin = StandinForgejo(self.forge, self.forgejo_url, test_login=True)
        self.forgejo_site.resource = standin.resource()
        self.start()

    def start(self) -> None:
        migrate_database(self.config.db_path)
        self.store = Store.open(self.config.db_path, reactor)
        self.test.addCleanup(self.store.close)
        box = SecretBox(self.config.secret_key)
        upstream = ForgejoClient(
            HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))),
            reactor,
            self.config.forgejo_url,
            self.config.forgejo_client_id,
            self.config.forgejo_client_secret,
            self.url + "/oauth/callback",
            self.config.forgejo_scopes,
        )
        self.clients = ClientRegistry(self.store)
        self.credentials = UpstreamCredentials(self.store, box, upstream, reactor)
        flow = AuthorizationFlow(
            self.config,
            self.store,
            self.clients,
            upstream,
            self.credentials,
            box,
            reactor,
            cimd=ClientMetadataFetcher(reactor, allow_loopback=True),
        )
        app = BrokerApp(self.config, self.store, [], reactor, clients=self.clients, flow=flow)
        self.site.resource = app.resource()

    def restart(self) -> None:
        self.store.close()
        self.start()

    async def register(self, **metadata: Any) -> dict[str, Any]:
        body = {"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"}
        body.update(metadata)
        return await self.clients.register(body)


def location(response: Any) -> str:
    return response.headers.getRawHeaders(b"location")[0].decode()


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


class FlowTests(TestCase):
    def setUp(self) -> None:
        self.broker = Broker(self)
        self.browser = browser()
        self.verifier, self.challenge = new_pkce_pair()

    def authorize_url(self, client_id: str, **extra: str) -> str:
        params = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT,
            "code_challenge": self.challenge,
            "code_challenge_method": "S256",
            "state": "client-state-1",
            "scope": "claudeai offline_access",
            "resource": self.broker.url + "/mcp",
        }
        params.update(extra)
        return self.broker.url + "/oauth/authorize?" + urlencode(params)

    async def consent(self, client_id: str, **extra: str) -> tuple[Any, str]:
        response = await self.browser.get(self.authorize_url(client_id, **extra))
        body = (await response.content()).decode()
        return response, body

    async def approve(self, body: str, decision: str = "approve") -> Any:
        token = body.split('name="consent" value="')[1].split('"')[0]
        return await self.browser.post(
            self.broker.url + "/oauth/authorize",
            data={"consent": token, "decision": decision},
        )

    async def through_forgejo(self, upstream_url: str, login: str = "alice") -> str:
        """
        The stand-in signs the user in (test switch) and sends them back.
        """
        response = await self.browser.get(
            upstream_url, headers=Headers({b"X-Standin-Login": [login.encode()]})
        )
        await response.content()
        self.assertEqual(response.code, 303)
        back = location(response)
        self.assertTrue(back.startswith(self.broker.url + "/oauth/callback?"), back)
        response = await self.browser.get(back)
        await response.content()
        self.assertEqual(response.code, 303)
        return location(response)

    async def test_full_flow(self) -> None:
        client = await self.broker.register(client_name="Test <Client>")
        response, body = await self.consent(client["client_id"])
        self.assertEqual(response.code, 200)
        # The page names the client (escaped), where it returns, and Forgejo.
        self.assertIn("Test &lt;Client&gt;", body)
        self.assertIn("127.0.0.1:9", body)
        self.assertIn(self.broker.forgejo_url, body)
        self.assertEqual(response.headers.getRawHeaders(b"x-frame-options"), [b"DENY"])
        csp = response.headers.getRawHeaders(b"content-security-policy")[0]
        self.assertIn(b"frame-ancestors 'none'", csp)
        response = await self.approve(body)
        self.assertEqual(response.code, 303)
        upstream = location(response)
        self.assertTrue(upstream.startswith(self.broker.forgejo_url + "/login/oauth/authorize?"))
        up = query(upstream)
        self.assertEqual(up["code_challenge_method"], "S256")
        self.assertEqual(up["client_id"], "fjmcp-broker")
        self.assertNotEqual(up["state"], "client-state-1")
        final = await self.through_forgejo(upstream)
        self.assertTrue(final.startswith(REDIRECT + "?"))
        back = query(final)
        self.assertEqual(back["state"], "client-state-1")
        self.assertEqual(back["iss"], self.broker.url)
        self.assertTrue(back["code"])
        # One upstream credential for alice, sealed at rest.
        cred = await self.broker.store.get_upstream_credential(1)
        assert cred is not None
        conn = sqlite3.connect(self.broker.config.db_path)
        dump = "\n".join(conn.iterdump())
        conn.close()
        self.assertNotIn(back["code"], dump)
        token = await self.broker.credentials.access_token(1)
        self.assertEqual(self.broker.forge.user_for_access_token(token)[0].login, "alice")  # type: ignore[index]
        self.assertNotIn(token, dump)

    async def test_returning_user_skips_consent(self) -> None:
        client = await self.broker.register()
        _, body = await self.consent(client["client_id"])
        await self.through_forgejo(location(await self.approve(body)))
        # Same browser, same client: straight to Forgejo, no page.
        response, _ = await self.consent(client["client_id"], state="second")
        self.assertEqual(response.code, 303)
        final = await self.through_forgejo(location(response))
        self.assertEqual(query(final)["state"], "second")

    async def test_deny(self) -> None:
        client = await self.broker.register()
        _, body = await self.consent(client["client_id"])
        response = await self.approve(body, decision="deny")
        back = query(location(response))
        self.assertEqual(back["error"], "access_denied")
        self.assertEqual(back["state"], "client-state-1")
        self.assertEqual(back["iss"], self.broker.url)

    async def test_consent_needs_the_same_browser_and_is_single_use(self) -> None:
        client = await self.broker.register()
        _, body = await self.consent(client["client_id"])
        token = body.split('name="consent" value="')[1].split('"')[0]
        stranger = browser()
        response = await stranger.post(
            self.broker.url + "/oauth/authorize", data={"consent": token, "decision": "approve"}
        )
        self.assertEqual(response.code, 400)
        self.assertIn(b"not valid here", await response.content())
        self.assertEqual((await self.approve(body)).code, 303)
        response = await self.approve(body)
        self.assertEqual(response.code, 400)

    async def test_page_errors_never_redirect(self) -> None:
        client = await self.broker.register()
        for url in (
            self.authorize_url("no-such-client"),
            self.authorize_url(client["client_id"], redirect_uri="https://evil.example/cb"),
            self.authorize_url(""),
        ):
            response = await self.browser.get(url)
            body = await response.content()
            self.assertEqual(response.code, 400, url)
            self.assertIsNone(response.headers.getRawHeaders(b"location"))
            self.assertIn(b"<html", body)

    async def test_redirected_errors(self) -> None:
        client = await self.broker.register()
        cases = [
            ({"code_challenge_method": "plain"}, "invalid_request"),
            ({"code_challenge": ""}, "invalid_request"),
            ({"response_type": "token"}, "unsupported_response_type"),
            ({"resource": "https://elsewhere.example/mcp"}, "invalid_target"),
        ]
        for extra, error in cases:
            response = await self.browser.get(self.authorize_url(client["client_id"], **extra))
            await response.content()
            self.assertEqual(response.code, 303, extra)
            back = query(location(response))
            self.assertEqual(back["error"], error, extra)
            self.assertEqual(back["state"], "client-state-1")
            self.assertEqual(back["iss"], self.broker.url)

    async def test_tolerant_parts(self) -> None:
        """
        A resource with a trailing slash, no resource at all, unknown scopes
        and a loopback redirect on another port are all fine.
        """
        client = await self.broker.register()
        for extra in (
            {"resource": self.broker.url + "/mcp/"},
            {"scope": "claudeai"},
            {"redirect_uri": "http://127.0.0.1:45678/callback"},
        ):
            response, _ = await self.consent(client["client_id"], **extra)
            self.assertEqual(response.code, 200, extra)
        url = self.authorize_url(client["client_id"]).replace("&resource=", "&x=")
        response = await self.browser.get(url)
        await response.content()
        self.assertEqual(response.code, 200)

    async def test_callback_unknown_or_replayed(self) -> None:
        response = await self.browser.get(self.broker.url + "/oauth/callback?state=nope&code=x")
        self.assertEqual(response.code, 400)
        self.assertIn(b"expired", await response.content())
        client = await self.broker.register()
        _, body = await self.consent(client["client_id"])
        upstream = location(await self.approve(body))
        response = await self.browser.get(
            upstream, headers=Headers({b"X-Standin-Login": [b"alice"]})
        )
        await response.content()
        back = location(response)
        first = await self.browser.get(back)
        await first.content()
        self.assertEqual(first.code, 303)
        again = await self.browser.get(back)
        await again.content()
        self.assertEqual(again.code, 400)

    async def test_restart_in_the_middle_of_a_login(self) -> None:
        """
        The broker restarts while the user is at Forgejo: the login goes on.
        """
        client = await self.broker.register()
        _, body = await self.consent(client["client_id"])
        upstream = location(await self.approve(body))
        self.broker.restart()
        final = await self.through_forgejo(upstream)
        self.assertIn("code", query(final))

    async def test_forgejo_denial(self) -> None:
        client = await self.broker.register()
        _, body = await self.consent(client["client_id"])
        upstream = query(location(await self.approve(body)))
        response = await self.browser.get(
            self.broker.url
            + "/oauth/callback?"
            + urlencode({"state": upstream["state"], "error": "access_denied"})
        )
        await response.content()
        back = query(location(response))
        self.assertEqual(back["error"], "access_denied")
        self.assertEqual(back["state"], "client-state-1")


class MetadataDocumentTests(TestCase):
    async def test_client_id_metadata_document(self) -> None:
        """
        A client known by the URL of its metadata document (served here on
        loopback, which a test-only setting allows).
        """
        broker = Broker(self)
        doc_site, doc_url = listen(self)
        client_id = doc_url + "/client.json"

        class Doc(Resource):
            isLeaf = True

            def render_GET(self, request: Any) -> bytes:
                request.setHeader(b"content-type", b"application/json")
                return json.dumps(
                    {
                        "client_id": client_id,
                        "client_name": "Metadata Client",
                        "redirect_uris": [REDIRECT],
                        "token_endpoint_auth_method": "none",
                        "grant_types": ["authorization_code", "refresh_token"],
                    }
                ).encode()

        doc_site.resource = Doc()
        _, challenge = new_pkce_pair()
        b = browser()
        response = await b.get(
            broker.url
            + "/oauth/authorize?"
            + urlencode(
                {
                    "response_type": "code",
                    "client_id": client_id,
                    "redirect_uri": REDIRECT,
                    "code_challenge": challenge,
                    "code_challenge_method": "S256",
                }
            )
        )
        body = await response.content()
        self.assertEqual(response.code, 200, body)
        self.assertIn(b"Metadata Client", body)
        record = await broker.store.get_client(client_id)
        assert record is not None
        self.assertEqual(record.kind, "cimd")
