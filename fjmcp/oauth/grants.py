"""
Grants (token families) as the running broker holds them, and the one place
that decides what follows when one ends.

L{BearerCache} remembers, for a few seconds, which grant an access token
stands for, so nearly every C{/mcp} request skips the database.
L{GrantEnds} owns "a grant ended": its cached bearer checks are forgotten
and every MCP session opened with it ends (its streams close, its pending
requests get an error, its child is stopped).  It hears of an ending from
two places:

 - this process's own revocations (token endpoints, the connections page):
   the store announces each one after its transaction commits
   (L{fjmcp.store.database.StoreEvents}), so they take effect at once and
   never for a write that rolled back;
 - another process's (fjmcp-admin writes the database directly): every
   C{interval} seconds one query asks which of the grants held in memory
   (live sessions, cached bearer checks) were revoked or are gone.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from fjmcp.mcp.sessions import SessionManager
from fjmcp.store.database import StoreEvents

# How often the grants held in memory are checked for revocation: a
# revocation by another process takes effect within this.
REVOCATION_INTERVAL = 2.0
# A cached bearer check is trusted this long (a revocation in this process
# clears it at once; one elsewhere is seen within REVOCATION_INTERVAL).
BEARER_CACHE_SECONDS = 5.0
BEARER_CACHE_SIZE = 10_000

log = Logger()


@attrs.frozen
class AccessGrant:
    """
    What a valid access token lets its bearer do.
    """

    forgejo_user_id: int
    client_id: str
    family_id: str
    scope: str


class BearerCache:
    """
    Access-token digests to the grant they stand for, each until a deadline.
    C{clock} provides C{seconds()}.
    """

    def __init__(self, clock: IReactorTime, size: int = BEARER_CACHE_SIZE) -> None:
        self._clock = clock
        self._size = size
        self._entries: dict[bytes, tuple[AccessGrant, float]] = {}

    def get(self, digest: bytes) -> AccessGrant | None:
        cached = self._entries.get(digest)
        if cached is None or self._clock.seconds() >= cached[1]:
            return None
        return cached[0]

    def put(self, digest: bytes, grant: AccessGrant, expires_at: float) -> None:
        """
        Remember a checked token until its expiry or L{BEARER_CACHE_SECONDS}
        from now, whichever comes first.
        """
        if len(self._entries) >= self._size:
            self._entries.clear()
        until = min(expires_at, self._clock.seconds() + BEARER_CACHE_SECONDS)
        self._entries[digest] = (grant, until)

    def forget_token(self, digest: bytes) -> None:
        self._entries.pop(digest, None)

    def forget_families(self, family_ids: Collection[str]) -> None:
        """
        These grants ended: their tokens' next check goes to the store.
        """
        for digest, (grant, _) in list(self._entries.items()):
            if grant.family_id in family_ids:
                del self._entries[digest]

    def families(self) -> set[str]:
        """
        The grants behind checks still trusted.
        """
        now = self._clock.seconds()
        return {grant.family_id for grant, until in self._entries.values() if now < until}


class GrantSource(Protocol):
    """
    The store's side: its announcements, and which grants ended.
    """

    events: StoreEvents

    def revoked_families(self, family_ids: Collection[str]) -> Deferred[set[str]]: ...


class GrantEnds(Service):
    """
    Ends what hangs on a grant when the grant ends; see the module
    docstring.  C{clock} drives the periodic check.
    """

    name = "grant-ends"

    def __init__(
        self,
        store: GrantSource,
        sessions: SessionManager,
        bearers: BearerCache,
        clock: IReactorTime,
        interval: float = REVOCATION_INTERVAL,
    ) -> None:
        self._store = store
        self._sessions = sessions
        self._bearers = bearers
        self._interval = interval
        self._check = LoopingCall(self.check)
        self._check.clock = clock
        self._failing = False
        store.events.grant_revoked.connect(self._revoked_here)
        store.events.access_token_revoked.connect(bearers.forget_token)

    def startService(self) -> None:
        super().startService()
        self._check.start(self._interval, now=False)

    def stopService(self) -> Deferred[Any] | None:
        if self._check.running:
            self._check.stop()
        return super().stopService()

    def _revoked_here(self, family_id: str, reason: str) -> None:
        self.ended({family_id}, "its authorization was revoked")

    def ended(self, family_ids: Collection[str], why: str) -> int:
        """
        These grants ended: forget their bearer checks and end their
        sessions.  Returns how many sessions ended.
        """
        ids = set(family_ids)
        if not ids:
            return 0
        self._bearers.forget_families(ids)
        return self._sessions.end_matching(lambda s: s.family_id in ids, why)

    def check(self) -> Deferred[None]:
        """
        Ask the store, in one query, which grants held in memory were
        revoked or are gone, and end what hangs on them.
        """
        return Deferred.fromCoroutine(self._check_once())

    async def _check_once(self) -> None:
        families = self._sessions.live_families() | self._bearers.families()
        if not families:
            return
        try:
            revoked = await self._store.revoked_families(families)
        except CancelledError:
            raise
        except Exception as e:
            # The loop must go on (a LoopingCall stops at the first error);
            # one line when checks start failing, one when they work again.
            if not self._failing:
                log.error(
                    "cannot check sessions' grants for revocation: {error}; will retry",
                    error=str(e) or type(e).__name__,
                )
            self._failing = True
            return
        if self._failing:
            log.info("checking sessions' grants for revocation works again")
            self._failing = False
        if revoked and self.running:
            self.ended(revoked, "its authorization was revoked")
