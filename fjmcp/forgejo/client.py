"""
The broker's client for Forgejo (the "upstream"): the one module that talks
HTTP to Forgejo.

It owns:

  - the authorize URL a user's browser is sent to (always with S256 PKCE);
  - the token endpoint calls, exchanging a code and refreshing, with the
    broker's client authentication;
  - the one API call the broker makes itself, C{GET /api/v1/user};
  - what Forgejo's answers mean: a result, L{UpstreamRejectedError} (the
    user must log in again) or L{UpstreamUnavailableError} (a temporary
    problem), with messages that are safe to log and to show: no token, code,
    verifier or secret is ever put in one, and text Forgejo sends back is
    cleaned of them;
  - the limits on every call: one deadline covering the request and the whole
    response body, a cap on the body's size, and no redirects followed.

It does not store or seal tokens (L{fjmcp.store}, L{fjmcp.secrets.crypto}) and does
not serialise refreshes: Forgejo invalidates every older refresh token of a
user on each issue, so the caller must keep one credential per Forgejo user,
replace it atomically, and never refresh the same user twice at once.
"""

from __future__ import annotations

import base64
import json
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any, cast
from urllib.parse import quote, quote_plus, urlencode

import attrs
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from fjmcp import __version__

AUTHORIZE_PATH = "/login/oauth/authorize"
TOKEN_PATH = "/login/oauth/access_token"  # noqa: S105 (a path, not a secret)
USER_PATH = "/api/v1/user"

USER_AGENT = f"fjmcp/{__version__}"
# Forgejo's ACCESS_TOKEN_EXPIRATION_TIME default, for an answer without expires_in.
DEFAULT_EXPIRES_IN = 3600
MAX_RESPONSE_BYTES = 1024 * 1024
# Text Forgejo sends back (error codes, descriptions) is cut to this length.
MAX_TEXT = 200
REDACTED = "[REDACTED]"

_log = Logger()


@attrs.frozen
class UpstreamTokens:
    """
    A Forgejo credential.  C{expires_at} is absolute, on the client's clock,
    counted from when the token request was sent (so it errs early).
    C{lifetime} is the access token's lifetime as Forgejo gave it
    (C{expires_in}); L{None} where it is not known.
    C{scope} is what the broker asked for: Forgejo's answer names no scope,
    and for a returning user Forgejo keeps the scope the grant was created
    with, so it is not necessarily what the grant allows.
    """

    access_token: str = attrs.field(repr=False)
    refresh_token: str | None = attrs.field(repr=False)
    expires_at: float
    scope: str
    lifetime: float | None = None


@attrs.frozen
class ForgejoUser:
    """
    The user behind a Forgejo token: C{id} is the stable key, C{login} is
    for display.
    """

    id: int
    login: str
    full_name: str


class UpstreamError(Exception):
    """
    Talking to Forgejo did not give a result.  The message is safe to log and
    to show: it never contains a token, code, verifier or secret.
    """


class UpstreamRejectedError(UpstreamError):
    """
    Forgejo refused: an OAuth error from the token endpoint (C{invalid_grant},
    C{unauthorized_client} for a used refresh token, a bad code or a PKCE
    failure, ...) or a 401/403 from the API.  The credential is dead: the
    user must log in again.

    @ivar error: the OAuth error code (for the API: C{invalid_token} on 401,
        C{insufficient_scope} on 403).
    @ivar description: Forgejo's explanation, cleaned and shortened.
    """

    def __init__(self, operation: str, error: str, description: str) -> None:
        text = f"Forgejo rejected the {operation}: {error}"
        if description:
            text += f" ({description})"
        super().__init__(text)
        self.error = error
        self.description = description


class UpstreamUnavailableError(UpstreamError):
    """
    Forgejo could not be asked or gave no usable answer: connection failure,
    timeout, a 5xx or other unexpected status, a body that is not the
    expected JSON, or one over the size cap.  Probably temporary; the
    credential may still be good.
    """


# The names the design brief used; ruff's N818 wants the Error suffix.


class _TooLargeError(Exception):
    pass


class _CappedBody(Protocol):
    """
    Collects a response body into C{finished}, giving up (and dropping the
    connection) as soon as it is known to be longer than C{limit}.
    Cancelling C{finished} drops the connection too.
    """

    def __init__(self, limit: int, length: int | object) -> None:
        self._limit = limit
        self._length = length
        self._chunks: list[bytes] = []
        self._received = 0
        self._done = False
        self.finished: Deferred[bytes] = Deferred(lambda _: self._stop())

    def connectionMade(self) -> None:
        if (
            self._length is not UNKNOWN_LENGTH
            and isinstance(self._length, int)
            and self._length > self._limit
        ):
            self._fail(_TooLargeError())

    def dataReceived(self, data: bytes) -> None:
        if self._done:
            return
        self._received += len(data)
        if self._received > self._limit:
            self._fail(_TooLargeError())
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._done:
            return
        self._done = True
        # PotentialDataLoss: a body delimited by the connection closing.
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)

    def _stop(self) -> None:
        self._done = True
        self._chunks.clear()
        if self.transport is not None:
            cast(IPushProducer, self.transport).stopProducing()

    def _fail(self, reason: Exception) -> None:
        self._stop()
        self.finished.errback(reason)


def _clean(text: str, secrets: Iterable[str]) -> str:
    """
    Text from Forgejo made fit for a log line or an error page: any secret
    of the request redacted, control characters replaced, length capped.
    """
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = "".join(
        "?" if unicodedata.category(c)[0] in ("C", "Z") and c != " " else c for c in text
    )
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _was_cancelled(e: Exception) -> bool:
    if isinstance(e, CancelledError):
        return True
    return isinstance(e, ResponseFailed) and any(
        isinstance(r, Failure) and r.check(CancelledError) is not None for r in e.reasons
    )


def _describe(e: Exception, limit: int) -> str:
    """
    Why a request failed, without anything the request carried.
    """
    if isinstance(e, _TooLargeError):
        return f"its answer is larger than {limit} bytes"
    if isinstance(e, ConnectError):
        # Twisted's texts name the host and the OS error, nothing of ours.
        return f"cannot connect: {str(e).strip()}"
    if isinstance(e, ResponseFailed):
        return "the connection failed before a complete answer"
    return f"the request failed ({type(e).__name__})"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class ForgejoClient:
    """
    The broker's side of Forgejo's OAuth2 provider and API.

    Every method that talks to Forgejo is a coroutine (wrap it with
    C{Deferred.fromCoroutine}) that returns a result or raises
    L{UpstreamRejectedError} or L{UpstreamUnavailableError}.  Cancelling it
    drops the connection and raises C{CancelledError}.

    C{clock} gives C{expires_at} and runs the deadlines.  C{http} should not
    keep cookies between users (treq's client has a cookie jar): give this
    client its own L{HTTPClient}.
    """

    def __init__(
        self,
        http: HTTPClient,
        clock: IReactorTime,
        forgejo_url: str,
        client_id: str,
        client_secret: str,
        redirect_uri: str,
        scopes: Sequence[str],
        timeout: float = 10.0,
        max_response_bytes: int = MAX_RESPONSE_BYTES,
    ) -> None:
        self._http = http
        self._clock = clock
        self._base = forgejo_url.rstrip("/")
        self._client_id = client_id
        self._client_secret = client_secret
        self._redirect_uri = redirect_uri
        self.scope = " ".join(scopes)
        self._timeout = timeout
        self._max_response_bytes = max_response_bytes
        # RFC 6749 2.3.1 form-urlencodes both halves of the Basic
        # credentials, but Forgejo does not decode them.  Forgejo's own ids
        # (UUIDs) and secrets (gto_ + base32) encode to themselves, so Basic
        # is the same either way; anything else goes in the body, where both
        # readings agree.
        encoded_id, encoded_secret = (
            quote_plus(client_id, safe=""),
            quote_plus(client_secret, safe=""),
        )
        self._basic: str | None = None
        if (encoded_id, encoded_secret) == (client_id, client_secret):
            pair = f"{encoded_id}:{encoded_secret}".encode()
            self._basic = "Basic " + base64.b64encode(pair).decode("ascii")

    # --- the browser leg

    def authorize_url(self, state: str, code_challenge: str) -> str:
        """
        Where to send the user's browser: Forgejo's authorize endpoint for
        C{state} and the S256 C{code_challenge}.
        """
        query = urlencode(
            {
                "client_id": self._client_id,
                "redirect_uri": self._redirect_uri,
                "response_type": "code",
                "scope": self.scope,
                "state": state,
                "code_challenge": code_challenge,
                "code_challenge_method": "S256",
            },
            quote_via=quote,
        )
        return f"{self._base}{AUTHORIZE_PATH}?{query}"

    # --- the token endpoint

    async def exchange_code(self, code: str, code_verifier: str) -> UpstreamTokens:
        """
        Trade an authorization code (and the PKCE verifier it was asked
        with) for tokens.  This bumps the user's grant counter: every
        earlier refresh token of this user stops working.
        """
        return await self._token_request(
            "code exchange",
            {
                "grant_type": "authorization_code",
                "code": code,
                "redirect_uri": self._redirect_uri,
                "code_verifier": code_verifier,
            },
            (code, code_verifier),
        )

    async def refresh(self, refresh_token: str) -> UpstreamTokens:
        """
        New tokens for a refresh token, which is used up by this (Forgejo
        rotates refresh tokens; a replay is C{unauthorized_client}).
        """
        return await self._token_request(
            "token refresh",
            {"grant_type": "refresh_token", "refresh_token": refresh_token},
            (refresh_token,),
        )

    async def _token_request(
        self, operation: str, fields: dict[str, str], secrets: tuple[str, ...]
    ) -> UpstreamTokens:
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if self._basic is not None:
            headers["Authorization"] = self._basic
        else:
            fields = {**fields, "client_id": self._client_id, "client_secret": self._client_secret}
        sent_at = self._clock.seconds()
        status, body = await self._call(
            operation, "POST", TOKEN_PATH, headers, urlencode(fields).encode("ascii"), secrets
        )
        if status == 200:
            return self._tokens(operation, body, sent_at)
        answer = _json_object(body)
        if status in (400, 401) and answer is not None and isinstance(answer.get("error"), str):
            description = answer.get("error_description")
            raise UpstreamRejectedError(
                operation,
                self._clean(answer["error"], secrets),
                self._clean(description if isinstance(description, str) else "", secrets),
            )
        raise UpstreamUnavailableError(f"Forgejo answered the {operation} with HTTP {status}")

    def _tokens(self, operation: str, body: bytes, sent_at: float) -> UpstreamTokens:
        answer = _json_object(body)

        def malformed(what: str) -> UpstreamUnavailableError:
            return UpstreamUnavailableError(f"Forgejo's answer to the {operation} {what}")

        if answer is None:
            raise malformed("is not a JSON object")
        access_token = answer.get("access_token")
        if not isinstance(access_token, str) or not access_token:
            raise malformed("has no access_token")
        token_type = answer.get("token_type")
        if not isinstance(token_type, str) or token_type.lower() != "bearer":
            raise malformed("has no bearer token_type")
        expires_in = answer.get("expires_in", DEFAULT_EXPIRES_IN)
        if not _is_int(expires_in) or expires_in <= 0:
            raise malformed("has an invalid expires_in")
        refresh_token = answer.get("refresh_token")
        if refresh_token is not None and (not isinstance(refresh_token, str) or not refresh_token):
            raise malformed("has an invalid refresh_token")
        return UpstreamTokens(
            access_token=access_token,
            refresh_token=refresh_token,
            expires_at=sent_at + expires_in,
            scope=self.scope,
            lifetime=float(expires_in),
        )

    # --- the API

    async def get_user(self, access_token: str) -> ForgejoUser:
        """
        The user an access token belongs to (needs C{read:user}).
        """
        status, body = await self._call(
            "user lookup",
            "GET",
            USER_PATH,
            {"Authorization": f"token {access_token}"},
            None,
            (access_token,),
        )
        answer = _json_object(body)
        if status in (401, 403):
            message = answer.get("message") if answer is not None else None
            raise UpstreamRejectedError(
                "user lookup",
                "invalid_token" if status == 401 else "insufficient_scope",
                self._clean(message if isinstance(message, str) else "", (access_token,)),
            )
        if status != 200:
            raise UpstreamUnavailableError(f"Forgejo answered the user lookup with HTTP {status}")
        answered = "Forgejo's answer to the user lookup"
        if answer is None:
            raise UpstreamUnavailableError(f"{answered} is not a JSON object")
        user_id, login, full_name = answer.get("id"), answer.get("login"), answer.get("full_name")
        if not isinstance(login, str):
            login = ""
        if not isinstance(user_id, int) or isinstance(user_id, bool) or not login:
            raise UpstreamUnavailableError(f"{answered} has no id and login")
        return ForgejoUser(
            id=user_id, login=login, full_name=full_name if isinstance(full_name, str) else ""
        )

    # --- plumbing

    def _clean(self, text: str, secrets: tuple[str, ...]) -> str:
        return _clean(text, (*secrets, self._client_secret))

    async def _call(
        self,
        operation: str,
        method: str,
        path: str,
        headers: dict[str, str],
        body: bytes | None,
        secrets: tuple[str, ...],
    ) -> tuple[int, bytes]:
        """
        One request and its whole answer, under one deadline: the status
        and the body, or L{UpstreamUnavailableError}.
        """
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json", **headers}
        started = self._clock.seconds()
        attempt = Deferred.fromCoroutine(self._roundtrip(method, self._base + path, headers, body))
        deadline = self._clock.callLater(self._timeout, attempt.cancel)
        try:
            status, content = await attempt
        except Exception as e:
            if not deadline.active():
                raise UpstreamUnavailableError(
                    f"Forgejo did not answer the {operation} within {self._timeout:g} s"
                ) from None
            if _was_cancelled(e):
                raise CancelledError() from None
            _log.debug(
                "Forgejo {method} {path} failed: {why}",
                method=method,
                path=path,
                why=_describe(e, self._max_response_bytes),
            )
            raise UpstreamUnavailableError(
                f"Forgejo {operation} failed: {_describe(e, self._max_response_bytes)}"
            ) from None
        finally:
            if deadline.active():
                deadline.cancel()
        _log.debug(
            "Forgejo {method} {path}: HTTP {status}, {size} bytes in {elapsed:.3f} s",
            method=method,
            path=path,
            status=status,
            size=len(content),
            elapsed=self._clock.seconds() - started,
        )
        return status, content

    async def _roundtrip(
        self, method: str, url: str, headers: dict[str, str], body: bytes | None
    ) -> tuple[int, bytes]:
        response = await self._http.request(
            method,
            url,
            headers=Headers({name: [value] for name, value in headers.items()}),
            data=body,
            allow_redirects=False,
            unbuffered=True,
        )
        reader = _CappedBody(self._max_response_bytes, response.length)
        response.deliverBody(reader)
        return response.code, await reader.finished
