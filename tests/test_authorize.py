"""
The authorization flow end to end over real sockets: an MCP client's
authorize request, our consent page, the Forgejo stand-in's login, the
callback, and the code handed to the client.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from twisted.trial.unittest import TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource

from fjmcp.app.tap import store_location
from fjmcp.secrets.crypto import new_pkce_pair
from tests.broker_support import REDIRECT, Broker, BrokerTestCase, browser, location, query
from tests.helpers import listen
from tests.store_engines import OnPostgreSQL, rows
from tests.store_engines import dump as database_dump


def client_metadata(redirect_uris: list[str], **extra: Any) -> dict[str, Any]:
    """
    Stored metadata of a public client, as the store takes it.
    """
    return {
        "redirect_uris": redirect_uris,
        "token_endpoint_auth_method": "none",
        "grant_types": ["authorization_code"],
        "response_types": ["code"],
        **extra,
    }


def serve_document(test: TestCase, document: Callable[[str], dict[str, Any]]) -> str:
    """
    Serve C{document(client_id)} as a client ID metadata document on
    loopback; returns the client_id, its URL.
    """
    doc_site, doc_url = listen(test)
    client_id = doc_url + "/client.json"
    body = json.dumps(document(client_id)).encode()

    class Doc(Resource):
        isLeaf = True

        def render_GET(self, request: Any) -> bytes:
            request.setHeader(b"content-type", b"application/json")
            return body

    doc_site.resource = Doc()
    return client_id


def authorize_query(client_id: str, redirect_uri: str = REDIRECT) -> str:
    _, challenge = new_pkce_pair()
    return urlencode(
        {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": redirect_uri,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
        }
    )


class FlowTests(BrokerTestCase):
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
        dump = database_dump(store_location(self.broker.config))
        self.assertNotIn(back["code"].encode(), dump)
        token = await self.broker.credentials.access_token(1)
        self.assertEqual(self.broker.forge.user_for_access_token(token)[0].login, "alice")  # type: ignore[index]
        self.assertNotIn(token.encode(), dump)

    async def test_returning_user_skips_consent(self) -> None:
        client = await self.broker.register()
        _, body = await self.consent(client["client_id"])
        await self.through_forgejo(location(await self.approve(body)))
        # Same browser, same client: straight to Forgejo, no page.
        response, _ = await self.consent(client["client_id"], state="second")
        self.assertEqual(response.code, 303)
        final = await self.through_forgejo(location(response))
        self.assertEqual(query(final)["state"], "second")

    async def test_prompt_consent_asks_again(self) -> None:
        client = await self.broker.register()
        _, body = await self.consent(client["client_id"])
        await self.through_forgejo(location(await self.approve(body)))
        # The user approved before, but the client asks for the page.
        response, body = await self.consent(client["client_id"], state="again", prompt="consent")
        self.assertEqual(response.code, 200)
        self.assertIn('name="consent"', body)
        final = await self.through_forgejo(location(await self.approve(body)))
        self.assertEqual(query(final)["state"], "again")

    async def test_login_whose_verifier_no_longer_opens(self) -> None:
        """
        A login in flight whose sealed verifier no longer opens (its key was
        retired from the key file) ends as an expired login, not a 500.
        """
        client = await self.broker.register()
        _, body = await self.consent(client["client_id"])
        upstream = location(await self.approve(body))
        rows(
            store_location(self.broker.config),
            "UPDATE forgejo_logins SET verifier_enc = ?",
            (b"\x02" + bytes(8) + bytes(12) + bytes(32),),
        )
        response = await self.browser.get(
            upstream, headers=Headers({b"X-Standin-Login": [b"alice"]})
        )
        await response.content()
        response = await self.browser.get(location(response))
        page = (await response.content()).decode()
        self.assertEqual(response.code, 400)
        self.assertIn("Sign-in expired", page)

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

    async def test_consent_page_shows_the_host_only(self) -> None:
        """
        A client registered before user info was refused: the page names
        the host the browser will really go to, not the user info that
        reads like one.
        """
        sneaky = "https://claude.ai@evil.example/api/mcp/auth_callback"
        await self.broker.store.create_client(
            "fjmcp-registered-long-ago", "dcr", None, client_metadata([sneaky])
        )
        response, body = await self.consent("fjmcp-registered-long-ago", redirect_uri=sneaky)
        self.assertEqual(response.code, 200, body)
        self.assertIn("sent back to\n<b>evil.example</b>", body)
        self.assertNotIn("claude.ai", body)

    async def test_consent_page_strips_format_characters_from_the_name(self) -> None:
        """
        A right-to-left override, zero-width and isolate characters in a
        client's name would make the page show something other than the
        name's letters (U+202E turns what follows around): they are left out.
        """
        client = await self.broker.register(
            client_name="Cla\u200bude\u2066 Desktop\u2069\u202e\u0085 gpj.exe"
        )
        response, body = await self.consent(client["client_id"])
        self.assertEqual(response.code, 200)
        self.assertIn("<b>Claude Desktop gpj.exe</b> wants to use", body)
        for character in "\u200b\u2066\u2069\u202e\u0085":
            self.assertNotIn(character, body)
        # Nothing left to show: the page says so instead of showing nothing.
        client = await self.broker.register(client_name="\u202e\u200b")
        _, body = await self.consent(client["client_id"])
        self.assertIn("<b>An unnamed application</b>", body)

    async def test_form_and_query_text_is_utf_8(self) -> None:
        """
        The consent form is read as UTF-8, raw or percent-encoded; a form or
        a query that is not UTF-8 gets a 400 page that says so, not a 500
        (a form) or a silently dropped field (a query).
        """
        client = await self.broker.register()
        url = self.broker.url + "/oauth/authorize"
        form = Headers({b"Content-Type": [b"application/x-www-form-urlencoded"]})

        async def post(note: bytes) -> tuple[Any, bytes]:
            _, body = await self.consent(client["client_id"])
            token = body.split('name="consent" value="')[1].split('"')[0].encode()
            data = b"consent=" + token + b"&decision=approve&note=" + note
            response = await self.browser.post(url, data=data, headers=form)
            return response, await response.content()

        for note in ("é".encode(), b"%C3%A9", "中文+✓".encode()):
            response, _ = await post(note)
            self.assertEqual(response.code, 303, note)
            self.assertTrue(location(response).startswith(self.broker.forgejo_url), note)
        for note in (b"\xff", b"%FF", b"\xc3", b"%C3"):
            response, page = await post(note)
            self.assertEqual(response.code, 400, note)
            self.assertIn(b"not UTF-8", page)
        response = await self.browser.get(self.authorize_url(client["client_id"]) + "&prompt=%FF")
        self.assertEqual(response.code, 400)
        self.assertIn(b"not UTF-8", await response.content())
        self.assertEqual(self.flushLoggedErrors(), [])

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
        await self.broker.restart()
        final = await self.through_forgejo(upstream)
        self.assertIn("code", query(final))

    async def test_the_login_is_finished_only_by_the_browser_that_left(self) -> None:
        """
        Someone who lures another person through Forgejo's login with their
        own approved authorization gets nothing: the return lands in the
        other browser, which never approved it.
        """
        client = await self.broker.register()
        _, body = await self.consent(client["client_id"])
        upstream = location(await self.approve(body))
        victim = browser()
        response = await victim.get(upstream, headers=Headers({b"X-Standin-Login": [b"bob"]}))
        await response.content()
        back = location(response)
        response = await victim.get(back)
        page = (await response.content()).decode()
        self.assertEqual(response.code, 400)
        self.assertIn("Sign-in expired", page)
        self.assertIsNone(response.headers.getRawHeaders(b"location"))
        # Used up: the browser that did leave cannot finish it either.
        response = await self.browser.get(back)
        await response.content()
        self.assertEqual(response.code, 400)

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

    async def test_document_with_a_lone_surrogate(self) -> None:
        """
        A metadata document whose name is not Unicode (a lone surrogate
        escape) is refused on the page, not answered with a 500.
        """
        broker = Broker(self)
        client_id = serve_document(
            self,
            lambda url: {"client_id": url, "client_name": "\ud800", "redirect_uris": [REDIRECT]},
        )
        response = await browser().get(
            broker.url + "/oauth/authorize?" + authorize_query(client_id)
        )
        body = (await response.content()).decode()
        self.assertEqual(response.code, 400, body)
        self.assertIn("surrogate", body)
        self.assertIsNone(await broker.store.get_client(client_id))
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_document_with_user_info_in_a_redirect_uri(self) -> None:
        """
        A metadata document is held to the registration rules: user info in
        a redirect URI is refused, with the reason.
        """
        broker = Broker(self)
        sneaky = "https://claude.ai@evil.example/api/mcp/auth_callback"
        client_id = serve_document(
            self, lambda url: {"client_id": url, "client_name": "Claude", "redirect_uris": [sneaky]}
        )
        response = await browser().get(
            broker.url + "/oauth/authorize?" + authorize_query(client_id, sneaky)
        )
        body = (await response.content()).decode()
        self.assertEqual(response.code, 400, body)
        self.assertIn("user info", body)
        self.assertIsNone(await broker.store.get_client(client_id))


class FlowOnPostgreSQL(OnPostgreSQL, FlowTests):
    """
    Consent, the Forgejo round trip and the code exchange with every login
    in flight in PostgreSQL (any node may finish it).
    """
