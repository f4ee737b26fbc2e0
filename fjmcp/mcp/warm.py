"""
Warm children for stateless (MCP 2026-07-28) clients: per user and grant,
one session of the broker's own making, already initialized, whose child
serves every stateless request of that grant.

Such a session is a session like the others to the session table (the same
caps, hibernation, token renewal, reaping, and its end when its grant is
revoked), except that no client knows its id: the session table never
hands it out for an C{Mcp-Session-Id} (L{fjmcp.mcp.sessions}), and it is
not kept in the store (a restart starts a new one on the next request).
The broker makes the child's handshake itself (L{fjmcp.mcp.stateless})
and keeps the child's answer, from which C{server/discover} is answered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from fjmcp import __version__
from fjmcp.mcp.session import Session
from fjmcp.mcp.session_children import SpawnError
from fjmcp.mcp.sessions import SessionManager
from fjmcp.mcp.stateless import CHILD_VERSION, child_initialize, refusal_to_child

# A forgejo-mcp answers initialize within a second of its start (it checks
# its connection to Forgejo first); clients probing server/discover give up
# after 10 s.
INITIALIZE_TIMEOUT = 8.0
STATELESS_CLIENT = "(stateless clients)"

log = Logger()


class _Answer:
    """
    Where the answer to the broker's own initialize goes.
    """

    def __init__(self) -> None:
        self.done: Deferred[dict[str, Any]] = Deferred()

    def message(self, message: dict[str, Any]) -> None:
        pass

    def finish(self, response: dict[str, Any]) -> None:
        if not self.done.called:
            self.done.callback(response)


_Listener = tuple[Callable[[dict[str, Any]], None], Callable[[], None]]


class WarmChildren:
    """
    The stateless sessions, one per (user, grant).
    """

    def __init__(
        self,
        sessions: SessionManager,
        clock: IReactorTime,
        initialize_timeout: float = INITIALIZE_TIMEOUT,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._timeout = initialize_timeout
        self._warm: dict[tuple[int, str], Session] = {}
        self._starting: dict[tuple[int, str], list[Deferred[Session]]] = {}
        # The open subscriptions/listen streams of each session (by id).
        self._listeners: dict[str, set[_Listener]] = {}

    def __len__(self) -> int:
        return sum(1 for s in self._warm.values() if not s.ended)

    async def session(
        self,
        user_id: int,
        user_login: Callable[[], Awaitable[str]],
        forgejo_token: str,
        family_id: str,
        wake: bool = True,
    ) -> Session:
        """
        The grant's stateless session, with a child holding C{forgejo_token}
        that has answered the broker's initialize (started, woken from
        hibernation or renewed as needed; not woken unless C{wake}).
        C{user_login} is asked only when a session is started (for its log
        lines).

        @raise fjmcp.mcp.session_children.SessionLimitError: not now (caps).
        @raise SpawnError: no child could be started or it would not
            initialize.
        """
        key = (user_id, family_id)
        session = self._warm.get(key)
        if session is not None and not session.ended:
            session.last_used = self._clock.seconds()
            self._sessions.ensure_child(session, forgejo_token, wake=wake)
            return session
        waiting = self._starting.get(key)
        if waiting is None:
            # The start belongs to no request: one whose client goes away
            # meanwhile stops waiting, not the start.
            waiting = self._starting[key] = []
            start = Deferred.fromCoroutine(
                self._start(user_id, user_login, forgejo_token, family_id)
            )
            start.addBoth(self._started, key)
        mine: Deferred[Session] = Deferred()
        waiting.append(mine)
        return await mine

    def _started(self, result: Session | Failure, key: tuple[int, str]) -> None:
        if isinstance(result, Session):
            # Forget the ended ones now and then (grants end, users come
            # back with new ones).
            self._warm = {k: s for k, s in self._warm.items() if not s.ended}
            self._warm[key] = result
        for d in self._starting.pop(key):
            if d.called:
                continue
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

    async def _start(
        self,
        user_id: int,
        user_login: Callable[[], Awaitable[str]],
        forgejo_token: str,
        family_id: str,
    ) -> Session:
        login = await user_login()
        session = self._sessions.create(
            user_id,
            login,
            STATELESS_CLIENT,
            CHILD_VERSION,
            forgejo_token,
            family_id=family_id,
            stateless=True,
        )
        message = child_initialize(__version__)
        session.initialize = message
        session.used = True
        answer = _Answer()
        self._sessions.client_request(session, message, answer)
        answer.done.addTimeout(self._timeout, self._clock)
        try:
            response = await answer.done
        except TimeoutError:
            self._sessions.end(session, "its child did not initialize", "initialize_failed")
            raise SpawnError(
                f"the forgejo-mcp process did not answer initialize within {self._timeout:g} s"
            ) from None
        except BaseException:
            self._sessions.end(session, "its start failed", "initialize_failed")
            raise
        result = response.get("result")
        if not isinstance(result, dict):
            self._sessions.end(session, "its child refused to initialize", "initialize_failed")
            raise SpawnError(
                f"the forgejo-mcp process refused to initialize: {response.get('error')!r}"
            )
        session.handshake_result = result
        # What the child says on its own (list changes) goes to the
        # grant's listen streams, for as long as the session lives.
        session.standalone.attach(
            lambda message: self._fan_out(session, message), lambda: self._ended(session)
        )
        self._sessions.client_notification(
            session, {"jsonrpc": "2.0", "method": "notifications/initialized"}
        )
        log.info(
            "stateless session {s} of {login} ({u}) ready, child pid {pid}",
            s=session.id[:8],
            login=login,
            u=user_id,
            pid=session.child.pid,
        )
        return session

    def listen(
        self,
        session: Session,
        send: Callable[[dict[str, Any]], None],
        end: Callable[[], None],
    ) -> Callable[[], None]:
        """
        Give C{send} every message the session's child sends on its own,
        until the returned callable is called; C{end} is called if the
        session ends first.
        """
        listener: _Listener = (send, end)
        self._listeners.setdefault(session.id, set()).add(listener)

        def stop() -> None:
            listeners = self._listeners.get(session.id)
            if listeners is not None:
                listeners.discard(listener)
                if not listeners:
                    del self._listeners[session.id]

        return stop

    def _fan_out(self, session: Session, message: dict[str, Any]) -> None:
        if "id" in message and "method" in message:
            # A request of the child's that no single client request owns
            # (several were in flight): no stateless client can take it,
            # and the child must not wait for an answer.
            self._sessions.client_response(session, refusal_to_child(message))
            return
        for send, _ in list(self._listeners.get(session.id, ())):
            send(message)

    def _ended(self, session: Session) -> None:
        for _, end in list(self._listeners.pop(session.id, ())):
            try:
                end()
            except Exception:
                log.failure("ending a listen stream failed")
