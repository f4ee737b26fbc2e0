"""
MCP sessions: one forgejo-mcp child per session, owned by one user.

This module owns the session table and every session's life: creating one
(caps on sessions, per user and in all), looking one up for its owner (or
resuming it from the store after a restart, L{fjmcp.mcp.keeper}),
hibernating idle ones, reaping idle and unused ones, ending one (and its
child) or those matching a rule (a revoked grant).  Its child (spawning it
with only that user's token within the process caps, replacing it, what
its death or silence means) is L{fjmcp.mcp.session_children}'s; routing
messages inside a session is L{fjmcp.mcp.router}'s; HTTP is
L{fjmcp.http.streamable}'s.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from fjmcp import metrics
from fjmcp.mcp import resources
from fjmcp.mcp.children import (
    ChildExit,
    ChildSupervisor,
)
from fjmcp.mcp.keeper import SessionKeeper, SessionRecords
from fjmcp.mcp.router import ResponseStream, SessionRouter
from fjmcp.mcp.session import Session, StandaloneSink
from fjmcp.mcp.session_children import (
    CHILD_GONE,
    SessionChildren,
    SessionLimitError,
)
from fjmcp.secrets.crypto import token_hash

REAP_INTERVAL = 30.0
# How stale the store's record of a session in use may get.
TOUCH_EVERY = 300.0
# Why this process may let go of a session that another broker node serves
# now (see L{fjmcp.mcp.keeper.SessionKeeper.abandoned}); every other end
# (the client's DELETE, a revoked grant) ends it everywhere.
LET_GO = frozenset({"idle", "unused", "evicted"})
# Claude gives a tool call 300 s; no request waits longer by default, and a
# retiring child gets no longer either.
REQUEST_TIMEOUT = 300.0
# A session that got nothing after initialize (mcp-remote opens a second one
# per start and never uses it) is reaped this much sooner than an idle one.
UNUSED_TIMEOUT = 120.0

log = Logger()


class SessionManager(SessionChildren, Service):
    """
    The session table.  Sessions are found by id AND owner: to anyone else
    a session does not exist.
    """

    name = "sessions"

    def __init__(
        self,
        reactor: IReactorTime,
        children: ChildSupervisor,
        executable: str,
        forgejo_url: str,
        max_sessions: int,
        max_per_user: int,
        idle_timeout: float,
        max_line: int | None = None,
        args_prefix: Sequence[str] = (),
        request_timeout: float = REQUEST_TIMEOUT,
        unused_timeout: float = UNUSED_TIMEOUT,
        budget: resources.Budget | None = None,
        max_children: int | None = None,
        max_children_per_user: int | None = None,
        hibernate_after: float = 0.0,
        records: SessionRecords | None = None,
    ) -> None:
        """
        @param max_sessions: sessions at once, hibernating ones included.
        @param max_children: children running at once (those of sessions
            with a child); at the cap, the least recently used idle one
            hibernates to make room.  None: as many as sessions.
        @param max_children_per_user: the same for each user's children
            (at most C{max_children}).  None: as many as the user's sessions.
        @param hibernate_after: seconds without activity after which an
            idle session's child is stopped (0: never).
        @param records: where sessions are kept beyond this process (the
            store); None: nowhere.
        @param request_timeout: the deadline of every client request.
        @param unused_timeout: how long a session that got no request after
            initialize lives (never longer than C{idle_timeout}).
        @param budget: whether the process has descriptors for another child.
        """
        self._reactor = reactor
        self._children = children
        self._executable = executable
        self._forgejo_url = forgejo_url
        self._max = max_sessions
        self._max_children = max_children if max_children is not None else max_sessions
        self._max_children_per_user = min(
            self._max_children,
            max_children_per_user if max_children_per_user is not None else max_per_user,
        )
        self._hibernate_after = hibernate_after
        self._keeper = SessionKeeper(records, reactor, max_per_user)
        self._max_per_user = max_per_user
        self._idle_timeout = idle_timeout
        self._max_line = max_line
        self._request_timeout = request_timeout
        self._unused_timeout = min(unused_timeout, idle_timeout)
        self._budget = budget or resources.Budget()
        self._processes = {}
        # Tests run a scripted child through an interpreter: its script
        # and behaviours go before forgejo-mcp's own arguments.
        self._args_prefix = list(args_prefix)
        self._sessions: dict[str, Session] = {}
        self._reaper = LoopingCall(self.reap)
        self._reaper.clock = reactor

    def __len__(self) -> int:
        return len(self._sessions)

    def startService(self) -> None:
        super().startService()
        interval = REAP_INTERVAL
        if self._hibernate_after > 0:
            interval = min(interval, max(self._hibernate_after / 3, 0.05))
        self._reaper.start(interval, now=False)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._reaper.running:
            self._reaper.stop()
        # Kept sessions stay kept (with when they were last used): a client
        # resumes its session after the restart.
        return DeferredList(
            [
                d
                for s in list(self._sessions.values())
                for d in (
                    self._keeper.touched(s),
                    self.end(s, "the broker is shutting down", "shutdown"),
                )
            ],
            consumeErrors=True,
        )

    def of_user(self, user_id: int) -> list[Session]:
        return [s for s in self._sessions.values() if s.user_id == user_id]

    def get(self, session_id: str, user_id: int, family_id: str = "") -> Session | None:
        """
        The user's live session of that id.  C{family_id} is the grant of the
        bearer asking: a client that signed in again uses its session with
        a token of a new grant, and from then on that grant is the one
        whose revocation ends the session.
        """
        session = self._sessions.get(session_id)
        if session is None or session.user_id != user_id or session.ended or session.stateless:
            return None
        session.last_used = self._reactor.seconds()
        if family_id and family_id != session.family_id:
            session.family_id = family_id
        return session

    def create(
        self,
        user_id: int,
        user_login: str,
        client_id: str,
        protocol_version: str,
        forgejo_token: str,
        family_id: str = "",
        stateless: bool = False,
    ) -> Session:
        """
        Start a session: spawn its child with the user's Forgejo token.  The
        caller then routes the client's initialize request to it.
        C{family_id} is the grant of the bearer that asked: the session ends
        when it is revoked.  A C{stateless} one is the broker's own
        (L{fjmcp.mcp.warm}), never found by its id.

        @raise SessionLimitError: the broker or the user is at a cap.
        @raise SpawnError: the child could not be started.
        """
        self._admit(user_id)
        session = self._new(
            secrets.token_urlsafe(24),
            user_id,
            user_login,
            client_id,
            protocol_version,
            forgejo_token,
            family_id,
        )
        session.stateless = stateless
        metrics.session_started()
        log.info(
            "session {s} started for {login} ({u}) by client {c}, child pid {pid}",
            s=session.id[:8],
            login=user_login,
            u=user_id,
            c=client_id,
            pid=session.child.pid,
        )
        return session

    def _admit(self, user_id: int) -> None:
        """
        Make room for one more session of the user (and its child).

        @raise SessionLimitError: the broker or the user is at a cap.
        """
        self._check_processes(user_id)
        mine = sorted(self.of_user(user_id), key=lambda s: s.last_used)
        while len(mine) >= self._max_per_user:
            # The user's least recently used session makes room (Claude
            # re-initializes often and rarely says goodbye).
            oldest = mine.pop(0)
            log.info("ending session {s} of user {u}: per-user limit", s=oldest.id[:8], u=user_id)
            self.end(oldest, "ended to make room for a newer session of the same user", "evicted")
        if len(self._sessions) >= self._max:
            raise SessionLimitError(f"the broker already runs {self._max} sessions")
        self._room_for_child(user_id)

    def _new(
        self,
        session_id: str,
        user_id: int,
        user_login: str,
        client_id: str,
        protocol_version: str,
        forgejo_token: str,
        family_id: str,
        initialize: dict[str, Any] | None = None,
    ) -> Session:
        session = Session(
            id=session_id,
            user_id=user_id,
            user_login=user_login,
            client_id=client_id,
            protocol_version=protocol_version,
            child=None,  # type: ignore[arg-type]  # set just below
            router=None,  # type: ignore[arg-type]
            standalone=StandaloneSink(),
            last_used=self._reactor.seconds(),
            token_digest=token_hash(forgejo_token),
            family_id=family_id,
            initialize=initialize,
        )
        session.child, session.router = self._spawn(session, forgejo_token)
        self._sessions[session_id] = session
        return session

    def initialized(self, session: Session) -> Deferred[Any]:
        """
        The session's initialize succeeded: keep it beyond this process.
        Fires once the store has it (or failed to keep it, which is logged).
        """
        return self._keeper.saved(session)

    async def find(
        self,
        session_id: str,
        user_id: int,
        family_id: str = "",
        forgejo_token: str | None = None,
    ) -> Session | None:
        """
        L{get}, or else the user's session kept in the store from before a
        restart (or from another node), resumed with a new child holding
        C{forgejo_token} and the session's handshake replayed.

        @raise SessionLimitError: it cannot be resumed now (caps).
        @raise SpawnError: nor could its child be started.
        """
        session = self.get(session_id, user_id, family_id)
        if session is not None or forgejo_token is None or session_id in self._sessions:
            return session
        stored = await self._keeper.stored(session_id)
        if stored is None or stored.user_id != user_id:
            return None
        # Another request may have resumed it meanwhile.
        if (session := self.get(session_id, user_id, family_id)) is not None:
            return session
        self._admit(user_id)
        session = self._new(
            session_id,
            user_id,
            stored.user_login,
            stored.client_id,
            stored.protocol_version,
            forgejo_token,
            family_id or stored.family_id,
            stored.initialize,
        )
        session.used = True
        self._handshake(session, session.child)
        # Resuming is a use: a node that let the session go meanwhile (the
        # client's requests now come here) then leaves its record alone.
        self._keeper.touched(session)
        metrics.session_woken()
        log.info(
            "session {s} of {login} ({u}) resumed from the store, child pid {pid}",
            s=session_id[:8],
            login=stored.user_login,
            u=user_id,
            pid=session.child.pid,
        )
        return session

    async def forget_stored(self, session_id: str, user_id: int) -> bool:
        """
        End a session of the user that only the store holds; whether it did.
        """
        stored = await self._keeper.stored(session_id)
        if stored is None or stored.user_id != user_id:
            return False
        await self._keeper.forget_id(session_id)
        return True

    def client_request(
        self, session: Session, message: dict[str, Any], stream: ResponseStream
    ) -> SessionRouter:
        """
        Route a client request to the session's current child; returns the
        router that holds it (the one to tell if the client goes away).
        """
        if message.get("method") != "initialize":
            session.used = True
        router = session.router
        router.client_request(message, stream)
        return router

    def client_response(self, session: Session, message: dict[str, Any]) -> bool:
        """
        A client's answer to a server-to-client request, which may belong
        to a child being retired.
        """
        for router in (session.router, *(r for _, r in session.retiring)):
            if router.client_response(message):
                return True
        return False

    def client_notification(self, session: Session, message: dict[str, Any]) -> None:
        if session.hibernating:
            # Only notifications that need no child reach a hibernating
            # session (see L{wakes}): nothing is in flight to cancel.
            return
        if message.get("method") == "notifications/cancelled":
            for _, router in session.retiring:
                router.client_notification(message)
        session.router.client_notification(message)

    def _forget(self, session: Session, why: str, reason: str = "other") -> None:
        if not session.ended:
            metrics.session_ended(reason)
        session.ended = True
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
            if reason in LET_GO:
                self._keeper.abandoned(session)
            elif reason != "shutdown":
                self._keeper.forgotten(session)
        session.router.fail_all(CHILD_GONE, why)
        for child, router in session.retiring:
            router.fail_all(CHILD_GONE, why)
            child.stop()
        session.standalone.close()

    def end(
        self, session: Session, why: str = "the session was ended", reason: str = "other"
    ) -> Deferred[ChildExit]:
        """
        End a session: pending requests are answered with an error at once,
        the session disappears (404 from now on), and its child is stopped.
        C{reason} is the metrics label (L{fjmcp.metrics.SESSION_END_REASONS}).
        """
        self._forget(session, why, reason)
        return session.child.stop()

    def reap(self) -> None:
        now = self._reactor.seconds()
        cutoff = now - self._idle_timeout
        unused_cutoff = now - self._unused_timeout
        # Every process on the database forgets the kept sessions idle past
        # the cutoff, whoever holds them: the records of sessions in use
        # here must say so well before (or another broker node, or this one
        # after a restart, would forget a busy session).
        touch_before = now - min(TOUCH_EVERY, self._idle_timeout / 4)
        for session in list(self._sessions.values()):
            kept = session.initialize is not None and not session.stateless
            if kept and session.stored_use < min(touch_before, session.idle_since()):
                self._keeper.touched(session)
        self._keeper.forget_idle(cutoff)
        for session in list(self._sessions.values()):
            if session.router.in_flight:
                # A request in flight keeps a session, and ends by its deadline.
                continue
            if session.last_used < cutoff:
                log.info(
                    "session {s} of {u} idle; ending it", s=session.id[:8], u=session.user_login
                )
                self.end(session, "the session was idle too long", "idle")
            elif not session.used and session.last_used < unused_cutoff:
                log.info(
                    "session {s} of {u} got no request after initialize; ending it",
                    s=session.id[:8],
                    u=session.user_login,
                )
                self.end(session, "the session was never used", "unused")
            elif (
                self._hibernate_after > 0
                and session.used
                and session.idle_since() <= now - self._hibernate_after
            ):
                self.hibernate(session, "idle")

    # --- ending sessions by their grant

    def live_families(self) -> set[str]:
        """
        The grants (token families) live sessions were opened with.
        """
        return {s.family_id for s in self._sessions.values() if s.family_id and not s.ended}

    def end_matching(self, predicate: Callable[[Session], bool], why: str) -> int:
        """
        End every live session for which C{predicate} holds, with one log
        line each; returns how many.
        """
        doomed = [s for s in self._sessions.values() if not s.ended and predicate(s)]
        for session in doomed:
            log.info(
                "ending session {s} of {login} ({u}), client {c}, grant {family}: {why}",
                s=session.id[:8],
                login=session.user_login,
                u=session.user_id,
                c=session.client_id,
                family=session.family_id or "unknown",
                why=why,
            )
            self.end(session, why, "revoked")
        return len(doomed)
