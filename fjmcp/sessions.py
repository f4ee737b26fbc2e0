"""
MCP sessions: one forgejo-mcp child per session, owned by one user.

This module owns the session table and every session's life: creating one
(caps, spawning the child with only that user's token), looking one up for
its owner, reaping idle ones, ending one (and its child), and what happens
when a child dies or misbehaves.  Routing messages inside a session is
L{fjmcp.router}'s job; HTTP is L{fjmcp.mcp_http}'s.
"""

from __future__ import annotations

import collections
import secrets
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from fjmcp.children import (
    Child,
    ChildExit,
    ChildSupervisor,
    JSONRPCChildProtocol,
    child_environment,
)
from fjmcp.logs import Redactor
from fjmcp.router import SessionRouter

# JSON-RPC error codes the broker itself answers with.
CHILD_GONE = -32603
STANDALONE_QUEUE = 256
STDERR_BURST = 20
STDERR_WINDOW = 10.0
REAP_INTERVAL = 30.0

log = Logger()
child_log = Logger(namespace="fjmcp.child")


class SessionLimitError(Exception):
    """
    The broker runs as many sessions as it may; try again later.
    """


class SpawnError(Exception):
    """
    The child process could not be started (missing binary, fork failure).
    """


class StandaloneSink:
    """
    The session's GET stream: messages not tied to a client request.  Held
    in a bounded queue while no GET stream is open.
    """

    def __init__(self) -> None:
        self.queue: collections.deque[dict[str, Any]] = collections.deque(maxlen=STANDALONE_QUEUE)
        self.stream: Callable[[dict[str, Any]], None] | None = None
        self._close: Callable[[], None] | None = None

    def __call__(self, message: dict[str, Any]) -> None:
        if self.stream is not None:
            self.stream(message)
        else:
            self.queue.append(message)

    def attach(self, stream: Callable[[dict[str, Any]], None], close: Callable[[], None]) -> None:
        """
        A GET stream opened; it replaces the previous one, which is closed.
        """
        if self._close is not None:
            self._close()
        self.stream, self._close = stream, close
        while self.queue:
            stream(self.queue.popleft())

    def detach(self, stream: Callable[[dict[str, Any]], None]) -> None:
        if self.stream == stream:
            self.stream, self._close = None, None

    def close(self) -> None:
        """
        The session ended: end its GET stream too.
        """
        close, self.stream, self._close = self._close, None, None
        if close is not None:
            close()


class _StderrLog:
    """
    A child's stderr, logged with its session and user, secrets scrubbed,
    at most C{STDERR_BURST} lines per C{STDERR_WINDOW} seconds.
    """

    def __init__(self, clock: Any, session_id: str, user: str, redact: Redactor) -> None:
        self._clock = clock
        self._session = session_id[:8]
        self._user = user
        self._redact = redact
        self._window_start = 0.0
        self._count = 0
        self._suppressed = 0

    def __call__(self, line: str) -> None:
        now = self._clock.seconds()
        if now - self._window_start >= STDERR_WINDOW:
            if self._suppressed:
                child_log.info(
                    "session {session} ({user}): {n} more stderr lines suppressed",
                    session=self._session,
                    user=self._user,
                    n=self._suppressed,
                )
            self._window_start, self._count, self._suppressed = now, 0, 0
        self._count += 1
        if self._count > STDERR_BURST:
            self._suppressed += 1
            return
        child_log.info(
            "session {session} ({user}): {line}",
            session=self._session,
            user=self._user,
            line=self._redact(line),
        )


@attrs.define(eq=False)
class Session:
    id: str
    user_id: int
    user_login: str
    client_id: str
    protocol_version: str
    child: Child
    router: SessionRouter
    standalone: StandaloneSink
    last_used: float
    ended: bool = False


class SessionManager(Service):
    """
    The session table.  Sessions are found by id AND owner: to anyone else
    a session does not exist.
    """

    name = "sessions"

    def __init__(
        self,
        reactor: Any,
        children: ChildSupervisor,
        executable: str,
        forgejo_url: str,
        max_sessions: int,
        max_per_user: int,
        idle_timeout: float,
        max_line: int | None = None,
        args_prefix: Sequence[str] = (),
    ) -> None:
        self._reactor = reactor
        self._children = children
        self._executable = executable
        self._forgejo_url = forgejo_url
        self._max = max_sessions
        self._max_per_user = max_per_user
        self._idle_timeout = idle_timeout
        self._max_line = max_line
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
        self._reaper.start(REAP_INTERVAL, now=False)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if self._reaper.running:
            self._reaper.stop()
        return DeferredList(
            [self.end(s, "the broker is shutting down") for s in list(self._sessions.values())],
            consumeErrors=True,
        )

    def of_user(self, user_id: int) -> list[Session]:
        return [s for s in self._sessions.values() if s.user_id == user_id]

    def get(self, session_id: str, user_id: int) -> Session | None:
        session = self._sessions.get(session_id)
        if session is None or session.user_id != user_id or session.ended:
            return None
        session.last_used = self._reactor.seconds()
        return session

    def create(
        self,
        user_id: int,
        user_login: str,
        client_id: str,
        protocol_version: str,
        forgejo_token: str,
    ) -> Session:
        """
        Start a session: spawn its child with the user's Forgejo token.  The
        caller then routes the client's initialize request to it.

        @raise SessionLimitError: the broker is full.
        @raise SpawnError: the child could not be started.
        """
        mine = sorted(self.of_user(user_id), key=lambda s: s.last_used)
        while len(mine) >= self._max_per_user:
            # The user's least recently used session makes room (Claude
            # re-initializes often and rarely says goodbye).
            oldest = mine.pop(0)
            log.info("ending session {s} of user {u}: per-user limit", s=oldest.id[:8], u=user_id)
            self.end(oldest, "ended to make room for a newer session of the same user")
        if len(self._sessions) >= self._max:
            raise SessionLimitError(f"the broker already runs {self._max} sessions")

        session_id = secrets.token_urlsafe(24)
        redact = Redactor([forgejo_token])
        standalone = StandaloneSink()
        holder: list[Session] = []

        def on_message(message: Any) -> None:
            holder[0].router.child_message(message)

        def on_protocol_error(problem: str) -> None:
            session = holder[0]
            log.warn(
                "session {s} of {u}: {problem}; ending it",
                s=session.id[:8],
                u=session.user_login,
                problem=problem,
            )
            self.end(session, f"the forgejo-mcp process misbehaved: {problem}")

        kwargs = {} if self._max_line is None else {"max_line": self._max_line}
        protocol = JSONRPCChildProtocol(
            on_message,
            on_stderr=_StderrLog(self._reactor, session_id, user_login, redact),
            on_protocol_error=on_protocol_error,
            **kwargs,
        )
        try:
            child = self._children.spawn(
                self._executable,
                [*self._args_prefix, "--transport", "stdio"],
                child_environment(self._forgejo_url, forgejo_token),
                protocol,
                f"session {session_id[:8]} ({user_login})",
            )
        except (OSError, RuntimeError) as e:
            raise SpawnError(f"forgejo-mcp could not be started: {e}") from None
        router = SessionRouter(child.send, standalone)
        session = Session(
            id=session_id,
            user_id=user_id,
            user_login=user_login,
            client_id=client_id,
            protocol_version=protocol_version,
            child=child,
            router=router,
            standalone=standalone,
            last_used=self._reactor.seconds(),
        )
        holder.append(session)
        self._sessions[session_id] = session
        protocol.exited.addCallback(self._child_exited, session)
        log.info(
            "session {s} started for {login} ({u}) by client {c}, child pid {pid}",
            s=session_id[:8],
            login=user_login,
            u=user_id,
            c=client_id,
            pid=child.pid,
        )
        return session

    def _child_exited(self, exit: ChildExit, session: Session) -> ChildExit:
        if not session.ended:
            log.warn(
                "session {s} of {u}: forgejo-mcp {reason}",
                s=session.id[:8],
                u=session.user_login,
                reason=exit.reason,
            )
        self._forget(session, f"the forgejo-mcp process {exit.reason}")
        return exit

    def _forget(self, session: Session, why: str) -> None:
        session.ended = True
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]
        session.router.fail_all(CHILD_GONE, why)
        session.standalone.close()

    def end(self, session: Session, why: str = "the session was ended") -> Deferred[ChildExit]:
        """
        End a session: pending requests are answered with an error at once,
        the session disappears (404 from now on), and its child is stopped.
        """
        self._forget(session, why)
        return session.child.stop()

    def reap(self) -> None:
        cutoff = self._reactor.seconds() - self._idle_timeout
        for session in list(self._sessions.values()):
            if session.last_used < cutoff and session.router.in_flight == 0:
                log.info(
                    "session {s} of {u} idle; ending it", s=session.id[:8], u=session.user_login
                )
                self.end(session, "the session was idle too long")
