"""
MCP sessions: one forgejo-mcp child per session, owned by one user.

This module owns the session table and every session's life: creating one
(caps on sessions and on processes, spawning the child with only that
user's token), looking one up for its owner, hibernating an idle one (its
child stops, the session stays; the next request starts a child and
replays the session's handshake to it, as a token renewal does), reaping
idle and unused ones,
ending one (and its child) or those matching a rule (a revoked grant), and
what happens when a child dies, misbehaves or stops answering.  Routing
messages inside a session is L{fjmcp.mcp.router}'s job; HTTP is
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
from fjmcp.logs import Redactor
from fjmcp.mcp import resources
from fjmcp.mcp.children import (
    Child,
    ChildExit,
    ChildSupervisor,
    JSONRPCChildProtocol,
    StderrLog,
    child_environment,
)
from fjmcp.mcp.router import ResponseStream, SessionRouter
from fjmcp.mcp.session import Session, StandaloneSink
from fjmcp.secrets.crypto import token_hash

# JSON-RPC error codes the broker itself answers with.
CHILD_GONE = -32603
REAP_INTERVAL = 30.0
# Claude gives a tool call 300 s; no request waits longer by default, and a
# retiring child gets no longer either.
REQUEST_TIMEOUT = 300.0
# A session that got nothing after initialize (mcp-remote opens a second one
# per start and never uses it) is reaped this much sooner than an idle one.
UNUSED_TIMEOUT = 120.0
# How long a client refused for a user's processes still stopping should
# wait: forgejo-mcp exits within a second of its stdin closing.
STOPPING_RETRY_AFTER = 5

# forgejo-mcp's --debug defaults to true and then logs every API call to
# stderr; the broker keeps (rate-limited) stderr in its own log, where that
# volume drowns what matters.
CHILD_ARGS = ("--transport", "stdio", "--debug=false")

log = Logger()


class SessionLimitError(Exception):
    """
    The broker runs as many sessions (or processes) as it may; try again
    in C{retry_after} seconds.
    """

    def __init__(self, message: str, retry_after: int = 30) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SpawnError(Exception):
    """
    The child process could not be started (missing binary, fork failure).
    """


class SessionManager(Service):
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
        hibernate_after: float = 0.0,
    ) -> None:
        """
        @param max_sessions: sessions at once, hibernating ones included.
        @param max_children: children running at once (those of sessions
            with a child); at the cap, the least recently used idle one
            hibernates to make room.  None: as many as sessions.
        @param hibernate_after: seconds without activity after which an
            idle session's child is stopped (0: never).
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
        self._hibernate_after = hibernate_after
        self._max_per_user = max_per_user
        self._idle_timeout = idle_timeout
        self._max_line = max_line
        self._request_timeout = request_timeout
        self._unused_timeout = min(unused_timeout, idle_timeout)
        self._budget = budget or resources.Budget()
        # Every live process of each user: sessions' children, children being
        # retired after a renewal, and children still stopping.
        self._processes: dict[int, set[Child]] = {}
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
        return DeferredList(
            [
                self.end(s, "the broker is shutting down", "shutdown")
                for s in list(self._sessions.values())
            ],
            consumeErrors=True,
        )

    def of_user(self, user_id: int) -> list[Session]:
        return [s for s in self._sessions.values() if s.user_id == user_id]

    def processes_of(self, user_id: int) -> int:
        """
        How many child processes of the user are alive, whatever their state.
        """
        return len(self._processes.get(user_id, ()))

    def get(self, session_id: str, user_id: int, family_id: str = "") -> Session | None:
        """
        The user's live session of that id.  C{family_id} is the grant of the
        bearer asking: a client that signed in again uses its session with
        a token of a new grant, and from then on that grant is the one
        whose revocation ends the session.
        """
        session = self._sessions.get(session_id)
        if session is None or session.user_id != user_id or session.ended:
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
    ) -> Session:
        """
        Start a session: spawn its child with the user's Forgejo token.  The
        caller then routes the client's initialize request to it.
        C{family_id} is the grant of the bearer that asked: the session ends
        when it is revoked.

        @raise SessionLimitError: the broker or the user is at a cap.
        @raise SpawnError: the child could not be started.
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
        self._room_for_child()

        session_id = secrets.token_urlsafe(24)
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
        )
        session.child, session.router = self._spawn(session, forgejo_token)
        self._sessions[session_id] = session
        metrics.session_started()
        log.info(
            "session {s} started for {login} ({u}) by client {c}, child pid {pid}",
            s=session_id[:8],
            login=user_login,
            u=user_id,
            c=client_id,
            pid=session.child.pid,
        )
        return session

    def _check_processes(self, user_id: int) -> None:
        """
        @raise SessionLimitError: no process may be started for the user now.
        """
        # Processes are counted, not just sessions: an evicted or hibernated
        # session's child takes a moment to exit, and a client that
        # initializes hundreds of times at once must not get a process each
        # meanwhile.  A user may have twice their session cap alive, half of
        # it stopping.
        if self.processes_of(user_id) >= 2 * self._max_per_user:
            raise SessionLimitError(
                f"too many of this user's MCP server processes are still starting or "
                f"stopping (at most {2 * self._max_per_user})",
                retry_after=STOPPING_RETRY_AFTER,
            )
        # Globally, room for one user's worth of children still stopping.
        most = self._max_children + self._max_per_user
        if len(self._children) >= most:
            raise SessionLimitError(
                f"the broker already runs {most} MCP server processes",
                retry_after=STOPPING_RETRY_AFTER,
            )
        if not self._budget.room_for_child():
            log.warn("refusing a new session: the broker is close to its open-files limit")
            raise SessionLimitError("the broker is out of file descriptors")

    def children_running(self) -> int:
        """
        Sessions with a child (hibernating ones have none).
        """
        return sum(1 for s in self._sessions.values() if not s.hibernating)

    def _room_for_child(self, waking: Session | None = None) -> None:
        """
        At the children cap, hibernate the least recently used idle session
        (not C{waking}) to make room for one more.

        @raise SessionLimitError: every running child is busy.
        """
        if self.children_running() < self._max_children:
            return
        idle = [s for s in self._sessions.values() if s is not waking and s.can_hibernate()]
        if not idle:
            raise SessionLimitError(
                f"all {self._max_children} MCP server processes are busy",
                retry_after=STOPPING_RETRY_AFTER,
            )
        self.hibernate(min(idle, key=Session.idle_since), "to make room for another session")

    def _spawn(self, session: Session, forgejo_token: str) -> tuple[Child, SessionRouter]:
        """
        Start a child for C{session} holding C{forgejo_token}, with its own
        router: what it writes goes to that router, whether it is the
        session's current child or one being retired.
        """
        routers: list[SessionRouter] = []

        def on_message(message: Any) -> None:
            router = routers[0]
            router.child_message(message)
            if router is not session.router:
                self._maybe_retire(session, child, router)

        def give_up(why: str, reason: str) -> None:
            # The session's current child takes its session with it; a
            # retiring one just goes.
            if routers and routers[0] is session.router:
                self.end(session, why, reason)
            else:
                child.stop()

        def on_protocol_error(problem: str) -> None:
            log.warn(
                "session {s} of {u}: {problem}; ending it",
                s=session.id[:8],
                u=session.user_login,
                problem=problem,
            )
            give_up(f"the forgejo-mcp process misbehaved: {problem}", "misbehaved")

        kwargs = {} if self._max_line is None else {"max_line": self._max_line}
        protocol = JSONRPCChildProtocol(
            on_message,
            on_stderr=StderrLog(
                self._reactor, session.id, session.user_login, Redactor([forgejo_token])
            ),
            on_protocol_error=on_protocol_error,
            **kwargs,
        )
        try:
            child = self._children.spawn(
                self._executable,
                [*self._args_prefix, *CHILD_ARGS],
                child_environment(self._forgejo_url, forgejo_token),
                protocol,
                f"session {session.id[:8]} ({session.user_login})",
            )
        except (OSError, RuntimeError) as e:
            metrics.child_spawned(False)
            raise SpawnError(f"forgejo-mcp could not be started: {e}") from None
        metrics.child_spawned(True)
        processes = self._processes.setdefault(session.user_id, set())
        processes.add(child)

        def forget_process(exit: ChildExit) -> ChildExit:
            processes.discard(child)
            if not processes and self._processes.get(session.user_id) is processes:
                del self._processes[session.user_id]
            return exit

        def on_silent() -> None:
            log.warn(
                "session {s} of {u}: forgejo-mcp (pid {pid}) wrote nothing for {t:g} s "
                "with a request waiting; ending it",
                s=session.id[:8],
                u=session.user_login,
                pid=child.pid,
                t=self._request_timeout,
            )
            give_up("the forgejo-mcp process stopped answering", "unresponsive")

        router = SessionRouter(
            child.send,
            session.standalone,
            clock=self._reactor,
            timeout=self._request_timeout,
            on_silent=on_silent,
        )
        routers.append(router)
        protocol.exited.addCallback(forget_process)
        protocol.exited.addCallback(self._child_exited, session, child, router)
        return child, router

    def ensure_child(self, session: Session, forgejo_token: str, wake: bool = True) -> None:
        """
        Before a message goes to the session: make sure it has a child (when
        C{wake}: a message that a hibernating session can take without one,
        such as a GET stream or a cancellation, wakes nothing), and one
        holding the user's current Forgejo token.

        A hibernating session gets a new child, with the session's handshake
        replayed to it.  A renewed token (forgejo-mcp reads its token only
        once) gets a replacement child the same way; new requests go there,
        and the old child finishes what it has in hand before it is stopped.
        The client sees the same session throughout.

        @raise SessionLimitError: a hibernating session cannot get a child
            now (caps); try again later.
        @raise SpawnError: nor could one be started.
        """
        if session.ended or session.initialize is None:
            return
        digest = token_hash(forgejo_token)
        if session.hibernating and not wake:
            return
        if session.hibernating:
            self._check_processes(session.user_id)
            self._room_for_child(waking=session)
            child, router = self._spawn(session, forgejo_token)
            self._handshake(session, child)
            session.child, session.router, session.token_digest = child, router, digest
            session.hibernating = False
            metrics.session_woken()
            log.info(
                "session {s} of {u} woke up: child pid {pid}",
                s=session.id[:8],
                u=session.user_login,
                pid=child.pid,
            )
            return
        if digest == session.token_digest:
            return
        try:
            child, router = self._spawn(session, forgejo_token)
        except SpawnError as e:
            # The old child goes on with the old token while it lasts.
            log.error("session {s}: cannot renew its child: {e}", s=session.id[:8], e=str(e))
            return
        self._handshake(session, child)
        old_child, old_router = session.child, session.router
        session.child, session.router, session.token_digest = child, router, digest
        session.retiring.append((old_child, old_router))
        log.info(
            "session {s} of {u}: Forgejo token renewed; child pid {old} hands over to {new}",
            s=session.id[:8],
            u=session.user_login,
            old=old_child.pid,
            new=child.pid,
        )
        # Whatever happens, a retiring child is gone after the longest a
        # client waits for a tool call.
        deadline = self._reactor.callLater(self._request_timeout, old_child.stop)

        def cancel_deadline(result: ChildExit) -> ChildExit:
            if deadline.active():
                deadline.cancel()
            return result

        old_child.protocol.exited.addCallback(cancel_deadline)
        self._maybe_retire(session, old_child, old_router)

    @staticmethod
    def _handshake(session: Session, child: Child) -> None:
        """
        Replay the client's initialize and initialized to a new child of
        the session; it answers before anything sent after them.
        """
        assert session.initialize is not None
        replay = dict(session.initialize)
        # Not an id the router hands out, so the answer is dropped there.
        replay["id"] = "fjmcp-handshake"
        child.send(replay)
        child.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def hibernate(self, session: Session, why: str) -> None:
        """
        Stop the session's child; the session stays (see L{ensure_child}).
        """
        if not session.can_hibernate():
            return
        session.hibernating = True
        metrics.session_hibernated()
        log.info(
            "session {s} of {u} hibernates ({why}): child pid {pid} stops",
            s=session.id[:8],
            u=session.user_login,
            why=why,
            pid=session.child.pid,
        )
        session.child.stop()

    def _maybe_retire(self, session: Session, child: Child, router: SessionRouter) -> None:
        if router.in_flight == 0 and router.server_requests_pending == 0:
            child.stop()

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

    def _child_exited(
        self, exit: ChildExit, session: Session, child: Child, router: SessionRouter
    ) -> ChildExit:
        if child is not session.child or session.hibernating:
            # A retired child, or a hibernating session's: whatever it still
            # owed gets an error now.
            session.retiring = [(c, r) for c, r in session.retiring if c is not child]
            router.fail_all(CHILD_GONE, f"the forgejo-mcp process {exit.reason}")
            return exit
        if not session.ended:
            log.warn(
                "session {s} of {u}: forgejo-mcp {reason}",
                s=session.id[:8],
                u=session.user_login,
                reason=exit.reason,
            )
        self._forget(session, f"the forgejo-mcp process {exit.reason}", "crashed")
        return exit

    def _forget(self, session: Session, why: str, reason: str = "other") -> None:
        if not session.ended:
            metrics.session_ended(reason)
        session.ended = True
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
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
