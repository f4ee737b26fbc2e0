"""
The authorization flow a person goes through: the client's authorize request
is checked, the user approves it on our consent page, signs in at Forgejo
(L{fjmcp.oauth.signin}), and comes back with a broker authorization code
for the client.

Knows nothing of HTTP: routes hand in query and form fields and cookies, and
get back a page to show or an address to redirect to.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from fjmcp.config import Config
from fjmcp.oauth.cimd import CIMDError, ClientMetadataFetcher, is_cimd_client_id
from fjmcp.oauth.clients import ClientRegistry
from fjmcp.oauth.refusal import RefusalError
from fjmcp.oauth.registration import (
    ClientMetadata,
    RegistrationError,
    check_client_metadata,
    redirect_host,
    redirect_uri_registered,
)
from fjmcp.oauth.signin import ForgejoSignIn, Returned, SignInFailedError
from fjmcp.oauth.tokens import TokenService
from fjmcp.secrets.crypto import new_token, token_hash
from fjmcp.store import Store

# A person has this long between the client's authorize request and
# approving it on the consent page.
PENDING_LIFETIME = 600.0
MAX_PARAMETER = 2048

log = Logger()


@attrs.frozen
class Redirect:
    location: str


@attrs.frozen
class Consent:
    """
    Show the consent page for this request.
    """

    client_name: str
    client_id: str
    redirect_host: str
    unverified_name: bool
    consent_token: str


@attrs.frozen
class Completed:
    """
    The login is done: redirect to the client, and remember the browser.
    """

    location: str
    login_session: str


def add_query(uri: str, params: Mapping[str, str]) -> str:
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query.extend(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def same_resource(given: str, expected: str) -> bool:
    return given.rstrip("/") == expected.rstrip("/")


@attrs.frozen
class _Checked:
    client_id: str
    metadata: ClientMetadata
    redirect_uri: str
    state: str | None
    code_challenge: str
    scope: str
    resource: str
    unverified_name: bool


class AuthorizationFlow:
    def __init__(
        self,
        config: Config,
        store: Store,
        clients: ClientRegistry,
        signin: ForgejoSignIn,
        tokens: TokenService,
        clock: IReactorTime,
        cimd: ClientMetadataFetcher | None = None,
    ) -> None:
        self._config = config
        self._store = store
        self._clients = clients
        self._signin = signin
        self._tokens = tokens
        self._clock = clock
        self._cimd = cimd

    def _error_redirect(
        self, redirect_uri: str, state: str | None, error: str, description: str
    ) -> Redirect:
        params = {"error": error, "error_description": description}
        if state is not None:
            params["state"] = state
        params["iss"] = self._config.public_url
        return Redirect(add_query(redirect_uri, params))

    async def _client(self, client_id: str) -> tuple[ClientMetadata, bool]:
        """
        The client's metadata and whether its name is only its own claim.
        """
        if is_cimd_client_id(client_id, allow_http=self._config.cimd_allow_loopback):
            if self._cimd is None:
                raise RefusalError(400, "Unknown client", "client ID metadata documents are off")
            try:
                document = await self._cimd.fetch(client_id)
                metadata = check_client_metadata(document, default_auth_method="none")
            except (CIMDError, RegistrationError) as e:
                raise RefusalError(
                    400, "Unusable client", f"the client's metadata document was refused: {e}"
                ) from None
            if not metadata.is_public:
                raise RefusalError(
                    400, "Unusable client", "a metadata-document client must be public (none)"
                )
            await self._store.save_fetched_client(
                client_id, metadata.to_json(), self._clock.seconds() + 3600
            )
            # The name comes from a document on the client's own domain,
            # which the consent page shows as the client ID.
            return metadata, False
        found = await self._clients.get(client_id)
        if found is None:
            raise RefusalError(
                400,
                "Unknown client",
                "This application is not registered with this server (it may have been "
                "registered with another one). Ask it to connect again.",
            )
        return found[1], True

    async def _check(self, args: Mapping[str, str]) -> _Checked:
        if any(len(v) > MAX_PARAMETER for v in args.values()):
            raise RefusalError(400, "Bad request", "a parameter of the request is too long")
        client_id = args.get("client_id", "")
        if not client_id:
            raise RefusalError(400, "Bad request", "the request names no client (client_id)")
        metadata, unverified = await self._client(client_id)
        redirect_uri = args.get("redirect_uri")
        if redirect_uri is None:
            if len(metadata.redirect_uris) != 1:
                raise RefusalError(400, "Bad request", "redirect_uri is required for this client")
            redirect_uri = metadata.redirect_uris[0]
        elif not redirect_uri_registered(metadata.redirect_uris, redirect_uri):
            raise RefusalError(
                400,
                "Unregistered redirect URI",
                "The address this request would send you back to is not registered for "
                "this client, so nothing was sent there.",
            )
        state = args.get("state")

        def refuse(error: str, description: str) -> Exception:
            return _RedirectError(self._error_redirect(redirect_uri, state, error, description))

        if args.get("response_type") != "code":
            raise refuse("unsupported_response_type", "only response_type=code is supported")
        challenge = args.get("code_challenge", "")
        method = args.get("code_challenge_method", "")
        if not challenge:
            raise refuse("invalid_request", "PKCE is required: send code_challenge with S256")
        if method != "S256":
            raise refuse("invalid_request", "only the S256 code_challenge_method is supported")
        if not (43 <= len(challenge) <= 128):
            raise refuse("invalid_request", "code_challenge must be 43 to 128 characters")
        resource = args.get("resource") or self._config.mcp_url
        if not same_resource(resource, self._config.mcp_url):
            raise refuse(
                "invalid_target", f"this server only issues tokens for {self._config.mcp_url}"
            )
        return _Checked(
            client_id=client_id,
            metadata=metadata,
            redirect_uri=redirect_uri,
            state=state,
            code_challenge=challenge,
            # Scopes are taken as given and not refused: clients send their
            # own (claudeai, offline_access); what they may do is decided by
            # the Forgejo scopes the operator configured.
            scope=" ".join(args.get("scope", "").split()),
            resource=self._config.mcp_url,
            unverified_name=unverified,
        )

    async def begin(
        self, args: Mapping[str, str], browser: str, login_session: str | None
    ) -> Consent | Redirect:
        """
        A GET of the authorize endpoint.  C{browser} is the value of the
        browser's binding cookie (the route sets one if it had none).
        """
        try:
            checked = await self._check(args)
        except _RedirectError as e:
            return e.redirect
        consent_token = new_token()
        await self._store.create_pending_authorization(
            token_hash(consent_token),
            token_hash(browser),
            checked.client_id,
            checked.redirect_uri,
            checked.state,
            checked.code_challenge,
            "S256",
            checked.scope,
            checked.resource,
            self._clock.seconds() + PENDING_LIFETIME,
        )
        # prompt=consent (OpenID Connect, sent by the MCP SDK) asks for the
        # page even when this user approved this client before.
        ask_again = "consent" in args.get("prompt", "").split()
        if login_session and not ask_again:
            user_id = await self._store.login_session_user(token_hash(login_session))
            if user_id is not None and await self._store.has_consent(user_id, checked.client_id):
                # A returning user who already approved this client: no page.
                return await self._approve(consent_token, browser)
        name = checked.metadata.client_name or "An unnamed application"
        return Consent(
            client_name=name,
            client_id=checked.client_id,
            redirect_host=redirect_host(checked.redirect_uri),
            unverified_name=checked.unverified_name,
            consent_token=consent_token,
        )

    async def decide(self, form: Mapping[str, str], browser: str | None) -> Redirect:
        """
        The consent form came back.  It must come from the browser that was
        shown the form (cookie), with a live single-use consent token.
        """
        consent_token = form.get("consent", "")
        if not consent_token or not browser:
            raise RefusalError(
                400,
                "Expired or foreign form",
                "This approval form is not valid here (it expired, was already used, or "
                "was opened in another browser). Start again from your application.",
            )
        if form.get("decision") == "approve":
            return await self._approve(consent_token, browser)
        pending = await self._store.deny_pending_authorization(
            token_hash(consent_token), token_hash(browser)
        )
        if pending is None:
            raise RefusalError(
                400, "Expired or foreign form", "This approval form is no longer valid."
            )
        return self._error_redirect(
            pending.redirect_uri, pending.client_state, "access_denied", "the user denied access"
        )

    async def _approve(self, consent_token: str, browser: str) -> Redirect:
        location = await self._signin.for_authorization(consent_token, browser)
        if location is None:
            raise RefusalError(
                400,
                "Expired or foreign form",
                "This approval form is not valid here (it expired, was already used, or "
                "was opened in another browser). Start again from your application.",
            )
        return Redirect(location)

    async def complete(self, returned: Returned) -> Completed | Redirect:
        """
        The browser came back from the Forgejo sign-in that completes an
        authorization: send it to the client with a code, or with the error.
        """
        pending = returned.authorization
        assert pending is not None
        if returned.cancelled is not None:
            # Forgejo sends access_denied when the user cancels there.
            denied = returned.cancelled == "access_denied"
            return self._error_redirect(
                pending.redirect_uri,
                pending.client_state,
                "access_denied" if denied else "server_error",
                "the user denied access at Forgejo"
                if denied
                else "Forgejo could not complete the sign-in",
            )
        try:
            signed_in = await self._signin.finish(returned)
        except SignInFailedError:
            return self._error_redirect(
                pending.redirect_uri,
                pending.client_state,
                "server_error",
                "Forgejo did not accept the sign-in; try again",
            )
        user = signed_in.user
        await self._store.remember_consent(user.id, pending.client_id, pending.scope)
        code = await self._tokens.issue_code(
            pending.client_id,
            user.id,
            pending.redirect_uri,
            pending.code_challenge,
            pending.scope,
            pending.resource,
            pending.code_challenge_method,
        )
        log.info(
            "user {login} ({user}) authorized client {client}",
            login=user.login,
            user=user.id,
            client=pending.client_id,
        )
        params = {"code": code}
        if pending.client_state is not None:
            params["state"] = pending.client_state
        params["iss"] = self._config.public_url
        return Completed(add_query(pending.redirect_uri, params), signed_in.login_session)


class _RedirectError(Exception):
    def __init__(self, redirect: Redirect) -> None:
        super().__init__(redirect.location)
        self.redirect = redirect
