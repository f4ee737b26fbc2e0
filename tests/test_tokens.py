"""
The token endpoint, revocation and bearer checking, as MCP clients meet
them: over a real loopback server, with a real store, and a fake clock for
the token service (the database still runs in the real reactor's pool).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import attrs
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.http_headers import Headers

from fjmcp.config import Config
from fjmcp.http.gate import www_authenticate
from fjmcp.oauth.clients import ClientRegistry
from fjmcp.oauth.tokens import (
    AccessGrant,
    InvalidTokenError,
    MissingTokenError,
    TokenService,
    parse_form,
)
from fjmcp.secrets.crypto import new_pkce_pair, token_hash
from fjmcp.store import Store, UpstreamUser
from tests.helpers import http_client, make_config, routes_over, serve, token_service
from tests.store_engines import OnPostgreSQL, database_overrides, migrated
from tests.store_engines import dump as database_dump

FORM = "application/x-www-form-urlencoded"
REDIRECT = "http://127.0.0.1:33418/callback"
USER = 7
START = 1_700_000_000.0


def basic(client_id: str, secret: str) -> str:
    raw = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return "Basic " + base64.b64encode(raw).decode()


class TokenTestBase(TestCase):
    """
    A broker serving the token routes over a real store; the token service
    reads time from C{self.clock}.
    """

    grace = 60.0

    def setUp(self) -> None:
        self.tmp = Path(self.mktemp()).resolve()
        self.config = make_config(
            str(self.tmp),
            access_token_lifetime=3600.0,
            refresh_token_lifetime=30 * 86400.0,
            refresh_grace_period=self.grace,
            **database_overrides(self),
        )
        self.location = migrated(self.config)
        self.store = Store.open(self.location, reactor)
        self.addCleanup(self.store.close)
        self.clock = task.Clock()
        self.clock.advance(START)
        self.clients = ClientRegistry(self.store)
        self.tokens = token_service(self.store, self.config, self.clock)
        app = routes_over(
            self.config, reactor, self.store, clients=self.clients, tokens=self.tokens
        )
        self.url = serve(self, app.resource())
        self.http = http_client()

    # --- helpers

    async def register(
        self, method: str = "none", redirects: tuple[str, ...] = (REDIRECT,)
    ) -> dict[str, Any]:
        return await self.clients.register(
            {
                "redirect_uris": list(redirects),
                "token_endpoint_auth_method": method,
                "grant_types": ["authorization_code", "refresh_token"],
                "client_name": f"test {method}",
            }
        )

    async def new_code(
        self,
        client: dict[str, Any],
        scope: str = "mcp offline_access",
        resource: str | None = None,
        redirect_uri: str = REDIRECT,
        user: int = USER,
    ) -> tuple[str, str]:
        await self.store.replace_upstream_credential(
            UpstreamUser(user, f"user{user}"), b"x", None, 0.0, ""
        )
        verifier, challenge = new_pkce_pair()
        code = await self.tokens.issue_code(
            client["client_id"],
            user,
            redirect_uri,
            challenge,
            scope,
            resource or self.config.mcp_url,
        )
        return code, verifier

    def client_auth(
        self, client: dict[str, Any], form: dict[str, str], headers: dict[str, str]
    ) -> None:
        method = client["token_endpoint_auth_method"]
        if method == "client_secret_basic":
            headers["Authorization"] = basic(client["client_id"], client["client_secret"])
        else:
            form["client_id"] = client["client_id"]
            if method == "client_secret_post":
                form["client_secret"] = client["client_secret"]

    async def post(
        self,
        path: str,
        form: dict[str, str] | bytes,
        headers: dict[str, str] | None = None,
        content_type: str | None = FORM,
    ) -> tuple[int, Any, Headers]:
        hdrs = dict(headers or {})
        if content_type is not None:
            hdrs["Content-Type"] = content_type
        data = form if isinstance(form, bytes) else urlencode(form).encode()
        response = await self.http.post(
            self.url + path,
            data=data,
            headers=Headers({k.encode(): [v.encode()] for k, v in hdrs.items()}),
        )
        text = await response.content()
        return response.code, json.loads(text) if text else None, response.headers

    async def token(self, client: dict[str, Any] | None, **params: str) -> tuple[int, Any, Headers]:
        form = dict(params)
        headers: dict[str, str] = {}
        if client is not None:
            self.client_auth(client, form, headers)
        return await self.post("/oauth/token", form, headers)

    async def exchange(
        self, client: dict[str, Any], code: str, verifier: str | None, **extra: str
    ) -> tuple[int, Any, Headers]:
        params = {"grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT}
        if verifier is not None:
            params["code_verifier"] = verifier
        params.update(extra)
        return await self.token(client, **params)

    async def refresh(
        self, client: dict[str, Any], refresh_token: str, **extra: str
    ) -> tuple[int, Any, Headers]:
        return await self.token(
            client, grant_type="refresh_token", refresh_token=refresh_token, **extra
        )

    async def login(self, client: dict[str, Any], **code_args: Any) -> dict[str, Any]:
        code, verifier = await self.new_code(client, **code_args)
        status, body, _ = await self.exchange(client, code, verifier)
        self.assertEqual(status, 200, body)
        return dict(body)

    async def revoke(
        self, client: dict[str, Any], token: str, **extra: str
    ) -> tuple[int, Any, Headers]:
        form = {"token": token, **extra}
        headers: dict[str, str] = {}
        self.client_auth(client, form, headers)
        return await self.post("/oauth/revoke", form, headers)

    async def assert_error(
        self, result: tuple[int, Any, Headers], status: int, error: str, needle: str = ""
    ) -> None:
        code, body, headers = result
        self.assertEqual((code, body["error"]), (status, error), body)
        self.assertIn(needle, body.get("error_description", ""))
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-store"])
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])

    async def assert_invalid(self, access_token: str, needle: str) -> None:
        with self.assertRaises(InvalidTokenError) as cm:
            await self.tokens.check_bearer("Bearer " + access_token)
        self.assertIn(needle, cm.exception.description)


class CodeExchangeTests(TokenTestBase):
    async def check_happy_path(self, method: str) -> None:
        client = await self.register(method)
        code, verifier = await self.new_code(client)
        status, body, headers = await self.exchange(client, code, verifier)
        self.assertEqual(status, 200, body)
        self.assertEqual(
            set(body), {"access_token", "token_type", "expires_in", "refresh_token", "scope"}
        )
        self.assertEqual(body["token_type"], "Bearer")
        self.assertEqual(body["expires_in"], 3600)
        self.assertEqual(body["scope"], "mcp offline_access")
        self.assertNotEqual(body["access_token"], body["refresh_token"])
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-store"])
        self.assertEqual(headers.getRawHeaders(b"pragma"), [b"no-cache"])
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        self.assertEqual(headers.getRawHeaders(b"access-control-allow-origin"), [b"*"])
        self.assertIsNone(headers.getRawHeaders(b"www-authenticate"))
        grant = await self.tokens.check_bearer("Bearer " + body["access_token"])
        self.assertEqual(grant.forgejo_user_id, USER)
        self.assertEqual(grant.client_id, client["client_id"])
        self.assertEqual(grant.scope, "mcp offline_access")
        families = await self.store.list_families(forgejo_user_id=USER)
        self.assertEqual([f.family_id for f in families], [grant.family_id])

    async def test_public_client(self) -> None:
        await self.check_happy_path("none")

    async def test_client_secret_post(self) -> None:
        await self.check_happy_path("client_secret_post")

    async def test_client_secret_basic(self) -> None:
        await self.check_happy_path("client_secret_basic")

    async def test_either_secret_method_works(self) -> None:
        """
        Both methods prove the same secret; a client that registered one and
        uses the other is served.
        """
        client = await self.register("client_secret_basic")
        code, verifier = await self.new_code(client)
        status, body, _ = await self.exchange(
            {**client, "token_endpoint_auth_method": "client_secret_post"}, code, verifier
        )
        self.assertEqual(status, 200, body)

    async def test_public_client_sending_a_secret(self) -> None:
        """
        Decision: a public client's secret is ignored (none was issued, so it
        proves nothing either way).
        """
        client = await self.register("none")
        code, verifier = await self.new_code(client)
        status, body, _ = await self.token(
            None,
            grant_type="authorization_code",
            code=code,
            code_verifier=verifier,
            redirect_uri=REDIRECT,
            client_id=client["client_id"],
            client_secret="made-up",
        )
        self.assertEqual(status, 200, body)

    async def test_public_client_with_basic_and_no_secret(self) -> None:
        client = await self.register("none")
        code, verifier = await self.new_code(client)
        status, body, _ = await self.post(
            "/oauth/token",
            {
                "grant_type": "authorization_code",
                "code": code,
                "code_verifier": verifier,
                "redirect_uri": REDIRECT,
            },
            {"Authorization": basic(client["client_id"], "")},
        )
        self.assertEqual(status, 200, body)

    async def test_wrong_verifier(self) -> None:
        client = await self.register()
        code, _ = await self.new_code(client)
        other, _ = new_pkce_pair()
        await self.assert_error(
            await self.exchange(client, code, other), 400, "invalid_grant", "code_verifier"
        )

    async def test_missing_verifier(self) -> None:
        client = await self.register()
        code, _ = await self.new_code(client)
        await self.assert_error(
            await self.exchange(client, code, None), 400, "invalid_grant", "code_verifier"
        )

    async def test_malformed_verifier(self) -> None:
        client = await self.register()
        code, _ = await self.new_code(client)
        for verifier in ("short", "é" * 50, "a b" * 20):
            await self.assert_error(
                await self.exchange(client, code, verifier), 400, "invalid_grant", "43 to 128"
            )

    async def test_failed_attempt_does_not_burn_the_code(self) -> None:
        client = await self.register()
        code, verifier = await self.new_code(client)
        await self.assert_error(
            await self.exchange(client, code, new_pkce_pair()[0]), 400, "invalid_grant"
        )
        status, body, _ = await self.exchange(client, code, verifier)
        self.assertEqual(status, 200, body)

    async def test_redirect_mismatch(self) -> None:
        client = await self.register(redirects=(REDIRECT, "https://app.example/cb"))
        code, verifier = await self.new_code(client)
        await self.assert_error(
            await self.exchange(client, code, verifier, redirect_uri="https://app.example/cb"),
            400,
            "invalid_grant",
            "redirect_uri",
        )
        # Loopback port freedom applies at authorize, not here: the token
        # request repeats exactly what was used.
        await self.assert_error(
            await self.exchange(
                client, code, verifier, redirect_uri="http://127.0.0.1:40000/callback"
            ),
            400,
            "invalid_grant",
            "redirect_uri",
        )

    async def test_redirect_uri_may_be_left_out_with_one_registered(self) -> None:
        client = await self.register()
        code, verifier = await self.new_code(client)
        status, body, _ = await self.token(
            client, grant_type="authorization_code", code=code, code_verifier=verifier
        )
        self.assertEqual(status, 200, body)

    async def test_redirect_uri_required_with_several_registered(self) -> None:
        client = await self.register(redirects=(REDIRECT, "https://app.example/cb"))
        code, verifier = await self.new_code(client)
        await self.assert_error(
            await self.token(
                client, grant_type="authorization_code", code=code, code_verifier=verifier
            ),
            400,
            "invalid_request",
        )

    async def test_code_replay_revokes_the_tokens(self) -> None:
        client = await self.register()
        code, verifier = await self.new_code(client)
        status, first, _ = await self.exchange(client, code, verifier)
        self.assertEqual(status, 200)
        await self.tokens.check_bearer("Bearer " + first["access_token"])
        await self.assert_error(
            await self.exchange(client, code, verifier), 400, "invalid_grant", "already used"
        )
        await self.assert_invalid(first["access_token"], "revoked")
        await self.assert_error(
            await self.refresh(client, first["refresh_token"]), 400, "invalid_grant", "revoked"
        )
        families = await self.store.list_families(forgejo_user_id=USER, include_revoked=True)
        self.assertEqual(families[0].revoked_reason, "authorization code replayed")

    async def test_foreign_clients_code(self) -> None:
        mine = await self.register()
        theirs = await self.register()
        code, verifier = await self.new_code(mine)
        await self.assert_error(
            await self.exchange(theirs, code, verifier), 400, "invalid_grant", "another client"
        )
        # Nothing was burnt: the rightful client still redeems it.
        status, body, _ = await self.exchange(mine, code, verifier)
        self.assertEqual(status, 200, body)

    async def test_expired_code(self) -> None:
        client = await self.register()
        code, verifier = await self.new_code(client)
        self.clock.advance(59)
        code2, verifier2 = await self.new_code(client)
        self.clock.advance(2)
        await self.assert_error(
            await self.exchange(client, code, verifier), 400, "invalid_grant", "expired"
        )
        status, body, _ = await self.exchange(client, code2, verifier2)
        self.assertEqual(status, 200, body)

    async def test_unknown_code(self) -> None:
        client = await self.register()
        await self.assert_error(
            await self.exchange(client, "nope", new_pkce_pair()[0]), 400, "invalid_grant"
        )

    async def test_missing_code(self) -> None:
        client = await self.register()
        await self.assert_error(
            await self.token(client, grant_type="authorization_code", code_verifier="x" * 43),
            400,
            "invalid_request",
        )

    async def test_scope_parameter_does_not_widen_a_code(self) -> None:
        client = await self.register()
        code, verifier = await self.new_code(client, scope="mcp")
        status, body, _ = await self.exchange(client, code, verifier, scope="mcp admin")
        self.assertEqual((status, body["scope"]), (200, "mcp"))

    async def test_unknown_parameters_are_ignored(self) -> None:
        """
        Including names that oauthlib's request object uses for its own
        state.
        """
        client = await self.register()
        code, verifier = await self.new_code(client)
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": verifier,
            "redirect_uri": REDIRECT,
            "client_id": client["client_id"],
            "user": "99",
            "client": "x",
            "extra_credentials": "y",
            "scopes": "admin",
            "expires_in": "1",
        }
        status, body, _ = await self.post("/oauth/token", form)
        self.assertEqual(status, 200, body)
        self.assertEqual((body["expires_in"], body["scope"]), (3600, "mcp offline_access"))
        grant = await self.tokens.check_bearer("Bearer " + body["access_token"])
        self.assertEqual(grant.forgejo_user_id, USER)

    async def test_tokens_stored_only_as_digests(self) -> None:
        client = await self.register()
        body = await self.login(client)
        self.store.close()
        dump = database_dump(self.location)
        for name in ("access_token", "refresh_token"):
            self.assertNotIn(body[name].encode(), dump)
        self.assertIsNotNone(token_hash(body["access_token"]))


class ClientAuthenticationTests(TokenTestBase):
    async def test_unknown_client_is_401(self) -> None:
        """
        Interop trap 10: an unknown client is 401 invalid_client (Claude
        registers again), never 400.
        """
        result = await self.token(
            None,
            grant_type="authorization_code",
            code="x",
            code_verifier="v" * 43,
            client_id="fjmcp-forgotten",
        )
        await self.assert_error(result, 401, "invalid_client", "register again")
        self.assertIsNone(result[2].getRawHeaders(b"www-authenticate"))
        result = await self.post(
            "/oauth/token",
            {"grant_type": "refresh_token", "refresh_token": "r"},
            {"Authorization": basic("fjmcp-forgotten", "s")},
        )
        await self.assert_error(result, 401, "invalid_client")
        self.assertEqual(
            result[2].getRawHeaders(b"www-authenticate"), [b'Basic realm="fjmcp", charset="UTF-8"']
        )

    async def test_no_client_at_all(self) -> None:
        await self.assert_error(
            await self.token(None, grant_type="refresh_token", refresh_token="r"),
            401,
            "invalid_client",
        )

    async def test_wrong_secret(self) -> None:
        for method in ("client_secret_post", "client_secret_basic"):
            client = await self.register(method)
            code, verifier = await self.new_code(client)
            result = await self.exchange(
                {**client, "client_secret": client["client_secret"] + "x"}, code, verifier
            )
            await self.assert_error(result, 401, "invalid_client")
            challenge = result[2].getRawHeaders(b"www-authenticate")
            if method == "client_secret_basic":
                self.assertEqual(challenge, [b'Basic realm="fjmcp", charset="UTF-8"'])
            else:
                self.assertIsNone(challenge)
            # A wrong secret burns nothing.
            status, body, _ = await self.exchange(client, code, verifier)
            self.assertEqual(status, 200, body)

    async def test_confidential_client_without_secret(self) -> None:
        client = await self.register("client_secret_post")
        code, verifier = await self.new_code(client)
        await self.assert_error(
            await self.exchange({**client, "token_endpoint_auth_method": "none"}, code, verifier),
            401,
            "invalid_client",
            "client secret",
        )

    async def test_malformed_basic(self) -> None:
        for value in ("Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode()):
            result = await self.post(
                "/oauth/token",
                {"grant_type": "refresh_token", "refresh_token": "r"},
                {"Authorization": value},
            )
            await self.assert_error(result, 401, "invalid_client", "Basic")
            self.assertIsNotNone(result[2].getRawHeaders(b"www-authenticate"))

    async def test_two_methods_at_once(self) -> None:
        client = await self.register("client_secret_basic")
        await self.assert_error(
            await self.post(
                "/oauth/token",
                {"grant_type": "refresh_token", "refresh_token": "r", "client_secret": "s"},
                {"Authorization": basic(client["client_id"], client["client_secret"])},
            ),
            400,
            "invalid_request",
            "one client authentication method",
        )
        await self.assert_error(
            await self.post(
                "/oauth/token",
                {"grant_type": "refresh_token", "refresh_token": "r", "client_id": "other"},
                {"Authorization": basic(client["client_id"], client["client_secret"])},
            ),
            401,
            "invalid_client",
        )

    async def test_basic_credentials_are_form_encoded(self) -> None:
        """
        RFC 6749 2.3.1: id and secret are form-urlencoded before Basic.
        """
        client = await self.register("client_secret_basic")
        code, verifier = await self.new_code(client)
        raw = f"{client['client_id']}:{client['client_secret']}".replace("-", "%2D")
        status, body, _ = await self.post(
            "/oauth/token",
            {
                "grant_type": "authorization_code",
                "code": code,
                "code_verifier": verifier,
                "redirect_uri": REDIRECT,
            },
            {"Authorization": "Basic " + base64.b64encode(raw.encode()).decode()},
        )
        self.assertEqual(status, 200, body)


class MalformedRequestTests(TokenTestBase):
    async def test_oversized_body(self) -> None:
        await self.assert_error(
            await self.post("/oauth/token", {"grant_type": "refresh_token", "pad": "x" * 20000}),
            413,
            "invalid_request",
            "larger than",
        )

    async def test_json_body(self) -> None:
        await self.assert_error(
            await self.post(
                "/oauth/token",
                json.dumps({"grant_type": "refresh_token", "refresh_token": "r"}).encode(),
                content_type="application/json",
            ),
            400,
            "invalid_request",
            FORM,
        )

    async def test_no_content_type(self) -> None:
        await self.assert_error(
            await self.post(
                "/oauth/token", b"grant_type=refresh_token&refresh_token=r", content_type=None
            ),
            400,
            "invalid_request",
        )

    async def test_malformed_bodies(self) -> None:
        for body in (
            b"grant_type",
            b"grant_type=refresh_token&&",
            b"refresh_token=%ff%fe&grant_type=refresh_token",
            "grant_type=refresh_token&refresh_token=\u00e9".encode(),
            b"\x00\x01\x02",
            b"=" * 100,
        ):
            await self.assert_error(await self.post("/oauth/token", body), 400, "invalid_request")

    async def test_form_with_charset_is_fine(self) -> None:
        client = await self.register()
        code, verifier = await self.new_code(client)
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": verifier,
            "redirect_uri": REDIRECT,
            "client_id": client["client_id"],
        }
        status, body, _ = await self.post(
            "/oauth/token", form, content_type=FORM + "; charset=UTF-8"
        )
        self.assertEqual(status, 200, body)

    async def test_duplicated_parameters(self) -> None:
        client = await self.register()
        code, verifier = await self.new_code(client)
        base = (
            f"grant_type=authorization_code&code={code}&code_verifier={verifier}"
            f"&redirect_uri={quote(REDIRECT, safe='')}&client_id={client['client_id']}"
        )
        for extra in ("&code=other", "&client_id=x", "&grant_type=refresh_token", "&code="):
            await self.assert_error(
                await self.post("/oauth/token", (base + extra).encode()),
                400,
                "invalid_request",
                "repeated",
            )
        status, body, _ = await self.post("/oauth/token", base.encode())
        self.assertEqual(status, 200, body)

    async def test_empty_body(self) -> None:
        await self.assert_error(
            await self.post("/oauth/token", b""), 400, "invalid_request", "grant_type"
        )

    async def test_unsupported_grant_types(self) -> None:
        client = await self.register()
        for grant in ("password", "client_credentials", "implicit", "urn:x"):
            await self.assert_error(
                await self.token(client, grant_type=grant), 400, "unsupported_grant_type"
            )

    async def test_resource(self) -> None:
        client = await self.register()
        for resource in ("https://evil.example/mcp", "https://mcp.example.org/other"):
            code, verifier = await self.new_code(client)
            await self.assert_error(
                await self.exchange(client, code, verifier, resource=resource),
                400,
                "invalid_target",
                self.config.mcp_url,
            )
        for resource in (self.config.mcp_url, self.config.mcp_url + "/"):
            code, verifier = await self.new_code(client)
            status, body, _ = await self.exchange(client, code, verifier, resource=resource)
            self.assertEqual(status, 200, body)

    async def test_several_resources(self) -> None:
        """
        RFC 8707 allows several resource parameters; only ours is served.
        """
        client = await self.register()
        code, verifier = await self.new_code(client)
        base = (
            f"grant_type=authorization_code&code={code}&code_verifier={verifier}"
            f"&redirect_uri={quote(REDIRECT, safe='')}&client_id={client['client_id']}"
        )
        mcp = quote(self.config.mcp_url, safe="")
        await self.assert_error(
            await self.post(
                "/oauth/token",
                (base + f"&resource={mcp}&resource=https%3A%2F%2Fother.example").encode(),
            ),
            400,
            "invalid_target",
        )
        status, body, _ = await self.post(
            "/oauth/token", (base + f"&resource={mcp}&resource={mcp}%2F").encode()
        )
        self.assertEqual(status, 200, body)

    async def test_get_is_not_allowed(self) -> None:
        response = await self.http.get(self.url + "/oauth/token")
        await response.content()
        self.assertEqual(response.code, 405)

    async def test_preflight(self) -> None:
        for path in ("/oauth/token", "/oauth/revoke"):
            response = await self.http.request(
                "OPTIONS",
                self.url + path,
                headers=Headers({b"Origin": [b"http://localhost:6274"]}),
            )
            await response.content()
            self.assertEqual(response.code, 204)


class RefreshTests(TokenTestBase):
    async def test_rotation(self) -> None:
        client = await self.register()
        first = await self.login(client)
        self.clock.advance(10)
        status, second, headers = await self.refresh(client, first["refresh_token"])
        self.assertEqual(status, 200, second)
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-store"])
        self.assertNotEqual(second["refresh_token"], first["refresh_token"])
        self.assertNotEqual(second["access_token"], first["access_token"])
        self.assertEqual(second["scope"], "mcp offline_access")
        one = await self.tokens.check_bearer("Bearer " + first["access_token"])
        two = await self.tokens.check_bearer("Bearer " + second["access_token"])
        self.assertEqual(one.family_id, two.family_id)
        # And the new one rotates in turn.
        status, third, _ = await self.refresh(client, second["refresh_token"])
        self.assertEqual(status, 200, third)

    async def test_refresh_for_confidential_clients(self) -> None:
        for method in ("client_secret_post", "client_secret_basic"):
            client = await self.register(method)
            first = await self.login(client)
            status, body, _ = await self.refresh(client, first["refresh_token"])
            self.assertEqual(status, 200, body)
            result = await self.refresh({**client, "client_secret": "wrong"}, body["refresh_token"])
            await self.assert_error(result, 401, "invalid_client")

    async def test_narrower_scope(self) -> None:
        client = await self.register()
        first = await self.login(client, scope="mcp offline_access claudeai")
        status, body, _ = await self.refresh(client, first["refresh_token"], scope="mcp")
        self.assertEqual((status, body["scope"]), (200, "mcp"))
        grant = await self.tokens.check_bearer("Bearer " + body["access_token"])
        self.assertEqual(grant.scope, "mcp")
        # The family keeps its scope: the next refresh without one gets it all.
        status, body, _ = await self.refresh(client, body["refresh_token"])
        self.assertEqual((status, body["scope"]), (200, "mcp offline_access claudeai"))
        # Scopes never granted are dropped, not refused.
        status, body, _ = await self.refresh(client, body["refresh_token"], scope="mcp admin")
        self.assertEqual((status, body["scope"]), (200, "mcp"))
        status, body, _ = await self.refresh(client, body["refresh_token"], scope="admin")
        self.assertEqual((status, body["scope"]), (200, "mcp offline_access claudeai"))

    async def test_grace_window_reuse(self) -> None:
        client = await self.register()
        first = await self.login(client)
        status, second, _ = await self.refresh(client, first["refresh_token"])
        self.assertEqual(status, 200)
        self.clock.advance(self.grace)
        status, again, _ = await self.refresh(client, first["refresh_token"])
        self.assertEqual(status, 200, again)
        self.assertNotEqual(again["refresh_token"], second["refresh_token"])
        for body in (first, second, again):
            await self.tokens.check_bearer("Bearer " + body["access_token"])
        families = await self.store.list_families(forgejo_user_id=USER)
        self.assertEqual(len(families), 1)

    async def test_reuse_after_window_revokes_the_family(self) -> None:
        client = await self.register()
        first = await self.login(client)
        status, second, _ = await self.refresh(client, first["refresh_token"])
        self.assertEqual(status, 200)
        self.clock.advance(self.grace + 1)
        await self.assert_error(
            await self.refresh(client, first["refresh_token"]),
            400,
            "invalid_grant",
            "already used",
        )
        # The newest refresh token and every access token die with it.
        await self.assert_error(
            await self.refresh(client, second["refresh_token"]), 400, "invalid_grant", "revoked"
        )
        for body in (first, second):
            await self.assert_invalid(body["access_token"], "revoked")
        families = await self.store.list_families(forgejo_user_id=USER, include_revoked=True)
        self.assertEqual(families[0].revoked_reason, "refresh token reused after grace period")

    async def test_grace_runs_from_the_first_exchange(self) -> None:
        client = await self.register()
        first = await self.login(client)
        await self.refresh(client, first["refresh_token"])
        self.clock.advance(self.grace / 2)
        status, _, _ = await self.refresh(client, first["refresh_token"])
        self.assertEqual(status, 200)
        self.clock.advance(self.grace / 2 + 1)
        await self.assert_error(
            await self.refresh(client, first["refresh_token"]), 400, "invalid_grant"
        )

    async def test_expired_refresh_token(self) -> None:
        client = await self.register()
        first = await self.login(client)
        self.clock.advance(self.config.refresh_token_lifetime)
        await self.assert_error(
            await self.refresh(client, first["refresh_token"]), 400, "invalid_grant", "expired"
        )

    async def test_unknown_and_foreign_refresh_tokens(self) -> None:
        mine = await self.register()
        theirs = await self.register()
        first = await self.login(mine)
        await self.assert_error(
            await self.refresh(mine, "not-a-token"), 400, "invalid_grant", "unknown"
        )
        await self.assert_error(
            await self.refresh(theirs, first["refresh_token"]),
            400,
            "invalid_grant",
            "another client",
        )
        # The attempt changed nothing for the rightful client.
        status, body, _ = await self.refresh(mine, first["refresh_token"])
        self.assertEqual(status, 200, body)

    async def test_access_token_is_not_a_refresh_token(self) -> None:
        client = await self.register()
        first = await self.login(client)
        await self.assert_error(
            await self.refresh(client, first["access_token"]), 400, "invalid_grant"
        )

    async def test_missing_refresh_token(self) -> None:
        client = await self.register()
        await self.assert_error(
            await self.token(client, grant_type="refresh_token"), 400, "invalid_request"
        )


class RevocationTests(TokenTestBase):
    async def test_access_token_revokes_itself(self) -> None:
        client = await self.register()
        first = await self.login(client)
        status, body, headers = await self.revoke(client, first["access_token"])
        self.assertEqual(status, 200, body)
        self.assertEqual(headers.getRawHeaders(b"cache-control"), [b"no-store"])
        await self.assert_invalid(first["access_token"], "revoked")
        status, second, _ = await self.refresh(client, first["refresh_token"])
        self.assertEqual(status, 200, second)
        await self.tokens.check_bearer("Bearer " + second["access_token"])

    async def test_refresh_token_revokes_the_family(self) -> None:
        for method in ("none", "client_secret_post", "client_secret_basic"):
            client = await self.register(method)
            first = await self.login(client)
            status, second, _ = await self.refresh(client, first["refresh_token"])
            self.assertEqual(status, 200)
            status, body, _ = await self.revoke(
                client, second["refresh_token"], token_type_hint="refresh_token"
            )
            self.assertEqual(status, 200, body)
            for b in (first, second):
                await self.assert_invalid(b["access_token"], "revoked")
            await self.assert_error(
                await self.refresh(client, second["refresh_token"]), 400, "invalid_grant"
            )

    async def test_wrong_hint_is_only_a_hint(self) -> None:
        client = await self.register()
        first = await self.login(client)
        await self.revoke(client, first["access_token"], token_type_hint="refresh_token")
        await self.assert_invalid(first["access_token"], "revoked")
        await self.revoke(client, first["refresh_token"], token_type_hint="access_token")
        await self.assert_error(
            await self.refresh(client, first["refresh_token"]), 400, "invalid_grant"
        )

    async def test_unknown_token_is_200(self) -> None:
        client = await self.register()
        status, body, _ = await self.revoke(client, "never-issued", token_type_hint="whatever")
        self.assertEqual(status, 200, body)

    async def test_only_own_tokens(self) -> None:
        mine = await self.register()
        theirs = await self.register()
        first = await self.login(mine)
        for token in (first["access_token"], first["refresh_token"]):
            status, _, _ = await self.revoke(theirs, token)
            self.assertEqual(status, 200)
        await self.tokens.check_bearer("Bearer " + first["access_token"])
        status, body, _ = await self.refresh(mine, first["refresh_token"])
        self.assertEqual(status, 200, body)

    async def test_client_must_authenticate(self) -> None:
        client = await self.register("client_secret_basic")
        first = await self.login(client)
        result = await self.revoke({**client, "client_secret": "wrong"}, first["refresh_token"])
        await self.assert_error(result, 401, "invalid_client")
        self.assertIsNotNone(result[2].getRawHeaders(b"www-authenticate"))
        await self.assert_error(
            await self.post("/oauth/revoke", {"token": first["refresh_token"]}),
            401,
            "invalid_client",
        )
        await self.assert_error(
            await self.revoke(
                {"client_id": "fjmcp-unknown", "token_endpoint_auth_method": "none"},
                first["refresh_token"],
            ),
            401,
            "invalid_client",
        )
        await self.tokens.check_bearer("Bearer " + first["access_token"])

    async def test_missing_token(self) -> None:
        client = await self.register()
        form = {"client_id": client["client_id"]}
        await self.assert_error(
            await self.post("/oauth/revoke", form), 400, "invalid_request", "token"
        )

    async def test_malformed_revocation(self) -> None:
        await self.assert_error(
            await self.post("/oauth/revoke", b'{"token": "x"}', content_type="application/json"),
            400,
            "invalid_request",
        )


class BearerTests(TokenTestBase):
    async def test_missing(self) -> None:
        for header in (None, "", "   ", "Basic dXNlcjpwYXNz", "Bearer"):
            with self.assertRaises(MissingTokenError, msg=repr(header)):
                await self.tokens.check_bearer(header)

    async def test_malformed_and_unknown(self) -> None:
        for header, needle in (
            ("Bearer a b", "malformed"),
            ("Bearer ###", "malformed"),
            ("Bearer unknown-token", "unknown"),
        ):
            with self.assertRaises(InvalidTokenError, msg=header) as cm:
                await self.tokens.check_bearer(header)
            self.assertIn(needle, cm.exception.description)

    async def test_valid_any_case(self) -> None:
        client = await self.register()
        first = await self.login(client)
        grant = await self.tokens.check_bearer("bearer  " + first["access_token"] + " ")
        self.assertIsInstance(grant, AccessGrant)

    async def test_expired(self) -> None:
        client = await self.register()
        first = await self.login(client)
        self.clock.advance(3599)
        await self.tokens.check_bearer("Bearer " + first["access_token"])
        self.clock.advance(1)
        await self.assert_invalid(first["access_token"], "expired")

    async def test_revoked(self) -> None:
        client = await self.register()
        first = await self.login(client)
        await self.store.revoke_families("admin", forgejo_user_id=USER)
        await self.assert_invalid(first["access_token"], "revoked")

    async def test_wrong_audience(self) -> None:
        client = await self.register()
        first = await self.login(client)
        elsewhere = token_service(
            self.store, make_config(str(self.tmp), public_url="https://other.example"), self.clock
        )
        with self.assertRaises(InvalidTokenError) as cm:
            await elsewhere.check_bearer("Bearer " + first["access_token"])
        self.assertIn("another resource", cm.exception.description)

    async def test_trailing_slash_audience(self) -> None:
        client = await self.register()
        first = await self.login(client, resource=self.config.mcp_url + "/")
        await self.tokens.check_bearer("Bearer " + first["access_token"])

    def test_www_authenticate(self) -> None:
        metadata = "https://mcp.example.org/.well-known/oauth-protected-resource/mcp"
        self.assertEqual(
            www_authenticate(self.config, None),
            f'Bearer resource_metadata="{metadata}"'.encode(),
        )
        self.assertEqual(
            www_authenticate(self.config, "invalid_token", 'the "token" expired'),
            (
                'Bearer error="invalid_token", error_description="the \\"token\\" expired", '
                f'resource_metadata="{metadata}"'
            ).encode(),
        )


class AdminTests(TokenTestBase):
    async def test_list_and_revoke_by_user_and_client(self) -> None:
        a = await self.register()
        b = await self.register()
        tokens = [
            await self.login(a, user=1),
            await self.login(b, user=1),
            await self.login(a, user=2),
        ]
        await self.new_code(b, user=2)  # never redeemed: not a grant yet
        self.assertEqual(len(await self.store.list_families()), 3)
        self.assertEqual(len(await self.store.list_families(forgejo_user_id=1)), 2)
        self.assertEqual(len(await self.store.list_families(client_id=a["client_id"])), 2)
        self.assertEqual(
            len(await self.store.list_families(forgejo_user_id=2, client_id=a["client_id"])), 1
        )
        self.assertEqual(await self.store.revoke_families("admin", client_id=a["client_id"]), 2)
        self.assertEqual(await self.store.revoke_families("admin", client_id=a["client_id"]), 0)
        await self.assert_invalid(tokens[0]["access_token"], "revoked")
        await self.assert_invalid(tokens[2]["access_token"], "revoked")
        await self.tokens.check_bearer("Bearer " + tokens[1]["access_token"])
        remaining = await self.store.list_families()
        self.assertEqual([f.client_id for f in remaining], [b["client_id"]])
        self.assertTrue(await self.store.revoke_family(remaining[0].family_id, "admin"))
        self.assertFalse(await self.store.revoke_family(remaining[0].family_id, "admin"))
        self.assertEqual(await self.store.list_families(), [])
        self.assertEqual(len(await self.store.list_families(include_revoked=True)), 3)
        with self.assertRaises(ValueError):
            self.store.revoke_families("admin")

    async def test_prune(self) -> None:
        client = await self.register()
        first = await self.login(client)
        await self.new_code(client)
        self.assertEqual(await self.store.prune_tokens(START), 0)
        far = START + 10 * self.config.refresh_token_lifetime
        # The code, the redeemed code, both tokens, then two empty families.
        self.assertEqual(await self.store.prune_tokens(far), 6)
        await self.assert_invalid(first["access_token"], "unknown")


class ConcurrencyTests(TokenTestBase):
    async def test_concurrent_refreshes(self) -> None:
        """
        Interop trap 7: twenty nodes refresh with the same token at once.
        Within the grace window every one succeeds, all in one family.
        """
        client = await self.register()
        first = await self.login(client)
        form = urlencode(
            {
                "grant_type": "refresh_token",
                "refresh_token": first["refresh_token"],
                "client_id": client["client_id"],
            }
        ).encode()
        results = await gatherResults(
            [
                Deferred.fromCoroutine(self.tokens.token_response(form, {"Content-Type": FORM}))
                for _ in range(20)
            ]
        )
        self.assertEqual([status for status, _, _ in results], [200] * 20)
        bodies = [body for _, _, body in results]
        self.assertEqual(len({b["access_token"] for b in bodies}), 20)
        self.assertEqual(len({b["refresh_token"] for b in bodies}), 20)
        families = {
            (await self.tokens.check_bearer("Bearer " + b["access_token"])).family_id
            for b in [*bodies, first]
        }
        self.assertEqual(len(families), 1)
        self.assertEqual(len(await self.store.list_families(forgejo_user_id=USER)), 1)
        # Each new refresh token works; the family is still live.
        for body in bodies[:3]:
            status, _, _ = await self.refresh(client, body["refresh_token"])
            self.assertEqual(status, 200)

    def nodes(self, count: int, config: Config | None = None) -> list[TokenService]:
        """
        Token services of C{count} more broker nodes: each its own store
        and pool on the one database.
        """
        services = []
        for _ in range(count):
            store = Store.open(self.location, reactor)
            self.addCleanup(store.close)
            services.append(token_service(store, config or self.config, self.clock))
        return services

    async def refresh_on(
        self, nodes: list[TokenService], client: dict[str, Any], tokens: list[str]
    ) -> list[tuple[int, Any, Any]]:
        """
        Refreshes with C{tokens}, all at once, the i-th on node i modulo
        their number.
        """
        return await gatherResults(
            [
                Deferred.fromCoroutine(
                    nodes[i % len(nodes)].token_response(
                        urlencode(
                            {
                                "grant_type": "refresh_token",
                                "refresh_token": token,
                                "client_id": client["client_id"],
                            }
                        ).encode(),
                        {"Content-Type": FORM},
                    )
                )
                for i, token in enumerate(tokens)
            ]
        )

    async def test_concurrent_refreshes_across_nodes(self) -> None:
        """
        The same twenty refreshes spread over three broker nodes (each its
        own store and pool on the one database): every one succeeds within
        the grace window, and exactly one family is left, live.
        """
        client = await self.register()
        first = await self.login(client)
        nodes = [self.tokens, *self.nodes(2)]
        results = await self.refresh_on(nodes, client, [first["refresh_token"]] * 20)
        self.assertEqual([status for status, _, _ in results], [200] * 20)
        live = await self.store.list_families(forgejo_user_id=USER)
        self.assertEqual(len(live), 1)
        self.assertEqual(len(await self.store.list_families(USER, include_revoked=True)), 1)
        # Every new refresh token is good, on another node than its own.
        again = await self.refresh_on(
            nodes[1:] + nodes[:1], client, [body["refresh_token"] for _, _, body in results[:3]]
        )
        self.assertEqual([status for status, _, _ in again], [200] * 3)

    async def test_refresh_while_its_family_is_revoked(self) -> None:
        """
        A refresh on one node racing the revocation of its grant on
        another: the refresh gets its tokens or invalid_grant, never a
        server error (on PostgreSQL the two took the family's and the
        token's row locks in opposite orders, and one died in a deadlock).
        """
        client = await self.register()
        [other] = self.nodes(1)
        statuses = []
        for _ in range(10):
            tokens = await self.login(client)
            grant = await self.tokens.check_bearer("Bearer " + tokens["access_token"])
            refreshing = Deferred.fromCoroutine(
                self.refresh_on([other], client, [tokens["refresh_token"]])
            )
            await self.store.revoke_family(grant.family_id, "test")
            refreshed = await refreshing
            statuses += [status for status, _, _ in refreshed]
        self.assertLessEqual(set(statuses), {200, 400}, statuses)

    async def test_replays_across_nodes_without_grace(self) -> None:
        """
        With no grace window, the same refresh token sent to three nodes at
        once is used exactly once: the others are replays, which revoke the
        family (the winner's new tokens too), as one after the other on one
        node would.  Without row locks on PostgreSQL, every node would read
        the token unused and issue.
        """
        client = await self.register()
        first = await self.login(client)
        # A window that has closed even for a token rotated this instant (the
        # clock stands still).
        nodes = self.nodes(3, attrs.evolve(self.config, refresh_grace_period=-1.0))
        results = await self.refresh_on(nodes, client, [first["refresh_token"]] * 6)
        statuses = sorted(status for status, _, _ in results)
        self.assertEqual(statuses, [200] + [400] * 5, results)
        winner = next(body for status, _, body in results if status == 200)
        await self.assert_invalid(winner["access_token"], "revoked")
        self.assertEqual(await self.store.list_families(forgejo_user_id=USER), [])

    async def test_concurrent_refreshes_over_http(self) -> None:
        client = await self.register("client_secret_basic")
        first = await self.login(client)
        results = await gatherResults(
            [
                Deferred.fromCoroutine(self.refresh(client, first["refresh_token"]))
                for _ in range(20)
            ]
        )
        self.assertEqual([code for code, _, _ in results], [200] * 20)
        self.assertEqual(len(await self.store.list_families(forgejo_user_id=USER)), 1)

    async def test_concurrent_double_redemption(self) -> None:
        """
        Exactly one of two simultaneous redemptions wins; the other is a
        replay, so (RFC 6749 10.5) the winner's tokens are revoked too.
        """
        client = await self.register()
        code, verifier = await self.new_code(client)
        results = await gatherResults(
            [Deferred.fromCoroutine(self.exchange(client, code, verifier)) for _ in range(2)]
        )
        statuses = sorted(status for status, _, _ in results)
        self.assertEqual(statuses, [200, 400])
        winner = next(body for status, body, _ in results if status == 200)
        loser = next(body for status, body, _ in results if status == 400)
        self.assertEqual(loser["error"], "invalid_grant")
        await self.assert_invalid(winner["access_token"], "revoked")

    async def test_double_redemption_across_connections(self) -> None:
        """
        Two stores (two connections, as the daemon and an admin command
        would have) on one file: the database, not the pool, decides.
        """
        other_store = Store.open(self.location, reactor)
        self.addCleanup(other_store.close)
        other = token_service(other_store, self.config, self.clock)
        client = await self.register()
        wins = 0
        for _ in range(5):
            code, verifier = await self.new_code(client)
            form = urlencode(
                {
                    "grant_type": "authorization_code",
                    "code": code,
                    "code_verifier": verifier,
                    "redirect_uri": REDIRECT,
                    "client_id": client["client_id"],
                }
            ).encode()
            results = await gatherResults(
                [
                    Deferred.fromCoroutine(service.token_response(form, {"Content-Type": FORM}))
                    for service in (self.tokens, other, self.tokens, other)
                ]
            )
            statuses = [status for status, _, _ in results]
            self.assertEqual(statuses.count(200), 1, results)
            self.assertEqual(statuses.count(400), 3, results)
            wins += 1
        self.assertEqual(wins, 5)


class RestartTests(TokenTestBase):
    async def test_tokens_survive_a_restart(self) -> None:
        client = await self.register()
        first = await self.login(client)
        code, verifier = await self.new_code(client)
        self.store.close()
        store = Store.open(self.location, reactor)
        self.addCleanup(store.close)
        tokens = token_service(store, self.config, self.clock)
        grant = await tokens.check_bearer("Bearer " + first["access_token"])
        self.assertEqual(grant.forgejo_user_id, USER)
        form = {
            "grant_type": "refresh_token",
            "refresh_token": first["refresh_token"],
            "client_id": client["client_id"],
        }
        status, _, body = await tokens.token_response(
            urlencode(form).encode(), {"Content-Type": FORM}
        )
        self.assertEqual(status, 200, body)
        form = {
            "grant_type": "authorization_code",
            "code": code,
            "code_verifier": verifier,
            "redirect_uri": REDIRECT,
            "client_id": client["client_id"],
        }
        status, _, body = await tokens.token_response(
            urlencode(form).encode(), {"content-type": FORM}
        )
        self.assertEqual(status, 200, body)


class FormParsingTests(SynchronousTestCase):
    def test_empty_values_are_absent(self) -> None:
        form, resources = parse_form(b"a=1&b=&resource=", {"Content-Type": FORM})
        self.assertEqual((form, resources), ({"a": "1"}, []))

    def test_plus_and_percent(self) -> None:
        form, _ = parse_form(b"scope=mcp+offline_access&x=%2B", {"content-type": FORM})
        self.assertEqual(form, {"scope": "mcp offline_access", "x": "+"})


class DefensivePathTests(TokenTestBase):
    async def test_lost_code_race_is_a_replay(self) -> None:
        """
        Should the claiming UPDATE ever find the code used after all, nothing
        is issued (the transaction rolls back) and the family is revoked.
        """
        from fjmcp.store.tokens import TokenTransaction

        client = await self.register()
        code, verifier = await self.new_code(client)
        claim = TokenTransaction.claim_authorization_code
        self.patch(TokenTransaction, "claim_authorization_code", lambda self, code_hash: False)
        await self.assert_error(
            await self.exchange(client, code, verifier), 400, "invalid_grant", "already used"
        )
        self.assertEqual(await self.store.list_families(include_revoked=True), [])
        # Nothing was issued, and the grant is dead: the code, no longer
        # "used" (rolled back), now meets a revoked family.
        self.assertEqual(await self.store.prune_tokens(START), 0)
        self.patch(TokenTransaction, "claim_authorization_code", claim)
        await self.assert_error(
            await self.exchange(client, code, verifier), 400, "invalid_grant", "revoked"
        )

    async def test_database_failure_is_a_clean_500(self) -> None:
        client = await self.register()
        code, verifier = await self.new_code(client)

        def broken(*args: Any) -> Any:
            raise RuntimeError("disk on fire")

        self.patch(self.store, "token_transaction", broken)
        result = await self.exchange(client, code, verifier)
        await self.assert_error(result, 500, "server_error")
        self.assertNotIn("disk on fire", json.dumps(result[1]))
        await self.assert_error(await self.revoke(client, "x"), 500, "server_error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)


# The same token endpoint tests on PostgreSQL (tests/store_engines.py).


class CodeExchangeOnPostgreSQL(OnPostgreSQL, CodeExchangeTests):
    pass


class RefreshOnPostgreSQL(OnPostgreSQL, RefreshTests):
    pass


class RevocationOnPostgreSQL(OnPostgreSQL, RevocationTests):
    pass


class BearerOnPostgreSQL(OnPostgreSQL, BearerTests):
    pass


class AdminOnPostgreSQL(OnPostgreSQL, AdminTests):
    pass


class ConcurrencyOnPostgreSQL(OnPostgreSQL, ConcurrencyTests):
    pass


class RestartOnPostgreSQL(OnPostgreSQL, RestartTests):
    pass
