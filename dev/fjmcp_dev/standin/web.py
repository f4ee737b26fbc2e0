"""
The stand-in's web side: Forgejo's OAuth2 provider endpoints (authorize,
consent, token, userinfo, introspect, discovery), a sign-in page where a
person picks a seeded user, and the API mounted at C{/api/v1}.

Behaviour follows Forgejo's C{routers/web/auth/oauth.go} as summarised in
C{../shared/brief/forgejo.md}: status codes, redirect-vs-HTML-page errors and
error texts included, so the broker is tested against what it will meet.

The test switch: when C{test_login} is on, a request carrying
C{X-Standin-Login: <login>} is signed in as that user and the consent page
approves itself, so tests can run the whole flow without a browser.
"""

from __future__ import annotations

import base64
import binascii
import html
import json
import secrets
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from klein import Klein
from twisted.web.server import Request

from fjmcp_dev.standin.api import ForgejoAPI, read_body
from fjmcp_dev.standin.model import App, Forge, OAuthError, User, redirect_uri_matches

SESSION_COOKIE = b"i_like_forgejo"
TEST_LOGIN_HEADER = b"x-standin-login"

_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title} - Forgejo stand-in</title>
<style>body{{font-family:sans-serif;max-width:36em;margin:3em auto;padding:0 1em}}
button{{font-size:1em;margin:.3em;padding:.4em 1em}}</style></head>
<body><h1>{title}</h1>{body}
<p><small>Forgejo stand-in for fjmcp development. Not a real Forgejo.</small></p></body></html>
"""


def page(title: str, body: str) -> bytes:
    return _PAGE.format(title=html.escape(title), body=body).encode()


def with_query(uri: str, params: dict[str, str]) -> str:
    """
    Add C{params} to C{uri}, keeping its own query; keys sorted as Go's
    C{url.Values.Encode} does.
    """
    parts = urlsplit(uri)
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    query.update(params)
    return urlunsplit(parts._replace(query=urlencode(sorted(query.items()))))


class StandinForgejo:
    """
    The whole stand-in as one Klein tree over a L{Forge}.
    """

    app = Klein()

    def __init__(self, forge: Forge, base_url: str, test_login: bool = False) -> None:
        self.forge = forge
        self.test_login = test_login
        self.api = ForgejoAPI(forge, base_url)
        self.base_url = base_url
        # session id -> {"uid": int, "csrf": str, "authorize": {...}}
        self._sessions: dict[str, dict[str, Any]] = {}

    @property
    def base_url(self) -> str:
        """
        The stand-in's public URL (Forgejo's AppURL without its trailing
        slash); setting it also updates the API's and the id_token issuer.
        """
        return self.api.base_url

    @base_url.setter
    def base_url(self, url: str) -> None:
        self.api.base_url = url.rstrip("/")
        self.forge.issuer = self.api.base_url

    def resource(self) -> Any:
        return self.app.resource()

    # --- sessions

    def _session(self, request: Request, create: bool = False) -> dict[str, Any] | None:
        # A session created earlier in this same request wins over the cookie
        # the request came with, so one request never starts two sessions.
        sid = (
            getattr(request, "_standin_sid", None)
            or (request.getCookie(SESSION_COOKIE) or b"").decode()
        )
        session = self._sessions.get(sid)
        if session is None and create:
            sid = secrets.token_urlsafe(16)
            session = self._sessions[sid] = {"csrf": secrets.token_urlsafe(16)}
            request.addCookie(SESSION_COOKIE, sid.encode(), path=b"/", httpOnly=True)
            setattr(request, "_standin_sid", sid)  # noqa: B010
        return session

    def _signed_in(self, request: Request) -> User | None:
        if self.test_login:
            login = request.getHeader(TEST_LOGIN_HEADER)
            if login:
                user = self.forge.user_by_login(login.decode())
                if user is not None:
                    session = self._session(request, create=True)
                    assert session is not None
                    session["uid"] = user.id
                    return user
        session = self._session(request)
        if session and "uid" in session:
            return self.forge.users.get(session["uid"])
        return None

    def _args(self, request: Request) -> dict[str, str]:
        """
        Query and form fields as Forgejo's binding reads them (JSON bodies too).
        """
        out = {k.decode(): v[0].decode() for k, v in request.args.items() if v}
        content_type = (request.getHeader(b"content-type") or b"").decode()
        if "json" in content_type:
            try:
                body = json.loads(read_body(request) or b"{}")
            except ValueError:
                body = {}
            if isinstance(body, dict):
                out.update({k: str(v) for k, v in body.items() if v is not None})
        return out

    # --- sign-in

    @app.route("/user/login", methods=["GET"])
    def login_page(self, request: Request) -> bytes:
        session = self._session(request, create=True)
        assert session is not None
        buttons = "".join(
            f'<button name="user" value="{html.escape(u.login)}">'
            f"{html.escape(u.full_name)} ({html.escape(u.login)})</button><br>"
            for u in self.forge.users.values()
        )
        return page(
            "Sign in",
            '<p>Pick the user to sign in as:</p><form method="post" action="/user/login">'
            f'<input type="hidden" name="_csrf" value="{session["csrf"]}">{buttons}</form>',
        )

    @app.route("/user/login", methods=["POST"])
    def login(self, request: Request) -> bytes:
        session = self._session(request)
        args = self._args(request)
        if session is None or not secrets.compare_digest(args.get("_csrf", ""), session["csrf"]):
            request.setResponseCode(400)
            return b"Invalid CSRF token.\n"
        user = self.forge.user_by_login(args.get("user", ""))
        if user is None:
            request.setResponseCode(400)
            return page("Sign in", "<p>Unknown user.</p>")
        session["uid"] = user.id
        target = unquote((request.getCookie(b"redirect_to") or b"").decode()) or "/"
        if not target.startswith("/") or target.startswith("//"):
            target = "/"
        request.addCookie(b"redirect_to", b"", path=b"/", max_age=b"0")
        request.redirect(target.encode())
        request.setResponseCode(303)
        return b""

    @app.route("/", methods=["GET"])
    def home(self, request: Request) -> bytes:
        user = self._signed_in(request)
        who = (
            f"Signed in as {html.escape(user.login)}."
            if user
            else ('<a href="/user/login">Sign in</a>')
        )
        return page("Forgejo stand-in", f"<p>{who}</p>")

    # --- OAuth2 provider

    def _authorize_error(self, request: Request, status: int, error: str, text: str) -> bytes:
        request.setResponseCode(status)
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return page(
            "Authorization failed",
            f"<p>{html.escape(error)}</p><h3>{html.escape(text)}</h3>",
        )

    def _redirect(self, request: Request, uri: str) -> bytes:
        request.redirect(uri.encode())
        request.setResponseCode(303)
        return b""

    def _redirect_error(
        self, request: Request, redirect_uri: str, state: str, error: str, text: str
    ) -> bytes:
        return self._redirect(
            request,
            with_query(redirect_uri, {"error": error, "error_description": text, "state": state}),
        )

    def _redirect_code(
        self,
        request: Request,
        app: App,
        user: User,
        scope: str,
        args: dict[str, str],
        challenge: str,
        method: str,
    ) -> bytes:
        grant = self.forge.ensure_grant(user.id, app.client_id, scope)
        code = self.forge.issue_code(grant, args["redirect_uri"], challenge, method)
        params = {"code": code}
        if args.get("state"):
            params["state"] = args["state"]
        return self._redirect(request, with_query(args["redirect_uri"], params))

    @app.route("/login/oauth/authorize", methods=["GET", "POST"])
    def authorize(self, request: Request) -> bytes:
        user = self._signed_in(request)
        if user is None:
            request.addCookie(
                b"redirect_to",
                quote(request.uri.decode(), safe="").encode(),
                path=b"/",
                httpOnly=True,
            )
            return self._redirect(request, "/user/login")
        args = self._args(request)
        app = self.forge.apps.get(args.get("client_id", ""))
        if app is None:
            return self._authorize_error(
                request, 400, "unauthorized_client", "Client ID not registered"
            )
        redirect_uri = args.get("redirect_uri", "")
        if not redirect_uri or not redirect_uri_matches(
            app.redirect_uris, redirect_uri, not app.confidential
        ):
            return self._authorize_error(
                request, 400, "invalid_request", "Unregistered Redirect URI"
            )
        state = args.get("state", "")
        if args.get("response_type") != "code":
            return self._redirect_error(
                request,
                redirect_uri,
                state,
                "unsupported_response_type",
                "Only code response type is supported.",
            )
        method = args.get("code_challenge_method", "")
        if method == "" and not app.confidential:
            return self._redirect_error(
                request,
                redirect_uri,
                state,
                "invalid_request",
                "PKCE is required for public clients",
            )
        if method not in ("", "S256", "plain"):
            return self._redirect_error(
                request,
                redirect_uri,
                state,
                "invalid_request",
                "unsupported code challenge method",
            )
        challenge = args.get("code_challenge", "")
        scope = args.get("scope", "")
        grant = self.forge.grant_for(user.id, app.client_id)
        if app.confidential and grant is not None:
            # A returning user of a confidential app skips consent; the
            # grant keeps the scope it was created with.
            return self._redirect_code(request, app, user, grant.scope, args, challenge, method)
        session = self._session(request, create=True)
        assert session is not None
        session["authorize"] = {
            "client_id": app.client_id,
            "redirect_uri": redirect_uri,
            "state": state,
            "code_challenge": challenge,
            "code_challenge_method": method,
        }
        if self.test_login and request.getHeader(TEST_LOGIN_HEADER):
            return self._grant(request, user, session, {**args, "granted": "true"})
        hidden = "".join(
            f'<input type="hidden" name="{k}" value="{html.escape(v)}">'
            for k, v in (
                ("_csrf", session["csrf"]),
                ("client_id", app.client_id),
                ("state", state),
                ("scope", scope),
                ("nonce", args.get("nonce", "")),
                ("redirect_uri", redirect_uri),
            )
        )
        return page(
            "Authorize application",
            f"<p>Signed in as <b>{html.escape(user.login)}</b>.</p>"
            f"<p><b>{html.escape(app.name)}</b> wants to access your account.</p>"
            f"<p>With scopes: {html.escape(scope)}.</p>"
            f"<p>You will be redirected to {html.escape(redirect_uri)}.</p>"
            f'<form method="post" action="/login/oauth/grant">{hidden}'
            '<button id="authorize-app" name="granted" value="true">Authorize Application</button>'
            '<button name="granted" value="false">Cancel</button></form>',
        )

    @app.route("/login/oauth/grant", methods=["POST"])
    def grant(self, request: Request) -> bytes:
        user = self._signed_in(request)
        if user is None:
            return self._redirect(request, "/user/login")
        session = self._session(request)
        args = self._args(request)
        token = args.get("_csrf") or (request.getHeader(b"x-csrf-token") or b"").decode()
        if session is None or not secrets.compare_digest(token, session["csrf"]):
            request.setResponseCode(400)
            return b"Invalid CSRF token.\n"
        return self._grant(request, user, session, args)

    def _grant(
        self, request: Request, user: User, session: dict[str, Any], args: dict[str, str]
    ) -> bytes:
        pending = session.get("authorize") or {}
        if any(pending.get(k) != args.get(k, "") for k in ("client_id", "state", "redirect_uri")):
            request.setResponseCode(400)
            return b"Bad Request\n"
        app = self.forge.apps[pending["client_id"]]
        redirect_uri, state = pending["redirect_uri"], pending["state"]
        if args.get("granted") != "true":
            return self._redirect_error(
                request, redirect_uri, state, "access_denied", "the request is denied"
            )
        scope = args.get("scope", "")
        grant = self.forge.grant_for(user.id, app.client_id)
        if grant is not None and grant.scope != scope:
            return self._redirect_error(
                request, redirect_uri, state, "server_error", "a grant exists with different scope"
            )
        del session["authorize"]
        return self._redirect_code(
            request,
            app,
            user,
            scope,
            {"redirect_uri": redirect_uri, "state": state},
            pending["code_challenge"],
            pending["code_challenge_method"],
        )

    def _token_error(self, request: Request, error: OAuthError) -> bytes:
        request.setResponseCode(400)
        request.setHeader(b"content-type", b"application/json;charset=utf-8")
        return json.dumps({"error": error.error, "error_description": error.description}).encode()

    def _client_credentials(self, request: Request, args: dict[str, str]) -> tuple[str, str]:
        client_id, secret = args.get("client_id", ""), args.get("client_secret", "")
        if client_id and secret:
            return client_id, secret
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic":
            return client_id, secret
        try:
            basic_id, colon, basic_secret = (
                base64.b64decode(value.strip(), validate=True).decode().partition(":")
            )
        except (binascii.Error, UnicodeDecodeError):
            colon = ""
        if not colon:
            raise OAuthError("invalid_request", "cannot parse basic auth header")
        # Forgejo takes Basic credentials as they are, without form-decoding them.
        if client_id and client_id != basic_id:
            raise OAuthError(
                "invalid_request",
                "client_id in request body inconsistent with Authorization header",
            )
        if secret and secret != basic_secret:
            raise OAuthError(
                "invalid_request",
                "client_secret in request body inconsistent with Authorization header",
            )
        return basic_id, basic_secret

    @app.route("/login/oauth/access_token", methods=["POST"])
    def access_token(self, request: Request) -> bytes:
        args = self._args(request)
        request.setHeader(b"cache-control", b"no-store")
        try:
            # Forgejo reads the Basic header before it looks at grant_type.
            client_id, secret = self._client_credentials(request, args)
            grant_type = args.get("grant_type", "")
            if grant_type not in ("authorization_code", "refresh_token"):
                raise OAuthError(
                    "unsupported_grant_type",
                    "Only refresh_token or authorization_code grant type is supported",
                )
            app = self.forge.authenticate_client(client_id, secret, grant_type)
            if grant_type == "refresh_token":
                tokens = self.forge.refresh(app, args.get("refresh_token", ""))
            else:
                tokens = self.forge.exchange_code(
                    app,
                    args.get("code", ""),
                    args.get("redirect_uri", ""),
                    args.get("code_verifier", ""),
                )
        except OAuthError as e:
            return self._token_error(request, e)
        request.setHeader(b"content-type", b"application/json;charset=utf-8")
        return json.dumps(tokens.to_json()).encode()

    def _bearer_user(self, request: Request) -> User | None:
        header = (request.getHeader(b"authorization") or b"").decode("latin-1")
        # Forgejo's parseToken: exactly two fields, "token" or any-case "bearer".
        parts = header.split()
        if len(parts) != 2 or not (parts[0] == "token" or parts[0].lower() == "bearer"):
            return None
        found = self.forge.user_for_access_token(parts[1])
        return found[0] if found else None

    @app.route("/login/oauth/userinfo", methods=["GET", "POST"])
    def userinfo(self, request: Request) -> bytes:
        user = self._bearer_user(request)
        if user is None:
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Bearer realm=""')
            return b"no valid authorization"
        request.setHeader(b"content-type", b"application/json;charset=utf-8")
        return json.dumps(
            {
                "sub": str(user.id),
                "name": user.full_name,
                "preferred_username": user.login,
                "email": user.email,
                "picture": f"{self.base_url}/avatars/{user.login}",
            }
        ).encode()

    @app.route("/login/oauth/introspect", methods=["POST"])
    def introspect(self, request: Request) -> bytes:
        try:
            client_id, secret = self._client_credentials(request, {})
            app = self.forge.apps.get(client_id)
            ok = app is not None and secrets.compare_digest(secret, app.client_secret)
        except OAuthError:
            ok = False
        if not ok:
            request.setResponseCode(401)
            request.setHeader(b"www-authenticate", b'Basic realm=""')
            return b"no valid authorization"
        request.setHeader(b"content-type", b"application/json;charset=utf-8")
        token = self._args(request).get("token", "")
        grant = self.forge.grant_for_token(token, access_only=False)
        if grant is None or grant.client_id not in self.forge.apps:
            return json.dumps({"active": False}).encode()
        user = self.forge.users[grant.user_id]
        return json.dumps(
            {
                "active": True,
                "scope": grant.scope,
                "username": user.login,
                "iss": self.base_url,
                "sub": str(user.id),
                "aud": [grant.client_id],
            }
        ).encode()

    @app.route("/.well-known/openid-configuration", methods=["GET"])
    def openid_configuration(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json;charset=utf-8")
        base = self.base_url + "/login/oauth/"
        return json.dumps(
            {
                "issuer": self.base_url,
                "authorization_endpoint": base + "authorize",
                "token_endpoint": base + "access_token",
                "jwks_uri": base + "keys",
                "userinfo_endpoint": base + "userinfo",
                "introspection_endpoint": base + "introspect",
                "response_types_supported": ["code", "id_token"],
                "id_token_signing_alg_values_supported": ["HS256"],
                "subject_types_supported": ["public"],
                "scopes_supported": ["openid", "profile", "email", "groups"],
                "claims_supported": [
                    "aud",
                    "exp",
                    "iat",
                    "iss",
                    "sub",
                    "name",
                    "preferred_username",
                    "profile",
                    "picture",
                    "website",
                    "locale",
                    "updated_at",
                    "email",
                    "email_verified",
                    "groups",
                ],
                "code_challenge_methods_supported": ["plain", "S256"],
                "grant_types_supported": ["authorization_code", "refresh_token"],
            }
        ).encode()

    @app.route("/login/oauth/keys", methods=["GET"])
    def keys(self, request: Request) -> bytes:
        """
        The JWKS.  With an HMAC signing key (ours is HS256) Forgejo publishes
        only the key's type and algorithm, never the secret.
        """
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"keys": [{"kty": "oct", "alg": "HS256", "use": "sig"}]}).encode()

    @app.route("/api/v1/", branch=True)
    def api_v1(self, request: Request) -> Any:
        return self.api.app.resource()
