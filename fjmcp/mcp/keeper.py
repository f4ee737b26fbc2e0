"""
Sessions kept in the store, so one outlives the broker process: written
once its initialize succeeded, updated when it hibernates and when the
broker stops, deleted when it ends; after a restart (or on another node)
the session table resumes one from its record.  Writes go on in the
background: a failed one is logged, and costs at most that the session
cannot be resumed after a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from fjmcp.mcp.session import Session
from fjmcp.secrets.crypto import token_hash
from fjmcp.store.mcp_sessions import StoredSession

log = Logger()


class SessionRecords(Protocol):
    """
    The store's side (L{fjmcp.store.mcp_sessions.MCPSessionStore}).
    """

    def save_mcp_session(
        self, session_hash: bytes, session: StoredSession, keep_per_user: int
    ) -> Deferred[None]: ...

    def find_mcp_session(self, session_hash: bytes) -> Deferred[StoredSession | None]: ...

    def touch_mcp_session(
        self, session_hash: bytes, last_used_at: float, family_id: str
    ) -> Deferred[None]: ...

    def forget_mcp_session(
        self, session_hash: bytes, unless_used_after: float | None = None
    ) -> Deferred[bool]: ...

    def forget_idle_mcp_sessions(self, used_before: float) -> Deferred[int]: ...


class SessionKeeper:
    """
    The session table's link to the store; without a store (C{records}
    None, as some unit tests build the table) it keeps nothing.
    """

    def __init__(
        self, records: SessionRecords | None, clock: IReactorTime, keep_per_user: int
    ) -> None:
        self._records = records
        self._clock = clock
        self._keep_per_user = keep_per_user

    def _background(self, what: str, start: Callable[[], Deferred[Any]]) -> Deferred[Any]:
        if self._records is None:
            return succeed(None)

        def failed(failure: Failure) -> None:
            log.error(
                "could not {what} in the store: {error}",
                what=what,
                error=failure.getErrorMessage(),
            )

        return start().addErrback(failed)

    def saved(self, session: Session) -> Deferred[Any]:
        """
        The session is initialized: keep it.
        """
        if session.initialize is None:
            return succeed(None)
        record = StoredSession(
            user_id=session.user_id,
            user_login=session.user_login,
            client_id=session.client_id,
            family_id=session.family_id,
            protocol_version=session.protocol_version,
            initialize=session.initialize,
            created_at=self._clock.seconds(),
            last_used_at=session.last_used,
        )
        session.stored_use = session.last_used
        return self._background(
            "keep a session",
            lambda: self._records.save_mcp_session(  # type: ignore[union-attr]
                token_hash(session.id), record, self._keep_per_user
            ),
        )

    def touched(self, session: Session) -> Deferred[Any]:
        """
        Note when the session was last used, and with which grant.
        """
        session.stored_use = session.idle_since()
        return self._background(
            "update a session",
            lambda: self._records.touch_mcp_session(  # type: ignore[union-attr]
                token_hash(session.id), session.idle_since(), session.family_id
            ),
        )

    def forgotten(self, session: Session) -> Deferred[Any]:
        return self.forget_id(session.id)

    def abandoned(self, session: Session) -> Deferred[Any]:
        """
        This process let go of a session nobody ended (idle, unused, or
        evicted for a newer one): forget its record unless another process
        has used the session since (a client's requests move to another
        broker node, which resumes the session and writes its use).
        """
        return self._background(
            "forget a session",
            lambda: self._records.forget_mcp_session(  # type: ignore[union-attr]
                token_hash(session.id), session.stored_use
            ),
        )

    def forget_id(self, session_id: str) -> Deferred[Any]:
        return self._background(
            "forget a session",
            lambda: self._records.forget_mcp_session(  # type: ignore[union-attr]
                token_hash(session_id)
            ),
        )

    def forget_idle(self, used_before: float) -> Deferred[Any]:
        return self._background(
            "forget idle sessions",
            lambda: self._records.forget_idle_mcp_sessions(  # type: ignore[union-attr]
                used_before
            ),
        )

    def stored(self, session_id: str) -> Deferred[StoredSession | None]:
        """
        The record of a session this process does not hold; fails when the
        store does.
        """
        if self._records is None:
            return succeed(None)
        return self._records.find_mcp_session(token_hash(session_id))
