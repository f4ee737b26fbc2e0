"""
C{fjmcp-try}: watch an fjmcp broker work, from one terminal.

    fjmcp-try http://127.0.0.1:8080/mcp                          # log in in your browser
    fjmcp-try --headless --user alice http://127.0.0.1:8080/mcp  # the demo, no browser

A small MCP client on the official Python SDK (C{mcp}), which does the OAuth
part the way every SDK-based client does: the unauthenticated request and
its 401, discovery (protected resource metadata, then the authorization
server's), dynamic client registration, authorization with PKCE, the token
request, and the retried request with the bearer token.  Then it lists the
server's tools and calls one (C{get_my_user_info} by default, which shows who
you are signed in as; C{--call TOOL --args JSON} for another).

The person at the browser is either you (your browser opens the broker's
consent page; the redirect comes back to a listener on 127.0.0.1 at a port
the system picks, C{http://127.0.0.1:PORT/callback}), or, with
C{--headless}, this program itself: it approves the consent page and signs
in as C{--user} at the Forgejo stand-in that C{fjmcp-demo} runs.  Headless
sign-in only works against the stand-in (a real Forgejo wants a password);
it says so when the login page it meets is not the stand-in's.

Tokens stay in memory unless C{--token-file} names a file (written 0600) in
which they are kept between runs.  Token values are never printed.

The steps go to stderr as they happen; the tool list and the call's result
go to stdout.

L{HeadlessBrowser} and L{MemoryStorage} are also what the test suite's SDK
clients (C{tests/sdk_oauth_client.py}) use to play the person at the browser.

The C{mcp} SDK is imported only when the client runs, so the broker itself
never needs it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
import webbrowser
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urljoin, urlsplit, urlunsplit

if TYPE_CHECKING:
    from mcp.client.session import ClientSession
    from mcp.shared.auth import AuthorizationCodeResult, OAuthClientInformationFull, OAuthToken

EXIT_OK = 0
EXIT_TOOL_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_LOGIN = 4
EXIT_DENIED = 5
EXIT_MCP = 6
EXIT_NO_SDK = 7
EXIT_INTERRUPTED = 130

EXIT_STATUSES = f"""exit status:
  {EXIT_OK}  the tool call succeeded
  {EXIT_TOOL_ERROR}  the tool ran and reported an error
  {EXIT_USAGE}  bad arguments (or no such tool)
  {EXIT_UNREACHABLE}  the broker could not be reached, or is not an MCP endpoint
  {EXIT_LOGIN}  the login failed (registration, sign-in, token request, or a
     login page --headless cannot drive)
  {EXIT_DENIED}  access was denied on a consent page
  {EXIT_MCP}  the MCP session failed after login, or the run timed out
  {EXIT_NO_SDK}  the mcp SDK is not installed
"""

DEFAULT_TOOL = "get_my_user_info"
# The headless browser's redirect URI: nothing listens there, it reads the
# redirect instead of following it.  Loopback, so any port matches later.
HEADLESS_REDIRECT = "http://127.0.0.1/callback"
# Every page of fjmcp's Forgejo stand-in carries this line.
STANDIN_MARK = "Forgejo stand-in for fjmcp development"
TEST_LOGIN_HEADER = "X-Standin-Login"
SECRET_FIELDS = frozenset({"client_secret", "code", "code_verifier", "refresh_token", "token"})
REDIRECTS = (301, 302, 303, 307, 308)


class TryError(Exception):
    """
    A failure explained in one sentence, with the exit status it means.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class FlowError(TryError):
    """
    The browser leg did not go as a browser would expect.
    """

    def __init__(self, message: str, status: int = EXIT_LOGIN) -> None:
        super().__init__(message, status)


class ConsentDeniedError(FlowError):
    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_DENIED)


# --- token storage


class MemoryStorage:
    """
    C{mcp.client.auth.TokenStorage} in memory: a fresh client every run.
    """

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client_info: OAuthClientInformationFull | None = None
        self.expires_at: float | None = None
        self.on_tokens: Callable[[OAuthToken], None] | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens
        self.expires_at = time.time() + tokens.expires_in if tokens.expires_in else None
        if self.on_tokens is not None:
            self.on_tokens(tokens)
        self.saved()

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client_info

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client_info = client_info
        self.saved()

    def saved(self) -> None:
        """
        Called after each change (nothing to do in memory).
        """


class FileStorage(MemoryStorage):
    """
    Tokens and the client registration in a JSON file only its owner can
    read, so the next run refreshes instead of logging in again.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        if not path.parent.is_dir():
            raise TryError(f"--token-file: no directory {path.parent} for {path.name}", EXIT_USAGE)
        if not path.exists():
            return
        from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

        try:
            stored = json.loads(path.read_text())
            if stored.get("client_info"):
                self.client_info = OAuthClientInformationFull.model_validate(stored["client_info"])
            if stored.get("tokens"):
                self.tokens = OAuthToken.model_validate(stored["tokens"])
            self.expires_at = stored.get("expires_at")
        except (OSError, ValueError, AttributeError) as e:
            raise TryError(
                f"cannot use the token file {path}: {e}; remove it to start afresh", EXIT_USAGE
            ) from None

    def saved(self) -> None:
        stored = {
            "client_info": self.client_info.model_dump(mode="json") if self.client_info else None,
            "tokens": self.tokens.model_dump(mode="json") if self.tokens else None,
            "expires_at": self.expires_at,
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.fchmod(fd, 0o600)  # when the file was left over with another mode
                os.write(fd, json.dumps(stored, indent=1).encode())
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            raise TryError(f"cannot write the token file {self.path}: {e}", EXIT_USAGE) from None


# --- pages


@dataclass
class Form:
    action: str
    fields: list[tuple[str, str]] = field(default_factory=list)
    buttons: list[tuple[str, str]] = field(default_factory=list)

    def button_values(self, name: str) -> list[str]:
        return [v for n, v in self.buttons if n == name]


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[Form] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "title":
            self._in_title = True
        elif tag == "form":
            self.forms.append(Form(a.get("action", "")))
        elif self.forms and a.get("name"):
            if tag == "button" or (tag == "input" and a.get("type", "").lower() == "submit"):
                self.forms[-1].buttons.append((a["name"], a.get("value", "")))
            elif tag == "input":
                self.forms[-1].fields.append((a["name"], a.get("value", "")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def parse_page(html: str) -> _FormParser:
    parser = _FormParser()
    parser.feed(html)
    parser.close()
    return parser


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _bare(url: str) -> str:
    """
    The URL without its query: what may be shown or logged.
    """
    return url.split("?")[0]


def _snippet(text: str) -> str:
    """
    The first words of a page, without its markup, for an error message.
    """
    import re

    words = " ".join(re.sub(r"<[^>]+>", " ", text).split())
    return words[:200]


# --- the person at the browser, played by this program


class HeadlessBrowser:
    """
    The person at the browser, for the SDK's C{redirect_handler} and
    C{callback_handler}: it opens the authorization URL with its own cookie
    jar, approves (or denies) the broker's consent page as a browser would
    submit it, signs in at the Forgejo stand-in, follows the broker's
    callback, and hands the code it is sent back to the SDK.  Nothing listens
    on the redirect URI.

    At the stand-in it picks C{login} on the sign-in page and approves the
    Forgejo consent page; with C{test_login_header} it instead sends the
    stand-in's test header (which signs in and approves in one hop, and which
    only a stand-in started with C{--test-login} honours).

    Each hop is recorded in C{steps} (no query strings, so no codes).
    """

    def __init__(
        self,
        login: str,
        redirect_uri: str,
        decision: str = "approve",
        test_login_header: bool = False,
        timeout: float = 20.0,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.login = login
        self.say = say or (lambda _text: None)
        self.redirect_uri = redirect_uri
        self.decision = decision
        self.test_login_header = test_login_header
        self.timeout = timeout
        self.steps: list[dict[str, Any]] = []
        self.authorization_params: dict[str, str] = {}
        self.result: AuthorizationCodeResult | None = None
        self.returned: dict[str, Any] = {}
        self.error: str | None = None

    async def _hop(
        self, client: Any, step: str, method: str, url: str, expect: int | None, **kwargs: Any
    ) -> Any:
        response = await client.request(method, url, **kwargs)
        record: dict[str, Any] = {"step": step, "method": method, "url": _bare(url)}
        record["status"] = response.status_code
        location = response.headers.get("location")
        if location is not None:
            record["location"] = _bare(location)
        self.steps.append(record)
        if expect is not None and response.status_code != expect:
            raise FlowError(
                f"{step}: {method} {record['url']} answered {response.status_code}, not "
                f"{expect}: {_snippet(response.text)}"
            )
        return response

    async def redirect_handler(self, authorization_url: str) -> None:
        try:
            await self._drive(authorization_url)
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            raise

    async def _drive(self, authorization_url: str) -> None:
        import httpx2 as httpx

        self.authorization_params = {
            k: v
            for k, v in parse_qsl(urlsplit(authorization_url).query, keep_blank_values=True)
            if k not in ("state", "code_challenge")
        }
        async with httpx.AsyncClient(follow_redirects=False, timeout=self.timeout) as client:
            page = await self._hop(client, "authorize", "GET", authorization_url, 200)
            consent = next(
                (
                    f
                    for f in parse_page(page.text).forms
                    if any(n == "consent" for n, _ in f.fields)
                ),
                None,
            )
            if consent is None:
                raise FlowError(
                    f"the page at {_bare(authorization_url)} has no consent form; is this an "
                    "fjmcp broker?"
                )
            self.say(f"the broker's consent page: {_bare(authorization_url)}")
            target = urljoin(authorization_url, consent.action)
            response = await self._hop(
                client,
                "consent",
                "POST",
                target,
                303,
                data={**dict(consent.fields), "decision": self.decision},
            )
            upstream = urljoin(target, response.headers["location"])
            self.say(f"pressed {self.decision.capitalize()}; sent on to {_bare(upstream)}")
            if self.decision != "approve":
                self._returned(upstream)
                return
            if self.test_login_header:
                response = await self._hop(
                    client, "forgejo", "GET", upstream, 303, headers={TEST_LOGIN_HEADER: self.login}
                )
                back = urljoin(upstream, response.headers["location"])
            else:
                back = await self._through_standin(client, upstream)
            if _origin(back) != _origin(authorization_url):
                if _bare(back) == self.redirect_uri:
                    # The broker's own error redirect (for one, Forgejo refused).
                    self._returned(back)
                raise FlowError(
                    f"Forgejo sent the browser to {_bare(back)}, not back to the broker "
                    f"(did the stand-in refuse the login {self.login!r}?)"
                )
            response = await self._hop(client, "callback", "GET", back, 303)
            self._returned(urljoin(back, response.headers["location"]))
            self.say(f"back at {_bare(back)}, which redirected to us with a code")

    async def _through_standin(self, client: Any, url: str) -> str:
        """
        Sign in at the stand-in and approve its consent page, from its
        authorize URL until it sends the browser somewhere else: there.
        """
        forgejo = _origin(url)
        step, method, data = "forgejo", "GET", None
        for _ in range(10):
            response = await self._hop(client, step, method, url, None, data=data)
            if response.status_code in REDIRECTS:
                url = urljoin(url, response.headers["location"])
                if _origin(url) != forgejo:
                    return str(url)
                step, method, data = "forgejo", "GET", None
                continue
            if response.status_code != 200:
                raise FlowError(
                    f"Forgejo refused the sign-in as {self.login!r}: {method} {_bare(url)} "
                    f"answered {response.status_code}: {_snippet(response.text)}"
                )
            if STANDIN_MARK not in response.text:
                raise FlowError(
                    f"the login page at {_bare(url)} is not the Forgejo stand-in of fjmcp-demo, "
                    "so --headless cannot sign in there (a real Forgejo asks for a password). "
                    "Run without --headless to log in in your browser."
                )
            page = parse_page(response.text)
            sign_in = next((f for f in page.forms if f.button_values("user")), None)
            grant = next((f for f in page.forms if f.action.endswith("/login/oauth/grant")), None)
            if sign_in is not None:
                users = sign_in.button_values("user")
                if self.login not in users:
                    raise FlowError(
                        f"the stand-in has no user {self.login!r}; its users are "
                        + ", ".join(users)
                    )
                self.say(f"the stand-in's sign-in page: picking {self.login}")
                step, method = "forgejo-sign-in", "POST"
                url = urljoin(url, sign_in.action)
                data = {**dict(sign_in.fields), "user": self.login}
            elif grant is not None:
                self.say("the stand-in's consent page: pressing Authorize Application")
                step, method = "forgejo-consent", "POST"
                url = urljoin(url, grant.action)
                data = {**dict(grant.fields), "granted": "true"}
            else:
                raise FlowError(
                    f"unexpected page at {_bare(url)} ({page.title.strip()!r}): "
                    f"{_snippet(response.text)}"
                )
        raise FlowError(f"Forgejo kept sending the browser around (last at {_bare(url)})")

    def _returned(self, location: str) -> None:
        from mcp.shared.auth import AuthorizationCodeResult

        if _bare(location) != self.redirect_uri:
            raise FlowError(f"sent to {_bare(location)}, not the redirect URI")
        params = dict(parse_qsl(urlsplit(location).query, keep_blank_values=True))
        self.returned = {k: (v if k not in SECRET_FIELDS else bool(v)) for k, v in params.items()}
        if "code" not in params:
            raise _refusal(params)
        self.result = AuthorizationCodeResult(
            code=params["code"], state=params.get("state"), iss=params.get("iss")
        )

    async def callback_handler(self) -> AuthorizationCodeResult:
        if self.result is None:
            raise FlowError("the browser leg ended without an authorization code")
        return self.result


def _refusal(params: dict[str, str]) -> FlowError:
    """
    What an authorization response without a code means.
    """
    error = params.get("error", "")
    description = params.get("error_description", "")
    if error == "access_denied":
        return ConsentDeniedError(f"access was denied on a consent page ({description or error})")
    if error:
        return FlowError(f"the broker refused the login: {error}: {description}")
    return FlowError(f"the client was sent no code: {sorted(params)}")


# --- the person at the browser: you


class LoopbackReceiver:
    """
    Your browser for the SDK's handlers: the authorization URL opens in it,
    and the redirect back comes to a listener on 127.0.0.1 (RFC 8252 7.3).
    """

    def __init__(self, say: Callable[[str], None], open_browser: bool = True) -> None:
        import anyio

        self.say = say
        self.open_browser = open_browser
        self.port = 0
        self.params: dict[str, str] | None = None
        self.arrived = anyio.Event()
        self.waiting = False

    @property
    def redirect_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}/callback"

    async def listen(self, task_group: Any) -> None:
        import anyio
        from anyio.abc import SocketAttribute

        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        self.port = listener.extra(SocketAttribute.local_port)  # noqa: S610 - anyio, not Django
        task_group.start_soon(listener.serve, self._handle)

    async def _handle(self, stream: Any) -> None:
        import anyio

        try:
            async with stream:
                with anyio.move_on_after(10):
                    data = b""
                    while b"\r\n\r\n" not in data and len(data) < 16384:
                        data += await stream.receive(4096)
                    target = data.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[1]
                    parts = urlsplit(target)
                    if parts.path != "/callback" or self.params is not None:
                        await stream.send(_http(404, "Not found."))
                        return
                    params = dict(parse_qsl(parts.query, keep_blank_values=True))
                    self.params = params
                    self.arrived.set()
                    text = (
                        "Signed in. You can close this tab and go back to the terminal."
                        if "code" in params
                        else "The login did not succeed; the terminal says why."
                    )
                    await stream.send(_http(200, text))
        except Exception:  # a stray or broken connection is not our concern
            return

    async def redirect_handler(self, authorization_url: str) -> None:
        import anyio

        if not self.open_browser:
            self.say("to log in, open this URL in a browser on this machine:")
            self.say(f"    {authorization_url}")
            return
        self.say("log in in your browser; if it did not open, visit:")
        self.say(f"    {authorization_url}")
        if not await anyio.to_thread.run_sync(webbrowser.open, authorization_url):
            self.say("(no browser could be started here: open the URL above yourself)")

    async def callback_handler(self) -> AuthorizationCodeResult:
        from mcp.shared.auth import AuthorizationCodeResult

        self.waiting = True
        await self.arrived.wait()
        self.waiting = False
        params = self.params or {}
        if "code" not in params:
            raise _refusal(params)
        return AuthorizationCodeResult(
            code=params["code"], state=params.get("state"), iss=params.get("iss")
        )


def _http(status: int, text: str) -> bytes:
    body = (
        "<!doctype html><meta charset=utf-8><title>fjmcp-try</title>"
        f"<p style='font-family:sans-serif'>{text}</p>"
    ).encode()
    reason = {200: "OK", 404: "Not Found"}[status]
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/html; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


# --- the run


class Narrator:
    """
    Says on stderr what the OAuth flow is doing, from the responses the
    SDK's HTTP client sees (never a token or secret).
    """

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.said: set[str] = set()

    def say(self, text: str) -> None:
        if not self.quiet:
            print(f"fjmcp-try: {text}", file=sys.stderr, flush=True)

    def tell(self, text: str) -> None:
        """
        What the user must see even with --quiet.
        """
        print(f"fjmcp-try: {text}", file=sys.stderr, flush=True)

    def once(self, key: str, text: str) -> None:
        if key not in self.said:
            self.said.add(key)
            self.say(text)

    async def on_response(self, response: Any) -> None:
        path = urlsplit(str(response.request.url)).path
        status = response.status_code
        method = response.request.method
        if method == "POST" and status == 401 and not response.request.headers.get("authorization"):
            self.once("401", "the broker wants a token (401); discovering how to get one")
        elif "/.well-known/oauth-protected-resource" in path and status == 200:
            self.once("prm", f"protected resource metadata: {_bare(str(response.request.url))}")
        elif "/.well-known/oauth-authorization-server" in path and status == 200:
            self.once("asm", f"authorization server metadata: {_bare(str(response.request.url))}")
        elif path.endswith("/register") and method == "POST":
            await response.aread()
            body = _json_object(response.content)
            if status in (200, 201):
                self.say(f"registered as client {body.get('client_id')}")
            else:
                raise TryError(
                    f"dynamic client registration failed (HTTP {status}): "
                    f"{body.get('error')}: {body.get('error_description')}",
                    EXIT_LOGIN,
                )
        elif path.endswith("/token") and method == "POST":
            await response.aread()
            body = _json_object(response.content)
            sent = dict(parse_qsl(response.request.content.decode("latin-1")))
            if sent.get("grant_type") == "refresh_token":
                if status == 200:
                    self.say("refreshed the access token with the kept refresh token")
                else:
                    # The SDK then starts a whole new login, which is right.
                    self.say(
                        f"the kept refresh token was refused ({body.get('error')}); logging in"
                    )
            elif status == 200:
                has = ["an access token"] + (
                    ["a refresh token"] if body.get("refresh_token") else []
                )
                lifetime = f", valid {body['expires_in']} s" if body.get("expires_in") else ""
                self.say(f"token endpoint issued {' and '.join(has)}{lifetime}")
            else:
                raise TryError(
                    f"the token request failed (HTTP {status}): {body.get('error')}: "
                    f"{body.get('error_description')}",
                    EXIT_LOGIN,
                )


def _json_object(content: bytes) -> dict[str, Any]:
    try:
        body = json.loads(content)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def mcp_url(url: str) -> str:
    """
    The MCP endpoint: the URL as given, or the broker's /mcp for a bare origin.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TryError(f"not an http(s) URL: {url!r} (e.g. http://127.0.0.1:8080/mcp)", EXIT_USAGE)
    if parts.path in ("", "/"):
        return urlunsplit(parts._replace(path="/mcp"))
    return url


async def preflight(url: str) -> Any:
    """
    One unauthenticated request, to tell "nothing there" apart from the
    broker's expected 401 before any OAuth starts.
    """
    import httpx2 as httpx

    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            response = await client.post(
                url,
                json={"jsonrpc": "2.0", "id": 0, "method": "ping"},
                headers={"Accept": "application/json, text/event-stream"},
            )
    except httpx.HTTPError as e:
        raise TryError(
            f"cannot reach the broker at {url}: {e or type(e).__name__}. Is it running? "
            "(`make demo` starts one at http://127.0.0.1:8080/mcp)",
            EXIT_UNREACHABLE,
        ) from None
    if response.status_code == 404:
        raise TryError(
            f"{url} answered 404: there is no MCP endpoint at that path "
            "(an fjmcp broker has it at /mcp)",
            EXIT_UNREACHABLE,
        )
    if response.status_code >= 500:
        raise TryError(
            f"the broker at {url} answered HTTP {response.status_code}: {_snippet(response.text)}",
            EXIT_UNREACHABLE,
        )
    return response


async def rediscover(url: str, challenge: Any, provider: Any) -> None:
    """
    Discovery for kept tokens.  The SDK only discovers after a 401 and then
    logs in afresh; to refresh an expired access token instead, it must
    know the token endpoint before the first request.  Done with the SDK's
    own discovery helpers; when anything here fails, the SDK's full login
    still works.
    """
    import httpx2 as httpx
    from mcp.client.auth.utils import (
        build_oauth_authorization_server_metadata_discovery_urls,
        build_protected_resource_metadata_discovery_urls,
        extract_resource_metadata_from_www_auth,
        handle_auth_metadata_response,
        handle_protected_resource_response,
    )

    async with httpx.AsyncClient(timeout=10.0) as client:
        hint = extract_resource_metadata_from_www_auth(challenge)
        for where in build_protected_resource_metadata_discovery_urls(hint, url):
            prm = await handle_protected_resource_response(await client.get(where))
            if prm is not None:
                break
        else:
            return
        server = str(prm.authorization_servers[0])
        for where in build_oauth_authorization_server_metadata_discovery_urls(server, url):
            ok, asm = await handle_auth_metadata_response(await client.get(where))
            if not ok:
                return
            if asm is not None:
                break
        else:
            return
    provider.context.protected_resource_metadata = prm
    provider.context.auth_server_url = server
    provider.context.oauth_metadata = asm


async def run(options: argparse.Namespace, narrator: Narrator) -> int:
    import anyio
    import httpx2 as httpx
    from mcp.client.auth import OAuthClientProvider
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared.auth import OAuthClientMetadata

    url = mcp_url(options.url)
    narrator.say(f"connecting to {url}")
    challenge = await preflight(url)
    storage = FileStorage(Path(options.token_file)) if options.token_file else MemoryStorage()
    async with anyio.create_task_group() as tasks:
        handlers: HeadlessBrowser | LoopbackReceiver
        if options.headless:
            handlers = HeadlessBrowser(
                options.user,
                HEADLESS_REDIRECT,
                "deny" if options.deny else "approve",
                say=narrator.say,
            )
            narrator.say(f"headless: will approve and sign in as {options.user} at the stand-in")
            redirect_uri = HEADLESS_REDIRECT
        else:
            handlers = LoopbackReceiver(narrator.tell, open_browser=not options.no_browser)
            await handlers.listen(tasks)
            options.receiver = handlers
            redirect_uri = handlers.redirect_uri
        metadata = OAuthClientMetadata.model_validate(
            {
                "client_name": "fjmcp-try",
                "redirect_uris": [redirect_uri],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "none",
            }
        )
        provider = OAuthClientProvider(
            server_url=url,
            client_metadata=metadata,
            storage=storage,
            redirect_handler=handlers.redirect_handler,
            callback_handler=handlers.callback_handler,
        )
        if storage.tokens is not None:
            narrator.say(f"using the tokens kept in {options.token_file}")
            try:
                await rediscover(url, challenge, provider)
            except Exception as e:  # then the SDK logs in afresh
                narrator.say(f"(could not prepare a refresh: {e})")
            else:
                # So that an expired access token is refreshed, not sent.
                provider.context.token_expiry_time = storage.expires_at
        client = httpx.AsyncClient(
            auth=provider, timeout=30.0, event_hooks={"response": [narrator.on_response]}
        )
        async with (
            client,
            streamable_http_client(url, http_client=client) as (read_stream, write_stream),
            ClientSession(read_stream, write_stream) as session,
        ):
            status = await exercise(session, options, narrator)
        tasks.cancel_scope.cancel()
    return status


async def exercise(session: ClientSession, options: argparse.Namespace, narrator: Narrator) -> int:
    """
    Initialize, list the tools, call one; print what came back.
    """
    from mcp_types import PaginatedRequestParams

    init = await session.initialize()
    server = init.server_info
    narrator.say(f"connected to {server.name} {server.version} (MCP {init.protocol_version})")
    tools: list[Any] = []
    cursor: str | None = None
    while True:
        params = PaginatedRequestParams(cursor=cursor) if cursor else None
        listing = await session.list_tools(params=params)
        tools.extend(listing.tools)
        cursor = listing.next_cursor
        if not cursor:
            break
    print(f"{server.name} offers {len(tools)} tools:")
    width = min(max((len(t.name) for t in tools), default=0), 32)
    columns = shutil.get_terminal_size((100, 24)).columns
    for tool in sorted(tools, key=lambda t: t.name):
        about = (tool.description or "").strip().splitlines()
        line = f"  {tool.name:<{width}}  {about[0] if about else ''}"
        print(line if len(line) <= columns else line[: columns - 1] + "…")
    names = {t.name for t in tools}
    name = options.call
    if options.list_only:
        return EXIT_OK
    if name is None:
        if DEFAULT_TOOL not in names:
            print(f"\n(no {DEFAULT_TOOL} here to call; pick a tool with --call TOOL --args JSON)")
            return EXIT_OK
        name = DEFAULT_TOOL
    elif name not in names:
        raise TryError(f"the server has no tool {name!r}; its tools are listed above", EXIT_USAGE)
    print(f"\ncalling {name} {json.dumps(options.arguments)}:")
    from mcp.shared.exceptions import MCPError

    try:
        result = await session.call_tool(name, options.arguments)
    except MCPError as e:
        # The server refused the call itself (unknown arguments, say): for
        # the person running it, that is the tool reporting an error.
        print(f"({name} failed: {e.error.message})")
        return EXIT_TOOL_ERROR
    is_error = bool(getattr(result, "is_error", False))
    content = getattr(result, "content", None) or []
    for item in content:
        text = getattr(item, "text", None)
        if text is None:
            kind = getattr(item, "type", "content")
            mime = getattr(item, "mime_type", None)
            print(f"[{kind}{', ' + mime if mime else ''}]")
            continue
        print(_pretty(text))
    structured = getattr(result, "structured_content", None)
    if not content and structured is not None:
        print(json.dumps(structured, indent=2, ensure_ascii=False))
    if is_error:
        print(f"({name} reported an error)")
        return EXIT_TOOL_ERROR
    return EXIT_OK


def _pretty(text: str) -> str:
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


# --- command line


def explain(e: BaseException, options: argparse.Namespace) -> tuple[str, int]:
    """
    One message and exit status for whatever ended the run; for an
    exception group (the SDK runs its transport in task groups), its most
    telling leaf.
    """
    import httpx2 as httpx
    from mcp.client.auth import OAuthFlowError, OAuthRegistrationError
    from mcp.shared.exceptions import MCPError

    leaves = list(_leaves(e))
    for leaf in leaves:
        if isinstance(leaf, TryError):
            return leaf.message, leaf.status
    for leaf in leaves:
        if isinstance(leaf, httpx.TransportError):
            return (
                f"lost the connection to the broker: {leaf or type(leaf).__name__}",
                EXIT_UNREACHABLE,
            )
    for leaf in leaves:
        if isinstance(leaf, OAuthRegistrationError):
            return f"dynamic client registration failed: {leaf}", EXIT_LOGIN
        if isinstance(leaf, OAuthFlowError):
            return f"the OAuth flow failed: {leaf}", EXIT_LOGIN
    for leaf in leaves:
        if isinstance(leaf, MCPError):
            return f"the MCP server answered an error: {leaf.error.message} ({leaf.code})", EXIT_MCP
        if isinstance(leaf, TimeoutError):
            if getattr(getattr(options, "receiver", None), "waiting", False):
                return (
                    f"no login came back from the browser within {options.timeout:g} seconds; "
                    "run again (or give more time with --timeout)",
                    EXIT_LOGIN,
                )
            return f"gave up after {options.timeout:g} seconds (see --timeout)", EXIT_MCP
    first = leaves[0] if leaves else e
    return f"{type(first).__name__}: {first}", EXIT_MCP


def _leaves(e: BaseException) -> Any:
    inner = getattr(e, "exceptions", None)
    if inner:
        for x in inner:
            yield from _leaves(x)
    else:
        yield e


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fjmcp-try",
        description="Run the whole OAuth flow against an fjmcp broker with the MCP Python SDK, "
        "then list the tools and call one.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("url", help="the broker's MCP endpoint, e.g. http://127.0.0.1:8080/mcp")
    p.add_argument(
        "--headless",
        action="store_true",
        help="no browser: approve the consent pages and sign in at the Forgejo stand-in "
        "(fjmcp-demo only)",
    )
    p.add_argument("--user", default="alice", help="--headless: who signs in (default: alice)")
    p.add_argument(
        "--deny", action="store_true", help="--headless: press Deny on the consent page instead"
    )
    p.add_argument(
        "--no-browser",
        action="store_true",
        help="do not open a browser, only print the URL to visit (e.g. over ssh)",
    )
    p.add_argument(
        "--call", metavar="TOOL", help=f"the tool to call (default: {DEFAULT_TOOL}, if offered)"
    )
    p.add_argument("--args", default="{}", metavar="JSON", help="its arguments, a JSON object")
    p.add_argument("--list-only", action="store_true", help="list the tools, call none")
    p.add_argument(
        "--token-file",
        metavar="PATH",
        help="keep the registration and tokens in this file (mode 0600) between runs; "
        "by default they live in memory only",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up after this many seconds (default: 60, or 300 when you log in in a browser)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="do not narrate the steps on stderr")
    p.add_argument("-v", "--verbose", action="store_true", help="the SDK's debug log on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    options = parser().parse_args(argv)
    try:
        arguments = json.loads(options.args)
    except ValueError as e:
        print(f"fjmcp-try: --args is not JSON: {e}", file=sys.stderr)
        return EXIT_USAGE
    if not isinstance(arguments, dict):
        print(
            'fjmcp-try: --args must be a JSON object, e.g. \'{"owner": "alice"}\'', file=sys.stderr
        )
        return EXIT_USAGE
    options.arguments = arguments
    if options.timeout is None:
        options.timeout = 60.0 if options.headless else 300.0
    try:
        import anyio
        import mcp.client.auth  # noqa: F401 - only to learn whether the SDK is there
    except ImportError as e:
        print(
            f"fjmcp-try: needs the MCP Python SDK ({e}); install it with "
            "`pip install -e './dev[try]'` in a checkout (or `pip install 'mcp>=2.3,<3'`)",
            file=sys.stderr,
        )
        return EXIT_NO_SDK
    # The SDK logs a traceback for every failed OAuth flow; the message
    # below says what failed, so its log is only shown on request.
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if options.verbose else logging.CRITICAL,
        format="%(levelname)s %(name)s: %(message)s",
    )
    narrator = Narrator(options.quiet)

    async def bounded() -> int:
        with anyio.fail_after(options.timeout):
            return await run(options, narrator)

    try:
        return anyio.run(bounded)
    except KeyboardInterrupt:
        print("fjmcp-try: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        message, status = explain(e, options)
        print(f"fjmcp-try: {message}", file=sys.stderr)
        return status


if __name__ == "__main__":
    sys.exit(main())
