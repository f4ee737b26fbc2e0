"""
A session's child, for the session table (L{fjmcp.mcp.sessions}, which
mixes this in): starting one within the caps on processes and running
children (making room by hibernating the least recently used idle
session), wiring it to its router, replacing it when the user's Forgejo
token is renewed or the session wakes from hibernation (the session's
handshake replayed), stopping it to hibernate, and what its exit means.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
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
from fjmcp.mcp.keeper import SessionKeeper
from fjmcp.mcp.router import SessionRouter
from fjmcp.mcp.session import Session
from fjmcp.secrets.crypto import token_hash

# JSON-RPC error code of requests whose child went away.
CHILD_GONE = -32603
# How long a client refused for a user's processes still stopping should
# wait: forgejo-mcp exits within a second of its stdin closing.
STOPPING_RETRY_AFTER = 5
BUSY_RETRY_AFTER = 1

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


class SessionChildren:
    """
    The child side of L{fjmcp.mcp.sessions.SessionManager}; its state is
    the manager's (set in its constructor).
    """

    _reactor: IReactorTime
    _children: ChildSupervisor
    _executable: str
    _forgejo_url: str
    _args_prefix: Sequence[str]
    _max_line: int | None
    _max_children: int
    _max_children_per_user: int
    _request_timeout: float
    _budget: resources.Budget
    _keeper: SessionKeeper
    _sessions: dict[str, Session]
    # Every live process of each user: sessions' children, children being
    # retired after a renewal, and children still stopping.
    _processes: dict[int, set[Child]]

    def end(
        self, session: Session, why: str = "the session was ended", reason: str = "other"
    ) -> Deferred[ChildExit]:
        raise NotImplementedError

    def _forget(self, session: Session, why: str, reason: str = "other") -> None:
        raise NotImplementedError

    def processes_of(self, user_id: int) -> int:
        """
        How many child processes of the user are alive, whatever their state.
        """
        return len(self._processes.get(user_id, ()))

    def _check_processes(self, user_id: int) -> None:
        """
        @raise SessionLimitError: no process may be started for the user now.
        """
        # Processes are counted, not just running children: an evicted or
        # hibernated session's child takes a moment to exit, and a client
        # that initializes hundreds of times at once must not get a process
        # each meanwhile.  A user may have twice their children cap alive,
        # half of it stopping.
        per_user = self._max_children_per_user
        if self.processes_of(user_id) >= 2 * per_user:
            raise SessionLimitError(
                f"too many of this user's MCP server processes are still starting or "
                f"stopping (at most {2 * per_user})",
                retry_after=STOPPING_RETRY_AFTER,
            )
        # Globally, room for one user's worth of children still stopping.
        most = self._max_children + per_user
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

    def _room_for_child(self, user_id: int, waking: Session | None = None) -> None:
        """
        At the user's children cap, hibernate the user's least recently
        used idle session (not C{waking}) to make room for one more; then
        the same at the broker's cap, among every user's sessions.

        @raise SessionLimitError: every running child that could make room
            is busy.
        """
        running = [s for s in self._sessions.values() if not s.hibernating]
        mine = [s for s in running if s.user_id == user_id]
        if len(mine) >= self._max_children_per_user:
            self._make_room(mine, waking, f"all {len(mine)} of your MCP server processes")
            return
        if len(running) >= self._max_children:
            self._make_room(running, waking, f"all {self._max_children} MCP server processes")

    def _make_room(self, among: list[Session], waking: Session | None, all_of: str) -> None:
        idle = [s for s in among if s is not waking and s.can_hibernate()]
        if not idle:
            raise SessionLimitError(
                f"{all_of} are busy",
                # A call takes seconds, not minutes: ask again soon.
                retry_after=BUSY_RETRY_AFTER,
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
            numbers=session.question_numbers,
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
            self._room_for_child(session.user_id, waking=session)
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
        self._keeper.touched(session)
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
