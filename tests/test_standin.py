"""
The Forgejo stand-in's OAuth2 provider, over in-memory HTTP, held to what
real Forgejo does (C{../shared/brief/forgejo.md} and the research notes on
Forgejo's C{routers/web/auth/oauth.go}): sign-in, authorize, consent, token
endpoint errors and token rules, userinfo, introspection and discovery.

The API (C{/api/v1}) is in C{test_standin_api}, the pure rules in
C{test_standin_model}, running it as a process in C{test_standin_process}.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

from fjmcp_dev.standin.model import REFRESH_TOKEN_LIFETIME, Forge
from fjmcp_dev.standin.web import StandinForgejo
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from tests.test_standin_support import (
    BASE,
    BROKER_ID,
    BROKER_REDIRECT,
    BROKER_SECRET,
    PUBLIC_REDIRECT,
    VERIFIER,
    Reply,
    Standin,
    forms,
    jwt_claims,
    s256,
)


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class OAuthAssertions(SynchronousTestCase):
    def assertTokenError(self, reply: Reply, error: str, description: str) -> None:
        """
        Forgejo's token endpoint error: 400, JSON, exactly these two fields.
        """
        self.assertEqual(reply.code, 400, reply.body)
        self.assertIn("application/json", reply.header("content-type") or "")
        self.assertEqual(reply.json(), {"error": error, "error_description": description})

    def assertErrorRedirect(
        self, reply: Reply, redirect_uri: str, error: str, description: str, state: str
    ) -> None:
        """
        Forgejo's authorize error: 303 back to the client with error,
        error_description and state (always present, even empty), keys in
        Go's sorted order, the redirect URI's own query kept.
        """
        self.assertEqual(reply.code, 303, reply.body)
        location = urlsplit(reply.location)
        expected = urlsplit(redirect_uri)
        self.assertEqual(
            (location.scheme, location.netloc, location.path),
            (expected.scheme, expected.netloc, expected.path),
        )
        pairs = parse_qsl(location.query, keep_blank_values=True)
        own = parse_qsl(expected.query, keep_blank_values=True)
        self.assertEqual(
            sorted(pairs),
            sorted([*own, ("error", error), ("error_description", description), ("state", state)]),
        )
        self.assertEqual([k for k, _ in pairs], sorted(k for k, _ in pairs))

    def assertHTMLError(self, reply: Reply, description: str) -> None:
        """
        Forgejo's grant_error page: HTML 400, and never a redirect.
        """
        self.assertEqual(reply.code, 400, reply.body)
        self.assertIn("text/html", reply.header("content-type") or "")
        self.assertIsNone(reply.header("location"))
        self.assertIn("Authorization failed", reply.text)
        self.assertIn(description, reply.text)


class SignInTests(OAuthAssertions):
    def test_not_signed_in_goes_to_the_login_page(self):
        """
        303 to /user/login with no query; where to come back to is in the
        redirect_to cookie.
        """
        s = Standin()
        reply = s.authorize(login=None, code_challenge=s256(VERIFIER), code_challenge_method="S256")
        self.assertEqual(reply.code, 303)
        self.assertEqual(reply.location, "/user/login")
        target = reply.cookie("redirect_to")
        assert target is not None
        self.assertTrue(target.startswith("/login/oauth/authorize?"))
        self.assertEqual(dict(parse_qsl(urlsplit(target).query))["redirect_uri"], BROKER_REDIRECT)
        self.assertEqual(s.forge.codes, {})

    def test_not_signed_in_wins_over_a_bad_client(self):
        """
        Sign-in comes first: even an unknown client is sent to the login page.
        """
        s = Standin()
        reply = s.authorize(login=None, client_id="nobody")
        self.assertEqual((reply.code, reply.location), (303, "/user/login"))

    def test_login_page_round_trip(self):
        """
        Without the test switch a person signs in on the login page, comes
        back to the authorize request, approves on the consent page, and the
        client gets a code that works.
        """
        s = Standin(test_login=False)
        start = s.authorize(
            login=None,
            code_challenge=s256(VERIFIER),
            code_challenge_method="S256",
            scope="read:user",
        )
        self.assertEqual(start.location, "/user/login")

        login_page = s.get("/user/login")
        self.assertEqual(login_page.code, 200)
        (form,) = forms(login_page.text)
        self.assertEqual(form.action, "/user/login")
        self.assertIn(("user", "alice"), form.buttons)
        signed_in = s.post("/user/login", data={**form.fields, "user": "alice"})
        self.assertEqual(signed_in.code, 303)
        back = signed_in.location
        self.assertTrue(back.startswith("/login/oauth/authorize?"), back)

        consent = s.get(back)
        self.assertEqual(consent.code, 200)
        self.assertIn("fjmcp broker", consent.text)
        self.assertIn("read:user", consent.text)
        (form,) = forms(consent.text)
        self.assertEqual(form.action, "/login/oauth/grant")
        self.assertEqual(
            {k: v for k, v in form.fields.items() if k != "_csrf"},
            {
                "client_id": BROKER_ID,
                "state": "st4te",
                "scope": "read:user",
                "nonce": "",
                "redirect_uri": BROKER_REDIRECT,
            },
        )
        self.assertEqual(sorted(form.buttons), [("granted", "false"), ("granted", "true")])

        approved = s.post("/login/oauth/grant", data={**form.fields, "granted": "true"})
        self.assertEqual(approved.code, 303)
        self.assertTrue(approved.location.startswith(BROKER_REDIRECT + "?"))
        self.assertEqual(approved.query["state"], "st4te")
        tokens = s.exchange(approved.query["code"])
        self.assertEqual(tokens.code, 200, tokens.body)
        me = s.api("/user", tokens.json()["access_token"])
        self.assertEqual(me.json()["login"], "alice")

    def test_login_needs_the_csrf_token(self):
        s = Standin(test_login=False)
        s.get("/user/login")
        reply = s.post("/user/login", data={"_csrf": "forged", "user": "alice"})
        self.assertEqual((reply.code, reply.text), (400, "Invalid CSRF token.\n"))
        self.assertEqual(s.authorize(login=None).location, "/user/login")

    def test_login_unknown_user(self):
        s = Standin(test_login=False)
        (form,) = forms(s.get("/user/login").text)
        reply = s.post("/user/login", data={**form.fields, "user": "mallory"})
        self.assertEqual(reply.code, 400)
        self.assertEqual(s.authorize(login=None).location, "/user/login")

    def test_login_does_not_redirect_off_site(self):
        s = Standin(test_login=False)
        (form,) = forms(s.get("/user/login").text)
        reply = s.post(
            "/user/login",
            data={**form.fields, "user": "alice"},
            cookies={"redirect_to": quote("//evil.example/steal", safe="")},
        )
        self.assertEqual((reply.code, reply.location), (303, "/"))

    def test_test_login_switch(self):
        """
        With the switch on, X-Standin-Login signs the request in and the
        consent approves itself; the session cookie keeps the user signed in.
        """
        s = Standin(test_login=True)
        reply = s.authorize(
            login="bob", code_challenge=s256(VERIFIER), code_challenge_method="S256"
        )
        self.assertEqual(reply.code, 303)
        self.assertIn("code", reply.query)
        self.assertEqual(len(reply.all_headers("set-cookie")), 1)
        self.assertIn("Signed in as bob.", s.get("/").text)
        grant = s.forge.grant_for(s.user_id("bob"), BROKER_ID)
        self.assertIsNotNone(grant)

    def test_test_login_switch_is_off_by_default(self):
        s = Standin(test_login=False)
        reply = s.authorize(login="alice")
        self.assertEqual((reply.code, reply.location), (303, "/user/login"))
        self.assertEqual((s.forge.grants, s.forge.codes), ({}, {}))
        self.assertNotIn("Signed in", s.get("/", headers={"X-Standin-Login": "alice"}).text)

    def test_test_login_unknown_user_is_not_signed_in(self):
        s = Standin()
        reply = s.authorize(login="mallory")
        self.assertEqual((reply.code, reply.location), (303, "/user/login"))


class AuthorizeTests(OAuthAssertions):
    def setUp(self):
        self.s = Standin()

    def test_unknown_client_is_an_html_400(self):
        self.assertHTMLError(self.s.authorize(client_id="nobody"), "Client ID not registered")
        self.assertHTMLError(self.s.authorize(client_id=None), "Client ID not registered")

    def test_unregistered_redirect_uri_is_an_html_400(self):
        for uri in [
            "http://evil.example/callback",
            BROKER_REDIRECT + "/more",
            BROKER_REDIRECT.replace(":8080", ":8081"),
            BROKER_REDIRECT.replace("http:", "https:"),
            "",
            None,
        ]:
            reply = self.s.authorize(redirect_uri=uri)
            self.assertHTMLError(reply, "Unregistered Redirect URI")
        self.assertEqual(self.s.forge.codes, {})

    def test_redirect_uri_case_and_trailing_slash(self):
        """
        Matching ignores case and one trailing slash; the redirect goes to
        the URI as the client sent it.
        """
        given_uri = BROKER_REDIRECT.replace("/oauth/callback", "/OAuth/CALLBACK/")
        reply = self.s.authorize(redirect_uri=given_uri)
        self.assertEqual(reply.code, 303)
        self.assertTrue(reply.location.startswith(given_uri + "?code="), reply.location)

    def test_public_client_loopback_port(self):
        reply = self.s.authorize(
            app=self.s.public,
            redirect_uri="http://127.0.0.1:53123/callback",
            code_challenge=s256(VERIFIER),
            code_challenge_method="S256",
        )
        self.assertEqual(reply.code, 303)
        self.assertTrue(reply.location.startswith("http://127.0.0.1:53123/callback?code="))
        self.assertHTMLError(
            self.s.authorize(
                app=self.s.public,
                redirect_uri="http://localhost:53123/callback",
                code_challenge=s256(VERIFIER),
                code_challenge_method="S256",
            ),
            "Unregistered Redirect URI",
        )

    def test_unknown_client_is_checked_before_redirect_uri(self):
        reply = self.s.authorize(client_id="nobody", redirect_uri="http://evil.example/")
        self.assertHTMLError(reply, "Client ID not registered")

    def test_wrong_response_type(self):
        for response_type in ["token", "id_token", "CODE", "", None]:
            reply = self.s.authorize(response_type=response_type, state="abc")
            self.assertErrorRedirect(
                reply,
                BROKER_REDIRECT,
                "unsupported_response_type",
                "Only code response type is supported.",
                "abc",
            )

    def test_error_redirect_has_empty_state_when_none_was_sent(self):
        reply = self.s.authorize(response_type="token", state=None)
        self.assertErrorRedirect(
            reply,
            BROKER_REDIRECT,
            "unsupported_response_type",
            "Only code response type is supported.",
            "",
        )

    def test_error_redirect_keeps_the_redirect_uris_query(self):
        uri = "http://127.0.0.1:9/cb?tenant=a&z=1"
        app = self.s.forge.add_app("with query", [uri], client_id="q", client_secret="q")
        reply = self.s.authorize(app=app, response_type="token")
        self.assertErrorRedirect(
            reply,
            uri,
            "unsupported_response_type",
            "Only code response type is supported.",
            "st4te",
        )
        ok = self.s.authorize(app=app)
        self.assertEqual(ok.query["tenant"], "a")
        self.assertIn("code", ok.query)

    def test_public_client_needs_pkce(self):
        reply = self.s.authorize(app=self.s.public)
        self.assertErrorRedirect(
            reply,
            PUBLIC_REDIRECT,
            "invalid_request",
            "PKCE is required for public clients",
            "st4te",
        )
        self.assertEqual(self.s.forge.codes, {})

    def test_confidential_client_may_omit_pkce(self):
        reply = self.s.authorize()
        self.assertEqual(reply.code, 303)
        tokens = self.s.exchange(reply.query["code"], verifier=None)
        self.assertEqual(tokens.code, 200, tokens.body)

    def test_unsupported_challenge_method(self):
        for app in (self.s.broker, self.s.public):
            for method in ["S512", "s256", "PLAIN", "none"]:
                reply = self.s.authorize(
                    app=app, code_challenge="x" * 43, code_challenge_method=method
                )
                self.assertErrorRedirect(
                    reply,
                    app.redirect_uris[0],
                    "invalid_request",
                    "unsupported code challenge method",
                    "st4te",
                )

    def test_success_redirect_omits_empty_state(self):
        reply = self.s.authorize(state=None)
        self.assertEqual(reply.code, 303)
        self.assertEqual(set(reply.query), {"code"})

    def test_code_format(self):
        """
        gta_ and lowercase base32 of 32 bytes, as Forgejo makes them.
        """
        code = self.s.code()
        self.assertRegex(code, r"^gta_[a-z2-7]{52}$")

    def test_post_authorize(self):
        """
        The authorize endpoint also answers POST with form fields.
        """
        reply = self.s.post(
            "/login/oauth/authorize",
            data={
                "client_id": BROKER_ID,
                "redirect_uri": BROKER_REDIRECT,
                "response_type": "code",
                "state": "p",
            },
            headers={"X-Standin-Login": "alice"},
        )
        self.assertEqual(reply.code, 303)
        self.assertEqual(reply.query["state"], "p")


class ConsentTests(OAuthAssertions):
    """
    The consent page and POST /login/oauth/grant, signed in once through
    the test switch (later requests ride on the session cookie).
    """

    def setUp(self):
        self.s = Standin()
        # Sign alice in: the switch signs in and sets the session cookie.
        self.s.get("/", headers={"X-Standin-Login": "alice"})

    def consent(self, **params: Any) -> Any:
        params.setdefault("app", self.s.public)
        params.setdefault("code_challenge", s256(VERIFIER))
        params.setdefault("code_challenge_method", "S256")
        reply = self.s.authorize(login=None, **params)
        self.assertEqual(reply.code, 200, reply.body)
        (form,) = forms(reply.text)
        return form

    def test_consent_is_shown_to_signed_in_users(self):
        form = self.consent(scope="read:user read:repository", nonce="n1")
        self.assertEqual(form.fields["scope"], "read:user read:repository")
        self.assertEqual(form.fields["nonce"], "n1")
        self.assertEqual(self.s.forge.grants, {})

    def test_approve(self):
        form = self.consent(scope="read:user")
        reply = self.s.post("/login/oauth/grant", data={**form.fields, "granted": "true"})
        self.assertEqual(reply.code, 303)
        self.assertTrue(reply.location.startswith(PUBLIC_REDIRECT + "?"))
        self.assertEqual(set(reply.query), {"code", "state"})
        self.assertEqual(reply.query["state"], "st4te")
        grant = self.s.forge.grant_for(self.s.user_id("alice"), self.s.public.client_id)
        assert grant is not None
        self.assertEqual(grant.scope, "read:user")
        # The code is bound to the S256 challenge sent to authorize.
        self.assertTokenError(
            self.s.exchange(reply.query["code"], app=self.s.public, verifier="wrong" * 10),
            "unauthorized_client",
            "failed PKCE code challenge",
        )
        self.assertEqual(self.s.exchange(reply.query["code"], app=self.s.public).code, 200)

    def test_csrf_in_a_header(self):
        form = self.consent()
        csrf = form.fields.pop("_csrf")
        reply = self.s.post(
            "/login/oauth/grant",
            data={**form.fields, "granted": "true"},
            headers={"X-Csrf-Token": csrf},
        )
        self.assertEqual(reply.code, 303)
        self.assertIn("code", reply.query)

    def test_bad_csrf(self):
        form = self.consent()
        for csrf in ["forged", ""]:
            reply = self.s.post(
                "/login/oauth/grant", data={**form.fields, "_csrf": csrf, "granted": "true"}
            )
            self.assertEqual((reply.code, reply.text), (400, "Invalid CSRF token.\n"))
        self.assertEqual((self.s.forge.grants, self.s.forge.codes), ({}, {}))

    def test_deny(self):
        form = self.consent()
        reply = self.s.post("/login/oauth/grant", data={**form.fields, "granted": "false"})
        self.assertErrorRedirect(
            reply, PUBLIC_REDIRECT, "access_denied", "the request is denied", "st4te"
        )
        self.assertEqual((self.s.forge.grants, self.s.forge.codes), ({}, {}))

    def test_form_must_match_the_authorize_request(self):
        for field, value in [
            ("state", "other"),
            ("client_id", BROKER_ID),
            ("redirect_uri", "http://127.0.0.1:1/callback"),
        ]:
            form = self.consent()
            reply = self.s.post(
                "/login/oauth/grant", data={**form.fields, field: value, "granted": "true"}
            )
            self.assertEqual(reply.code, 400, field)
            self.assertIsNone(reply.header("location"))
        self.assertEqual(self.s.forge.codes, {})

    def test_grant_without_authorize(self):
        form = self.consent()
        other = self.s.new_client()
        self.s.get("/", headers={"X-Standin-Login": "alice"}, client=other)
        (page,) = forms(self.s.get("/user/login", client=other).text)
        reply = self.s.post(
            "/login/oauth/grant",
            data={**form.fields, "_csrf": page.fields["_csrf"], "granted": "true"},
            client=other,
        )
        self.assertEqual(reply.code, 400)

    def test_grant_needs_sign_in(self):
        form = self.consent()
        reply = self.s.post(
            "/login/oauth/grant",
            data={**form.fields, "granted": "true"},
            client=self.s.new_client(),
        )
        self.assertEqual((reply.code, reply.location), (303, "/user/login"))

    def test_public_clients_always_see_consent(self):
        form = self.consent(scope="read:user")
        self.s.post("/login/oauth/grant", data={**form.fields, "granted": "true"})
        self.consent(scope="read:user")

    def test_a_different_scope_for_an_existing_grant(self):
        form = self.consent(scope="read:user")
        self.s.post("/login/oauth/grant", data={**form.fields, "granted": "true"})
        form = self.consent(scope="read:user write:issue")
        reply = self.s.post("/login/oauth/grant", data={**form.fields, "granted": "true"})
        self.assertErrorRedirect(
            reply, PUBLIC_REDIRECT, "server_error", "a grant exists with different scope", "st4te"
        )

    def test_confidential_returning_user_skips_consent(self):
        """
        Once granted, a confidential client's authorize redirects straight
        back with a code; the grant keeps its first scope and the new
        request's PKCE challenge binds the new code.
        """
        form = self.consent(app=self.s.broker, scope="read:user")
        first = self.s.post("/login/oauth/grant", data={**form.fields, "granted": "true"})
        self.assertEqual(first.code, 303)

        again = self.s.authorize(
            login=None,
            scope="read:repository",
            state="second",
            code_challenge=s256("another-verifier-" * 3),
            code_challenge_method="S256",
        )
        self.assertEqual(again.code, 303)
        self.assertEqual(again.query["state"], "second")
        self.assertTokenError(
            self.s.exchange(again.query["code"]),
            "unauthorized_client",
            "failed PKCE code challenge",
        )
        tokens = self.s.exchange(again.query["code"], verifier="another-verifier-" * 3)
        self.assertEqual(tokens.code, 200)
        access = tokens.json()["access_token"]
        self.assertEqual(self.s.api("/user", access).code, 200)
        self.assertEqual(self.s.api("/repos/alice/hello-world", access).code, 403)


class TokenEndpointTests(OAuthAssertions):
    def setUp(self):
        self.s = Standin()

    def test_success_fields(self):
        reply = self.s.exchange(self.s.code())
        self.assertEqual(reply.code, 200, reply.body)
        self.assertIn("application/json", reply.header("content-type") or "")
        body = reply.json()
        self.assertEqual(set(body), {"access_token", "token_type", "expires_in", "refresh_token"})
        self.assertEqual(body["token_type"], "bearer")
        self.assertEqual(body["expires_in"], 3600)
        self.assertIn(".", body["access_token"])  # a JWT
        self.assertNotEqual(body["access_token"], body["refresh_token"])

    def test_id_token_only_with_openid(self):
        reply = self.s.exchange(self.s.code(scope="openid read:user"))
        body = reply.json()
        self.assertEqual(
            set(body), {"access_token", "token_type", "expires_in", "refresh_token", "id_token"}
        )
        claims = jwt_claims(body["id_token"])
        self.assertEqual(claims["iss"], BASE)
        self.assertEqual(claims["aud"], [BROKER_ID])
        self.assertEqual(claims["sub"], str(self.s.user_id("alice")))
        # A refresh of an openid grant brings a new id_token too.
        refreshed = self.s.refresh(body["refresh_token"]).json()
        self.assertIn("id_token", refreshed)

    def test_json_body(self):
        reply = self.s.token_request(
            json={
                "grant_type": "authorization_code",
                "code": self.s.code(),
                "client_id": BROKER_ID,
                "client_secret": BROKER_SECRET,
                "redirect_uri": BROKER_REDIRECT,
                "code_verifier": VERIFIER,
            }
        )
        self.assertEqual(reply.code, 200, reply.body)
        self.assertEqual(reply.json()["token_type"], "bearer")

    def test_json_body_errors_too(self):
        reply = self.s.token_request(json={"grant_type": "password"})
        self.assertTokenError(
            reply,
            "unsupported_grant_type",
            "Only refresh_token or authorization_code grant type is supported",
        )

    def test_no_client_credentials(self):
        reply = self.s.exchange(self.s.code(), client_id=None, client_secret=None)
        self.assertTokenError(reply, "invalid_client", "cannot load client with client id: ''")

    def test_basic_client_credentials(self):
        code = self.s.code()
        data = {"grant_type": "authorization_code", "code": code, "code_verifier": VERIFIER}
        reply = self.s.token_request(
            data=data, headers={"Authorization": basic(BROKER_ID, BROKER_SECRET)}
        )
        self.assertEqual(reply.code, 200, reply.body)

    def test_basic_scheme_is_case_insensitive(self):
        data = {
            "grant_type": "authorization_code",
            "code": self.s.code(),
            "code_verifier": VERIFIER,
        }
        header = basic(BROKER_ID, BROKER_SECRET).replace("Basic", "basic")
        reply = self.s.token_request(data=data, headers={"Authorization": header})
        self.assertEqual(reply.code, 200, reply.body)

    def test_basic_plus_consistent_body(self):
        data = {
            "grant_type": "authorization_code",
            "code": self.s.code(),
            "code_verifier": VERIFIER,
            "client_id": BROKER_ID,
        }
        reply = self.s.token_request(
            data=data, headers={"Authorization": basic(BROKER_ID, BROKER_SECRET)}
        )
        self.assertEqual(reply.code, 200, reply.body)

    def test_basic_inconsistent_with_body(self):
        code = self.s.code()
        auth = {"Authorization": basic(BROKER_ID, BROKER_SECRET)}
        reply = self.s.token_request(
            data={"grant_type": "authorization_code", "code": code, "client_id": "other"},
            headers=auth,
        )
        self.assertTokenError(
            reply,
            "invalid_request",
            "client_id in request body inconsistent with Authorization header",
        )
        reply = self.s.token_request(
            data={"grant_type": "authorization_code", "code": code, "client_secret": "other"},
            headers=auth,
        )
        self.assertTokenError(
            reply,
            "invalid_request",
            "client_secret in request body inconsistent with Authorization header",
        )

    def test_body_credentials_win_when_complete(self):
        """
        With both client_id and client_secret in the body, the header is not
        read at all.
        """
        reply = self.s.token_request(
            data={
                "grant_type": "authorization_code",
                "code": self.s.code(),
                "client_id": BROKER_ID,
                "client_secret": BROKER_SECRET,
                "code_verifier": VERIFIER,
            },
            headers={"Authorization": "Basic !!!"},
        )
        self.assertEqual(reply.code, 200, reply.body)

    def test_unparsable_basic_header(self):
        for value in ["Basic !!!", "Basic " + base64.b64encode(b"no-colon").decode()]:
            reply = self.s.token_request(
                data={"grant_type": "authorization_code", "code": "x"},
                headers={"Authorization": value},
            )
            self.assertTokenError(reply, "invalid_request", "cannot parse basic auth header")

    def test_basic_header_is_read_before_grant_type(self):
        reply = self.s.token_request(
            data={"grant_type": "password"}, headers={"Authorization": "Basic !!!"}
        )
        self.assertTokenError(reply, "invalid_request", "cannot parse basic auth header")

    def test_unsupported_grant_type(self):
        for grant_type in ["password", "client_credentials", "", None]:
            data = {"client_id": BROKER_ID, "client_secret": BROKER_SECRET}
            if grant_type is not None:
                data["grant_type"] = grant_type
            self.assertTokenError(
                self.s.token_request(data=data),
                "unsupported_grant_type",
                "Only refresh_token or authorization_code grant type is supported",
            )

    # --- the code grant's errors, in Forgejo's order of checks

    def test_code_unknown_client(self):
        reply = self.s.exchange(self.s.code(), client_id="nobody")
        self.assertTokenError(
            reply, "invalid_client", "cannot load client with client id: 'nobody'"
        )

    def test_code_wrong_or_missing_secret(self):
        code = self.s.code()
        self.assertTokenError(
            self.s.exchange(code, client_secret="wrong"),
            "unauthorized_client",
            "invalid client secret",
        )
        self.assertTokenError(
            self.s.exchange(code, client_secret=None),
            "unauthorized_client",
            "invalid empty client secret",
        )
        # Neither used the code up.
        self.assertEqual(self.s.exchange(code).code, 200)

    def test_public_client_needs_no_secret(self):
        code = self.s.code(app=self.s.public)
        reply = self.s.exchange(code, app=self.s.public)
        self.assertEqual(reply.code, 200, reply.body)

    def test_code_unregistered_redirect_uri(self):
        code = self.s.code()
        self.assertTokenError(
            self.s.exchange(code, redirect_uri="http://evil.example/cb"),
            "unauthorized_client",
            "unexpected redirect URI",
        )
        # Leaving it out is fine: Forgejo checks it only when sent.
        self.assertEqual(self.s.exchange(code, redirect_uri=None).code, 200)

    def test_unknown_code(self):
        for code in ["gta_nonsense", ""]:
            self.assertTokenError(
                self.s.exchange(code), "unauthorized_client", "client is not authorized"
            )

    def test_code_is_single_use(self):
        code = self.s.code()
        self.assertEqual(self.s.exchange(code).code, 200)
        self.assertTokenError(
            self.s.exchange(code), "unauthorized_client", "client is not authorized"
        )

    def test_pkce_failure_does_not_use_the_code_up(self):
        code = self.s.code()
        for verifier in ["x" * 43, None, s256(VERIFIER)]:
            self.assertTokenError(
                self.s.exchange(code, verifier=verifier),
                "unauthorized_client",
                "failed PKCE code challenge",
            )
        self.assertEqual(self.s.exchange(code).code, 200)

    def test_plain_pkce(self):
        code = self.s.code(app=self.s.public, verifier="plain-verifier", method="plain")
        self.assertTokenError(
            self.s.exchange(code, app=self.s.public, verifier=s256("plain-verifier")),
            "unauthorized_client",
            "failed PKCE code challenge",
        )
        self.assertEqual(
            self.s.exchange(code, app=self.s.public, verifier="plain-verifier").code, 200
        )

    def test_code_of_another_app(self):
        other = self.s.forge.add_app("other", [BROKER_REDIRECT], client_id="o", client_secret="o")
        code = self.s.code()
        self.assertTokenError(self.s.exchange(code, app=other), "invalid_grant", "invalid grant")
        # That did not consume it: its own app can still redeem it.
        self.assertEqual(self.s.exchange(code).code, 200)

    def test_codes_do_not_expire(self):
        code = self.s.code()
        self.s.clock.advance(30 * 24 * 3600)
        self.assertEqual(self.s.exchange(code).code, 200)

    # --- the refresh grant's errors

    def test_refresh_unknown_client(self):
        tokens = self.s.tokens()
        reply = self.s.token_request(
            data={
                "grant_type": "refresh_token",
                "refresh_token": tokens["refresh_token"],
                "client_id": "nobody",
                "client_secret": "x",
            }
        )
        self.assertTokenError(
            reply, "invalid_client", 'cannot load client with client id: "nobody"'
        )

    def test_refresh_wrong_or_missing_secret(self):
        tokens = self.s.tokens()
        data = {
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
            "client_id": BROKER_ID,
        }
        self.assertTokenError(
            self.s.token_request(data={**data, "client_secret": "wrong"}),
            "invalid_client",
            "invalid client secret",
        )
        self.assertTokenError(
            self.s.token_request(data=data), "invalid_client", "invalid empty client secret"
        )
        # The refresh token was not burnt by those.
        self.assertEqual(self.s.refresh(tokens["refresh_token"]).code, 200)

    def test_refresh_unparsable(self):
        tokens = self.s.tokens()
        head, payload, sig = tokens["refresh_token"].split(".")
        for token in ["", "garbage", "a.b.c", f"{head}.{payload}.{sig[::-1]}"]:
            self.assertTokenError(
                self.s.refresh(token), "unauthorized_client", "unable to parse refresh token"
            )

    def test_refresh_token_of_another_forgejo(self):
        """
        Tokens are signed with a per-instance key.
        """
        other = Standin()
        tokens = other.tokens()
        self.assertTokenError(
            self.s.refresh(tokens["refresh_token"]),
            "unauthorized_client",
            "unable to parse refresh token",
        )
        self.assertEqual(self.s.api("/user", tokens["access_token"]).code, 401)

    def test_refresh_token_expiry(self):
        tokens = self.s.tokens()
        self.s.clock.advance(REFRESH_TOKEN_LIFETIME - 1)
        self.assertEqual(self.s.refresh(tokens["refresh_token"]).code, 200)
        tokens = self.s.tokens()
        self.s.clock.advance(REFRESH_TOKEN_LIFETIME)
        self.assertTokenError(
            self.s.refresh(tokens["refresh_token"]),
            "unauthorized_client",
            "unable to parse refresh token",
        )

    def test_refresh_replay(self):
        tokens = self.s.tokens()
        first = self.s.refresh(tokens["refresh_token"])
        self.assertEqual(first.code, 200)
        self.assertEqual(
            set(first.json()), {"access_token", "token_type", "expires_in", "refresh_token"}
        )
        self.assertTokenError(
            self.s.refresh(tokens["refresh_token"]), "unauthorized_client", "token was already used"
        )
        self.assertEqual(self.s.refresh(first.json()["refresh_token"]).code, 200)

    def test_access_token_is_not_a_refresh_token(self):
        tokens = self.s.tokens()
        self.assertTokenError(
            self.s.refresh(tokens["access_token"]), "unauthorized_client", "token was already used"
        )

    def test_new_code_exchange_invalidates_older_refresh_tokens(self):
        """
        One grant per user and app: a second sign-in's token issue makes the
        first session's refresh token stale, though its access token lives on.
        """
        first = self.s.tokens()
        second = self.s.tokens()
        self.assertTokenError(
            self.s.refresh(first["refresh_token"]), "unauthorized_client", "token was already used"
        )
        self.assertEqual(self.s.api("/user", first["access_token"]).code, 200)
        self.assertEqual(self.s.refresh(second["refresh_token"]).code, 200)

    def test_other_users_grants_are_separate(self):
        alice = self.s.tokens("alice")
        bob = self.s.tokens("bob")
        self.assertEqual(self.s.refresh(alice["refresh_token"]).code, 200)
        self.assertEqual(self.s.refresh(bob["refresh_token"]).code, 200)
        self.assertEqual(self.s.api("/user", bob["access_token"]).json()["login"], "bob")

    def test_other_apps_grants_are_separate(self):
        broker = self.s.tokens()
        public = self.s.tokens(app=self.s.public)
        self.assertEqual(self.s.refresh(broker["refresh_token"]).code, 200)
        self.assertEqual(self.s.refresh(public["refresh_token"], app=self.s.public).code, 200)

    def test_revoked_grant(self):
        tokens = self.s.tokens()
        self.s.forge.revoke_grant(self.s.user_id("alice"), BROKER_ID)
        self.assertTokenError(
            self.s.refresh(tokens["refresh_token"]), "invalid_grant", "grant does not exist"
        )
        self.assertEqual(self.s.api("/user", tokens["access_token"]).code, 401)

    # --- lifetimes

    def test_access_token_expiry(self):
        tokens = self.s.tokens()
        self.s.clock.advance(3599)
        self.assertEqual(self.s.api("/user", tokens["access_token"]).code, 200)
        self.s.clock.advance(1)
        self.assertEqual(self.s.api("/user", tokens["access_token"]).code, 401)
        # The refresh token outlives it and brings a working one.
        refreshed = self.s.refresh(tokens["refresh_token"]).json()
        self.assertEqual(self.s.api("/user", refreshed["access_token"]).code, 200)

    def test_configured_access_token_lifetime(self):
        s = Standin(access_token_lifetime=60)
        tokens = s.tokens()
        self.assertEqual(tokens["expires_in"], 60)
        s.clock.advance(59)
        self.assertEqual(s.api("/user", tokens["access_token"]).code, 200)
        s.clock.advance(1)
        self.assertEqual(s.api("/user", tokens["access_token"]).code, 401)

    def test_no_store(self):
        reply = self.s.exchange(self.s.code())
        self.assertEqual(reply.header("cache-control"), "no-store")


class TokenSequenceTests(OAuthAssertions):
    """
    The token state machine as a property over sequences of sign-ins,
    refreshes, replays and revocations by one user of one app.
    """

    @settings(max_examples=60)
    @given(
        st.sampled_from(["broker", "public"]),
        st.lists(st.sampled_from(["code", "refresh", "replay", "revoke"]), min_size=1, max_size=10),
        st.data(),
    )
    def test_only_the_newest_refresh_token_works(self, which, steps, data):
        s = Standin()
        app = s.broker if which == "broker" else s.public
        live: list[dict[str, Any]] = []  # tokens of the current grant, oldest first
        dead: list[dict[str, Any]] = []  # tokens of revoked grants
        for step in steps:
            if step == "refresh" and live:
                reply = s.refresh(live[-1]["refresh_token"], app=app)
                self.assertEqual(reply.code, 200, reply.body)
                live.append(reply.json())
            elif step == "replay" and len(live) > 1:
                old = data.draw(st.sampled_from(live[:-1]))
                self.assertTokenError(
                    s.refresh(old["refresh_token"], app=app),
                    "unauthorized_client",
                    "token was already used",
                )
            elif step == "revoke":
                s.forge.revoke_grant(s.user_id("alice"), app.client_id)
                dead += live
                live = []
            else:
                live.append(s.tokens(app=app))

        for tokens in dead:
            self.assertEqual(s.api("/user", tokens["access_token"]).code, 401)
            self.assertTokenError(
                s.refresh(tokens["refresh_token"], app=app), "invalid_grant", "grant does not exist"
            )
        for tokens in live[:-1]:
            self.assertTokenError(
                s.refresh(tokens["refresh_token"], app=app),
                "unauthorized_client",
                "token was already used",
            )
        for tokens in live:
            self.assertEqual(s.api("/user", tokens["access_token"]).code, 200)
        if live:
            self.assertEqual(s.refresh(live[-1]["refresh_token"], app=app).code, 200)
            s.forge.revoke_grant(s.user_id("alice"), app.client_id)
            for tokens in live:
                self.assertEqual(s.api("/user", tokens["access_token"]).code, 401)
            self.assertTokenError(
                s.refresh(live[-1]["refresh_token"], app=app),
                "invalid_grant",
                "grant does not exist",
            )


class UserinfoTests(SynchronousTestCase):
    def setUp(self):
        self.s = Standin()

    def test_without_token(self):
        for method in ["GET", "POST"]:
            reply = self.s.request(method, "/login/oauth/userinfo")
            self.assertEqual((reply.code, reply.text), (401, "no valid authorization"))
            self.assertEqual(reply.header("www-authenticate"), 'Bearer realm=""')

    def test_with_token(self):
        token = self.s.access_token()
        for scheme in ["Bearer", "bearer", "token"]:
            for method in ["GET", "POST"]:
                reply = self.s.request(
                    method, "/login/oauth/userinfo", headers={"Authorization": f"{scheme} {token}"}
                )
                self.assertEqual(reply.code, 200, (scheme, method))
                body = reply.json()
                self.assertEqual(
                    {k: body[k] for k in ("sub", "name", "preferred_username", "email")},
                    {
                        "sub": str(self.s.user_id("alice")),
                        "name": "Alice Liddell",
                        "preferred_username": "alice",
                        "email": "alice@example.invalid",
                    },
                )
                self.assertTrue(body["picture"].startswith("http"))

    def test_bad_tokens(self):
        tokens = self.s.tokens()
        for header in [
            "Bearer garbage",
            f"Bearer {tokens['refresh_token']}",
            f"Basic {tokens['access_token']}",
            f"Token {tokens['access_token']}",
        ]:
            reply = self.s.get("/login/oauth/userinfo", headers={"Authorization": header})
            self.assertEqual(reply.code, 401, header)
        self.s.clock.advance(3600)
        reply = self.s.get(
            "/login/oauth/userinfo", headers={"Authorization": f"Bearer {tokens['access_token']}"}
        )
        self.assertEqual(reply.code, 401)


class IntrospectTests(SynchronousTestCase):
    def setUp(self):
        self.s = Standin()

    def introspect(self, token: str, auth: str | None = None) -> Reply:
        return self.s.post(
            "/login/oauth/introspect",
            data={"token": token},
            headers={"Authorization": auth or basic(BROKER_ID, BROKER_SECRET)},
        )

    def test_needs_client_credentials(self):
        token = self.s.access_token()
        for auth in [basic(BROKER_ID, "wrong"), basic("nobody", "x"), f"Bearer {token}", "Basic !"]:
            reply = self.introspect(token, auth)
            self.assertEqual((reply.code, reply.text), (401, "no valid authorization"), auth)
            self.assertEqual(reply.header("www-authenticate"), 'Basic realm=""')
        reply = self.s.post("/login/oauth/introspect", data={"token": token})
        self.assertEqual(reply.code, 401)

    def test_active_token(self):
        tokens = self.s.tokens(scope="read:user claudeai")
        for token in [tokens["access_token"], tokens["refresh_token"]]:
            reply = self.introspect(token)
            self.assertEqual(reply.code, 200)
            self.assertEqual(
                reply.json(),
                {
                    "active": True,
                    "scope": "read:user claudeai",
                    "username": "alice",
                    "iss": BASE,
                    "sub": str(self.s.user_id("alice")),
                    "aud": [BROKER_ID],
                },
            )

    def test_any_apps_credentials_will_do(self):
        tokens = self.s.tokens()
        self.s.forge.add_app("o", ["http://x/"], client_id="o", client_secret="os")
        self.assertTrue(self.introspect(tokens["access_token"], basic("o", "os")).json()["active"])

    def test_inactive_tokens(self):
        tokens = self.s.tokens()
        self.assertEqual(self.introspect("garbage").json(), {"active": False})
        self.s.clock.advance(3600)
        self.assertEqual(self.introspect(tokens["access_token"]).json(), {"active": False})
        self.s.forge.revoke_grant(self.s.user_id("alice"), BROKER_ID)
        self.assertEqual(self.introspect(tokens["refresh_token"]).json(), {"active": False})


class DiscoveryTests(SynchronousTestCase):
    def test_openid_configuration(self):
        s = Standin(base_url=BASE + "/")
        reply = s.get("/.well-known/openid-configuration")
        self.assertEqual(reply.code, 200)
        doc = reply.json()
        self.assertEqual(doc["issuer"], BASE)
        self.assertEqual(
            {k: doc[k] for k in doc if k.endswith(("_endpoint", "_uri"))},
            {
                "authorization_endpoint": BASE + "/login/oauth/authorize",
                "token_endpoint": BASE + "/login/oauth/access_token",
                "jwks_uri": BASE + "/login/oauth/keys",
                "userinfo_endpoint": BASE + "/login/oauth/userinfo",
                "introspection_endpoint": BASE + "/login/oauth/introspect",
            },
        )
        self.assertEqual(doc["response_types_supported"], ["code", "id_token"])
        self.assertEqual(doc["subject_types_supported"], ["public"])
        self.assertEqual(doc["scopes_supported"], ["openid", "profile", "email", "groups"])
        self.assertEqual(doc["code_challenge_methods_supported"], ["plain", "S256"])
        self.assertEqual(doc["grant_types_supported"], ["authorization_code", "refresh_token"])
        self.assertIn("preferred_username", doc["claims_supported"])
        self.assertEqual(len(doc["id_token_signing_alg_values_supported"]), 1)

    def test_jwks(self):
        s = Standin()
        reply = s.get("/login/oauth/keys")
        self.assertEqual(reply.code, 200)
        (key,) = reply.json()["keys"]
        self.assertEqual(key["use"], "sig")
        alg = s.get("/.well-known/openid-configuration").json()[
            "id_token_signing_alg_values_supported"
        ]
        self.assertEqual([key["alg"]], alg)
        self.assertNotIn("k", key)  # an HMAC key's secret is never published

    def test_what_forgejo_does_not_have(self):
        """
        No RFC 8414 metadata, no dynamic client registration, no revocation:
        the reasons the broker exists.
        """
        s = Standin()
        for method, path in [
            ("GET", "/.well-known/oauth-authorization-server"),
            ("POST", "/login/oauth/register"),
            ("POST", "/register"),
            ("POST", "/login/oauth/revoke"),
        ]:
            self.assertEqual(s.request(method, path).code, 404, path)

    def test_base_url_can_change_after_start(self):
        """
        What C{python -m fjmcp_dev.standin} does once it knows its port.
        """
        forge = Forge(lambda: 0.0)
        web = StandinForgejo(forge, "http://unset")
        web.base_url = "http://127.0.0.1:4321/"
        self.assertEqual(web.base_url, "http://127.0.0.1:4321")
        self.assertEqual(web.api.base_url, "http://127.0.0.1:4321")
        self.assertEqual(forge.issuer, "http://127.0.0.1:4321")
