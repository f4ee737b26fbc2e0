"""
Users' Forgejo credentials: sealing them into the store, and handing out a
usable Forgejo access token, refreshed when it is about to expire (how long
before depends on the lifetime Forgejo gave it, see L{refresh_margin}).

Forgejo invalidates every older refresh token of a user on each issue, so a
user's credential is refreshed by one request at a time: concurrent callers
for the same user wait for the refresh already under way instead of starting
their own (which would invalidate each other).  In this process they share
one Deferred; across processes (broker nodes on one database) the one that
renews holds a claim in the store (L{fjmcp.store.CredentialStore.
claim_upstream_refresh}) and the others wait for the credential it stores.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from fjmcp import metrics
from fjmcp.forgejo.client import (
    ForgejoClient,
    ForgejoUser,
    UpstreamError,
    UpstreamRejectedError,
    UpstreamTokens,
    UpstreamUnavailableError,
)
from fjmcp.secrets.crypto import DecryptionError, SecretBox
from fjmcp.store import SealedCredential, Store, UpstreamUser

# Refresh a Forgejo token this long before it expires, so a child started
# with it does not meet an expired token in the middle of a tool call.
REFRESH_MARGIN = 300.0
# ... or in the last quarter of its life when that is shorter: a margin as
# long as the lifetime (Forgejo can be set to hand out tokens of a few
# minutes) would renew the token, and replace the child, on every request.
# A quarter keeps renewals within 4/3 of the fewest possible while a call
# that started on the old child keeps a quarter of the lifetime to finish.
REFRESH_FRACTION = 0.25
# How long a user's token is handed out from memory before the store is
# asked again (which also notices a credential removed by the admin command).
CACHE_SECONDS = 5.0
CACHE_SIZE = 10_000
# How long a claim on renewing a user's token lasts: longer than a renewal
# takes (Forgejo's answer within the client's 10 s deadline, then a store
# write).  Should its holder die meanwhile, the claim lapses and another
# process renews.
CLAIM_SECONDS = 30.0
# How often a process waiting for another's renewal reads the store again.
CLAIM_POLL = 0.1
# Tries at storing a renewed token (Forgejo has invalidated the old one).
SAVE_ATTEMPTS = 3

log = Logger()


def refresh_margin(lifetime: float | None, cap: float = REFRESH_MARGIN) -> float:
    """
    How long before its expiry a token that Forgejo gave C{lifetime}
    seconds is renewed: C{cap}, or a quarter of the lifetime when that is
    less.  An unknown lifetime (a credential stored before lifetimes were
    kept) gets the whole C{cap}, as it always did.
    """
    if lifetime is None:
        return cap
    return min(cap, lifetime * REFRESH_FRACTION)


class LoginRequiredError(Exception):
    """
    The user's Forgejo credential is gone, refused or unreadable: they must
    authorize again (our answer to the client is 401 invalid_token).
    """


def credential_context(forgejo_user_id: int, which: str) -> str:
    """
    What a sealed token of the user is bound to (C{which}: "access" or
    "refresh"); the admin command's key rotation re-seals under the same.
    """
    return f"forgejo-user:{forgejo_user_id}:{which}"


class UpstreamCredentials:
    def __init__(
        self,
        store: Store,
        box: SecretBox,
        upstream: ForgejoClient,
        clock: IReactorTime,
        refresh_margin: float = REFRESH_MARGIN,
    ) -> None:
        self._store = store
        self._box = box
        self._upstream = upstream
        self._clock = clock
        self._margin = refresh_margin
        self._refreshing: dict[int, _Shared] = {}
        # user id -> (token, until when it may be handed out without a look
        # at the store); bounded by the refresh margin and a few seconds.
        self._cache: dict[int, tuple[str, float]] = {}

    async def sign_in(self, code: str, verifier: str) -> ForgejoUser:
        """
        The end of a login at Forgejo: exchange its code (with our PKCE
        verifier), learn who signed in, and keep their new credential
        (Forgejo has just invalidated the previous refresh token).

        @raise fjmcp.forgejo.client.UpstreamError: Forgejo refused or failed.
        """
        tokens = await self._upstream.exchange_code(code, verifier)
        user = await self._upstream.get_user(tokens.access_token)
        await self.save(user, tokens)
        return user

    async def save(self, user: ForgejoUser, tokens: UpstreamTokens) -> int:
        """
        Make C{tokens} the user's only Forgejo credential; returns its generation.
        """
        refresh = tokens.refresh_token
        self._cache.pop(user.id, None)
        return await self._store.replace_upstream_credential(
            UpstreamUser(user.id, user.login, user.full_name),
            self._box.seal(tokens.access_token, credential_context(user.id, "access")),
            (self._box.seal(refresh, credential_context(user.id, "refresh")) if refresh else None),
            tokens.expires_at,
            tokens.scope,
            tokens.lifetime,
        )

    async def access_token(self, forgejo_user_id: int) -> str:
        """
        A Forgejo access token for the user that is good for at least the
        refresh margin of its lifetime.

        @raise LoginRequiredError: no credential, or Forgejo refused to renew it.
        @raise fjmcp.forgejo.client.UpstreamError: Forgejo could not be reached.
        """
        cached = self._cache.get(forgejo_user_id)
        if cached is not None and self._clock.seconds() < cached[1]:
            return cached[0]
        in_flight = self._refreshing.get(forgejo_user_id)
        if in_flight is not None:
            return await in_flight.wait()
        _, token = await self._stored(forgejo_user_id)
        if token is not None:
            return token
        in_flight = self._refreshing.get(forgejo_user_id)
        if in_flight is None:
            # Nobody started a refresh while we read the row: this call does it.
            in_flight = _Shared(Deferred.fromCoroutine(self._refresh(forgejo_user_id)))
            self._refreshing[forgejo_user_id] = in_flight

            def forget(_: object, shared: _Shared = in_flight) -> None:
                if self._refreshing.get(forgejo_user_id) is shared:
                    del self._refreshing[forgejo_user_id]

            in_flight.wait().addBoth(forget)
        return await in_flight.wait()

    async def _stored(self, forgejo_user_id: int) -> tuple[SealedCredential, str | None]:
        """
        The user's stored credential, and its access token if still good.
        """
        cred = await self._store.get_upstream_credential(forgejo_user_id)
        if cred is None:
            raise LoginRequiredError("no Forgejo credential is stored for this user")
        return cred, self._usable(cred)

    def _usable(self, cred: SealedCredential) -> str | None:
        now = self._clock.seconds()
        margin = refresh_margin(cred.lifetime, self._margin)
        if cred.expires_at - now <= margin:
            return None
        try:
            token = self._box.open(
                cred.access_token_enc, credential_context(cred.forgejo_user_id, "access")
            )
        except DecryptionError as e:
            raise LoginRequiredError(str(e)) from None
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[cred.forgejo_user_id] = (
            token,
            min(cred.expires_at - margin, now + CACHE_SECONDS),
        )
        return token

    async def _claimed(self, forgejo_user_id: int) -> tuple[SealedCredential, str | None, float]:
        """
        The user's credential once this process holds the claim on renewing
        it, and until when (or the token to use instead, when another
        process renewed it meanwhile).
        """
        give_up = self._clock.seconds() + 2 * CLAIM_SECONDS
        while True:
            # Read again each time: a renewal that finished meanwhile has
            # replaced the row, and its old refresh token is dead.
            cred, token = await self._stored(forgejo_user_id)
            if token is not None:
                return cred, token, 0.0
            if cred.refresh_token_enc is None:
                raise LoginRequiredError("the Forgejo credential expired and has no refresh token")
            now = self._clock.seconds()
            until = now + CLAIM_SECONDS
            if await self._store.claim_upstream_refresh(
                forgejo_user_id, cred.generation, now, until
            ):
                return cred, None, until
            if now > give_up:
                raise UpstreamUnavailableError(
                    "another broker process is renewing the user's Forgejo token and has not"
                    " finished"
                )
            await deferLater(self._clock, CLAIM_POLL, lambda: None)

    async def _refresh(self, forgejo_user_id: int) -> str:
        cred, token, until = await self._claimed(forgejo_user_id)
        if token is not None:
            return token
        try:
            return await self._renew(cred)
        except BaseException:
            # Let the next caller try at once rather than wait out the claim.
            try:
                await self._store.release_upstream_refresh(forgejo_user_id, cred.generation, until)
            except Exception:
                log.failure("could not release the claim on renewing a Forgejo token")
            raise

    async def _renew(self, cred: SealedCredential) -> str:
        forgejo_user_id = cred.forgejo_user_id
        refresh_enc = cred.refresh_token_enc
        assert refresh_enc is not None
        try:
            refresh_token = self._box.open(
                refresh_enc, credential_context(forgejo_user_id, "refresh")
            )
        except DecryptionError as e:
            raise LoginRequiredError(str(e)) from None
        try:
            tokens = await self._upstream.refresh(refresh_token)
        except UpstreamError as e:
            metrics.upstream_refresh(
                "rejected" if isinstance(e, UpstreamRejectedError) else "unavailable"
            )
            if isinstance(e, UpstreamRejectedError):
                # Another process renewed after all (its claim lapsed
                # before it stored the result): its token is good.
                _, token = await self._stored(forgejo_user_id)
                if token is not None:
                    return token
                log.info(
                    "Forgejo refused to renew the token of user {user}: {error}",
                    user=forgejo_user_id,
                    error=str(e),
                )
                raise LoginRequiredError(str(e)) from None
            raise
        metrics.upstream_refresh("ok")
        user = await self._store.get_user(forgejo_user_id)
        assert user is not None
        forgejo_user = ForgejoUser(user.forgejo_user_id, user.login, user.full_name)
        # Forgejo has invalidated the stored refresh token: the new one must
        # be kept, or the user signs in again.
        for attempt in range(SAVE_ATTEMPTS):
            try:
                await self.save(forgejo_user, tokens)
                break
            except Exception:
                if attempt == SAVE_ATTEMPTS - 1:
                    raise
                log.failure("could not store a renewed Forgejo token; trying again")
                await deferLater(self._clock, CLAIM_POLL * 5, lambda: None)
        log.info("renewed the Forgejo token of user {user}", user=forgejo_user_id)
        return tokens.access_token


class _Shared:
    """
    One result, many waiters: each gets its own Deferred, and the shared
    one's failure is consumed here once everyone has been told.
    """

    def __init__(self, d: Deferred[str]) -> None:
        self._waiters: list[Deferred[str]] = []
        self._result: str | Failure | None = None
        d.addBoth(self._fire)

    def _fire(self, result: str | Failure) -> None:
        self._result = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._deliver(waiter)

    def _deliver(self, waiter: Deferred[str]) -> None:
        if isinstance(self._result, Failure):
            waiter.errback(self._result)
        else:
            assert self._result is not None
            waiter.callback(self._result)

    def wait(self) -> Deferred[str]:
        waiter: Deferred[str] = Deferred()
        if self._result is None:
            self._waiters.append(waiter)
        else:
            self._deliver(waiter)
        return waiter
