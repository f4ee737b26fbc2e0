"""
The connections page: a person signed in to the broker sees the MCP
clients they approved and revokes any of them, over real HTTP with the
Forgejo stand-in's login.
"""

from __future__ import annotations

import html
import unicodedata
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from fjmcp.http.pages import connections_page, for_people
from fjmcp.http.ratelimit import Limit, RateLimiter
from fjmcp.oauth.connections import FORM_LIFETIME, Connection, Connections, cross_site
from fjmcp.secrets.crypto import new_token, token_hash
from fjmcp.store import Store, UpstreamUser, make_pool, migrate_database
from tests.broker_support import REDIRECT, browser, location
from tests.helpers import make_config, routes_over
from tests.test_authorize import client_metadata
from tests.test_sessions import SessionTestCase, request, within

HOSTILE = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'


def shown(text: str) -> str:
    """
    C{text} as a page's text shows it: C{&}, C{<} and C{>} as entities
    (quotes are only escaped in attribute values).
    """
    return html.escape(text, quote=False)


def form_token(body: str) -> str:
    return body.split('name="csrf" value="')[1].split('"')[0]


class ConnectionsPageTests(SessionTestCase):
    async def page(self, who: Any = None) -> tuple[Any, str]:
        response = await (who or self.browser).get(self.broker.url + "/connections")
        return response, (await response.content()).decode()

    async def revoke(
        self, client_id: str, token: str, who: Any = None, origin: bytes | None = None, **extra: Any
    ) -> Any:
        headers = {} if origin is None else {b"Origin": [origin]}
        response = await (who or self.browser).post(
            self.broker.url + "/connections/revoke",
            data={"csrf": token, "client_id": client_id, **extra},
            headers=Headers(headers),
        )
        await response.content()
        return response

    async def sign_in_as(self, login: str) -> Any:
        """
        A fresh browser that signs in through the connections page itself.
        """
        mine = browser()
        response = await mine.get(self.broker.url + "/connections")
        await response.content()
        self.assertEqual(response.code, 303)
        to_forgejo = location(response)
        self.assertTrue(to_forgejo.startswith(self.broker.forgejo_url), to_forgejo)
        response = await mine.get(
            to_forgejo, headers=Headers({b"X-Standin-Login": [login.encode()]})
        )
        await response.content()
        back = location(response)
        self.assertTrue(back.startswith(self.broker.url + "/oauth/callback?"), back)
        response = await mine.get(back)
        await response.content()
        self.assertEqual(response.code, 303)
        self.assertEqual(location(response), self.broker.url + "/connections")
        return mine

    async def test_see_and_revoke_one_of_two_clients(self) -> None:
        one = await self.login_tokens("alice", client_name="Client One")
        two = await self.login_tokens("alice", client_name=HOSTILE)
        one_session = await self.open_session(one["access_token"])
        two_session = await self.open_session(two["access_token"])
        one_child = self.session_object(one_session).child

        response, body = await self.page()
        self.assertEqual(response.code, 200)
        self.assertIn("Client One", body)
        self.assertIn(shown(HOSTILE), body)
        self.assertNotIn("<script>", body)
        self.assertNotIn("<img", body)
        self.assertIn("<b>alice</b>", body)
        self.assertIn("<code>127.0.0.1:9</code>", body)
        self.assertIn(one["client"]["client_id"], body)
        self.assertEqual(body.count(">Revoke</button>"), 2)
        headers = response.headers
        self.assertEqual(headers.getRawHeaders(b"x-frame-options"), [b"DENY"])
        csp = headers.getRawHeaders(b"content-security-policy")[0]
        self.assertIn(b"frame-ancestors 'none'", csp)
        self.assertIn(b"default-src 'none'", csp)
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-store"])

        # A returning user is not asked again ... until they revoke.
        response, _ = await self.consent(one["client"]["client_id"])
        self.assertEqual(response.code, 303)

        response = await self.revoke(
            one["client"]["client_id"], form_token(body), origin=self.broker.url.encode()
        )
        self.assertEqual(response.code, 303)
        self.assertEqual(location(response), self.broker.url + "/connections?revoked=1")

        # Its session ended at once, its child is gone, its token is refused.
        self.assertFalse(self.live(one_session))
        await within(one_child.protocol.exited)
        refused = await self.post(one["access_token"], request(5, "tools/list"), one_session)
        self.assertEqual(refused.code, 401)
        refresh = await self.browser.post(
            self.broker.url + "/oauth/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": one["refresh_token"],
                "client_id": one["client"]["client_id"],
            },
        )
        self.assertEqual((await refresh.json())["error"], "invalid_grant")
        # Its approval is forgotten: the consent page shows again.
        response, consent = await self.consent(one["client"]["client_id"])
        self.assertEqual(response.code, 200)
        self.assertIn('name="consent"', consent)

        # The other client goes on.
        self.assertTrue(self.live(two_session))
        await self.rpc(two["access_token"], two_session, request(6, "tools/list"))
        response = await self.browser.get(self.broker.url + "/connections?revoked=1")
        body = (await response.content()).decode()
        self.assertNotIn("Client One", body)
        self.assertIn(shown(HOSTILE), body)
        self.assertIn("Access revoked", body)

    async def test_another_users_page_never_shows_them(self) -> None:
        alices = await self.login_tokens("alice", client_name="Alice's Assistant")
        alice_session = await self.open_session(alices["access_token"])
        bob = await self.sign_in_as("bob")
        response, body = await self.page(bob)
        self.assertEqual(response.code, 200)
        self.assertIn("<b>bob</b>", body)
        self.assertNotIn("Alice", body)
        self.assertIn("not connected any application", body)

        # Bob approves a client of his own in his browser.
        alice_browser, self.browser = self.browser, bob
        await self.login_tokens("bob", client_name="Bob's Bot")
        self.browser = alice_browser
        _, body = await self.page(bob)
        self.assertIn(shown("Bob's Bot"), body)
        self.assertNotIn("Alice", body)
        # Bob's own form, naming Alice's client, revokes nothing of hers.
        response = await self.revoke(alices["client"]["client_id"], form_token(body), who=bob)
        self.assertEqual(response.code, 303)
        self.assertTrue(self.live(alice_session))
        await self.rpc(alices["access_token"], alice_session, request(2, "tools/list"))
        _, body = await self.page()
        self.assertIn(shown("Alice's Assistant"), body)
        self.assertNotIn("Bob", body)

    async def test_sign_in_through_forgejo_lands_on_the_page(self) -> None:
        await self.login_tokens("carol", client_name="Carol's Client")
        carol = await self.sign_in_as("carol")
        response, body = await self.page(carol)
        self.assertEqual(response.code, 200)
        self.assertIn(shown("Carol's Client"), body)

    async def test_a_sign_in_comes_back_only_to_its_browser(self) -> None:
        mine = browser()
        response = await mine.get(self.broker.url + "/connections")
        await response.content()
        response = await mine.get(
            location(response), headers=Headers({b"X-Standin-Login": [b"alice"]})
        )
        await response.content()
        # Another browser (no binding cookie) brings the callback back.
        response = await browser().get(location(response))
        body = (await response.content()).decode()
        self.assertEqual(response.code, 400)
        self.assertIn("Sign-in expired", body)
        self.assertIsNone(response.headers.getRawHeaders(b"set-cookie"))

    async def test_forged_posts_are_refused(self) -> None:
        one = await self.login_tokens("alice", client_name="Client One")
        session_id = await self.open_session(one["access_token"])
        client_id = one["client"]["client_id"]
        _, body = await self.page()
        token = form_token(body)

        for origin in (b"https://evil.example", self.broker.url.encode() + b".evil.example"):
            response = await self.revoke(client_id, token, origin=origin)
            self.assertEqual(response.code, 403, origin)
        response = await self.browser.post(
            self.broker.url + "/connections/revoke",
            data={"csrf": token, "client_id": client_id},
            headers=Headers({b"Sec-Fetch-Site": [b"cross-site"]}),
        )
        await response.content()
        self.assertEqual(response.code, 403)
        self.assertEqual((await self.revoke(client_id, "")).code, 403)
        self.assertEqual((await self.revoke(client_id, "not-a-token")).code, 403)
        # Without the login cookie, a valid token is worth nothing.
        self.assertEqual((await self.revoke(client_id, token, who=browser())).code, 403)
        # Nothing happened so far.
        self.assertTrue(self.live(session_id))

        # The real thing works once; the same form token a second time does not.
        self.assertEqual((await self.revoke(client_id, token)).code, 303)
        self.assertFalse(self.live(session_id))
        self.assertEqual((await self.revoke(client_id, token)).code, 403)

    async def test_the_page_shows_only_hosts(self) -> None:
        """
        A client registered before user info was refused: the page names
        the host it sends people back to, not the user info that reads like
        one.
        """
        sneaky = "https://claude.ai@evil.example/api/mcp/auth_callback"
        await self.broker.store.create_client(
            "fjmcp-registered-long-ago", "dcr", None, client_metadata([REDIRECT, sneaky])
        )
        _, consent = await self.consent("fjmcp-registered-long-ago")
        await self.through_forgejo(location(await self.approve(consent)))
        _, body = await self.page()
        self.assertIn("<code>127.0.0.1:9</code>, <code>evil.example</code>", body)
        self.assertNotIn("claude.ai", body)

    async def test_revoke_form_text_is_utf_8(self) -> None:
        """
        The revoke form is read as UTF-8, raw or percent-encoded; one that is
        not UTF-8 gets a 400 page that says so, not a 500.
        """
        await self.login_tokens("alice", client_name="Client One")
        form = Headers({b"Content-Type": [b"application/x-www-form-urlencoded"]})

        async def post(client_id: bytes) -> tuple[Any, bytes]:
            _, body = await self.page()
            data = b"csrf=" + form_token(body).encode() + b"&client_id=" + client_id
            response = await self.browser.post(
                self.broker.url + "/connections/revoke", data=data, headers=form
            )
            return response, await response.content()

        for client_id in ("clé".encode(), b"cl%C3%A9"):
            response, _ = await post(client_id)
            self.assertEqual(response.code, 303, client_id)
        for client_id in (b"\xff", b"%FF", b"cl\xe9"):
            response, page = await post(client_id)
            self.assertEqual(response.code, 400, client_id)
            self.assertIn(b"not UTF-8", page)
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_a_sign_in_in_flight_survives_a_restart(self) -> None:
        """
        The connections page's Forgejo sign-in is stored like a client's: a
        broker restart while the person is at Forgejo costs nothing.
        """
        mine = browser()
        response = await mine.get(self.broker.url + "/connections")
        await response.content()
        to_forgejo = location(response)
        await self.broker.restart()
        response = await mine.get(to_forgejo, headers=Headers({b"X-Standin-Login": [b"alice"]}))
        await response.content()
        response = await mine.get(location(response))
        await response.content()
        self.assertEqual(location(response), self.broker.url + "/connections")
        _, page = await self.page(mine)
        self.assertIn("alice", page)

    async def test_a_token_belongs_to_the_login_session_it_was_shown_to(self) -> None:
        await self.login_tokens("alice", client_name="Client One")
        _, body = await self.page()
        other = await self.sign_in_as("alice")
        # Same user, another browser: the form token is not theirs.
        response = await self.revoke("whatever", form_token(body), who=other)
        self.assertEqual(response.code, 403)


class FormTokenTests(TestCase):
    async def connections(self) -> tuple[Connections, Clock, list[str]]:
        """
        The connections page's domain over a real store on a fake clock, and
        two users' login sessions (alice's twice).
        """
        clock = Clock()
        clock.advance(1000)
        config = make_config(self.mktemp())
        migrate_database(config.db_path)
        store = Store(make_pool(config.db_path), clock, config.db_path)
        self.addCleanup(store.close)
        logins = []
        for user_id, login in [(1, "alice"), (1, "alice"), (2, "bob")]:
            await store.replace_upstream_credential(
                UpstreamUser(user_id, login, ""), b"sealed", None, 9e9, ""
            )
            session = new_token()
            await store.create_login_session(token_hash(session), user_id, 9e9)
            logins.append(session)
        return Connections(store, None, None, clock), clock, logins  # type: ignore[arg-type]

    async def test_single_use_bound_and_expiring(self) -> None:
        c, clock, (alice, alice_elsewhere, bob) = await self.connections()
        token = await c.form_token(alice)
        # Presented with another user's id: used up all the same.
        self.assertFalse(await c.take_form_token(token, 2, alice))
        self.assertFalse(await c.take_form_token(token, 1, alice))
        # Another login session (alice in another browser, or bob) cannot
        # use it; the session it was shown to can, once.
        token = await c.form_token(alice)
        self.assertFalse(await c.take_form_token(token, 1, alice_elsewhere))
        self.assertFalse(await c.take_form_token(token, 2, bob))
        self.assertTrue(await c.take_form_token(token, 1, alice))
        self.assertFalse(await c.take_form_token(token, 1, alice))
        self.assertFalse(await c.take_form_token("", 1, alice))
        token = await c.form_token(alice)
        clock.advance(FORM_LIFETIME + 1)
        self.assertFalse(await c.take_form_token(token, 1, alice))

    def test_cross_site(self) -> None:
        ours = "https://mcp.example.org"
        for origin, site in [
            (None, None),
            (ours, None),
            ("HTTPS://MCP.example.org", "same-origin"),
            # A browser's own form post under a no-referrer policy.
            ("null", "same-origin"),
            (None, "none"),
        ]:
            self.assertFalse(cross_site(origin, site, ours), (origin, site))
        for origin, site in [
            ("https://evil.example", None),
            ("https://mcp.example.org:8443", None),
            ("http://mcp.example.org", None),
            ("null", "cross-site"),
            (ours, "same-site"),
            (None, "cross-site"),
        ]:
            self.assertTrue(cross_site(origin, site, ours), (origin, site))

    def test_page_strips_format_characters_from_names(self) -> None:
        page = connections_page(
            user_login="alice",
            forgejo_url="http://f",
            connections=[
                Connection("c1", "Safe\u202eexe.pdf", True, ("a.example",), None, None, 1, 0),
                Connection("c2", "\u2067\u200d", True, ("b.example\u202e",), None, None, 1, 0),
            ],
            form_token="t",
            action="/connections/revoke",
        ).decode()
        self.assertIn("<b>Safeexe.pdf</b>", page)
        self.assertIn("<b>An unnamed application</b>", page)
        self.assertIn("<code>b.example</code>", page)
        for character in "\u202e\u2067\u200d":
            self.assertNotIn(character, page)

    @given(st.text())
    def test_shown_text_has_no_invisible_characters(self, text: str) -> None:
        """
        What pages show of a name: no control or format characters, no
        line breaks of its own, and cleaning it again changes nothing.
        """
        shown = for_people(text)
        for character in shown:
            self.assertNotIn(unicodedata.category(character), ("Cc", "Cf", "Cs", "Zl", "Zp"))
        self.assertEqual(for_people(shown), shown)

    def test_page_escapes_everything(self) -> None:
        page = connections_page(
            user_login="<b>x</b>",
            forgejo_url="http://f",
            connections=[
                Connection(HOSTILE, HOSTILE, True, (HOSTILE,), None, 0.0, 1, 0),
            ],
            form_token='"><script>',
            action="/connections/revoke",
        ).decode()
        self.assertNotIn("<script>", page)
        self.assertNotIn("<img", page)
        self.assertNotIn("<b>x</b>", page)
        self.assertIn("never", page)


class RevokeLimitTests(SynchronousTestCase):
    def test_revoke_posts_are_rate_limited(self) -> None:
        """
        Anyone can post to /connections/revoke (it is refused later, once
        the login cookie and form token are looked up): it counts against
        the same per-address limit as the other pages.
        """
        clock = Clock()
        app = routes_over(
            make_config(self.mktemp()),
            clock,
            connections=Connections(None, None, None, clock),  # type: ignore[arg-type]
            limiter=RateLimiter(clock, {"authorize": Limit(per_minute=1, burst=2)}),
        )
        stub = StubTreq(app.resource())
        codes = []
        for _ in range(3):
            d = stub.post(
                "https://mcp.example.org/connections/revoke",
                data=b"csrf=x&client_id=y",
                headers={b"Content-Type": [b"application/x-www-form-urlencoded"]},
            )
            stub.flush()
            response = self.successResultOf(d)
            page = self.successResultOf(response.content())
            codes.append(response.code)
        self.assertEqual(codes, [403, 403, 429])
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"60"])
        self.assertIn(b"Too many requests", page)
