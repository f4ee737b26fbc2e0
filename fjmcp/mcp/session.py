"""
One MCP session as the broker keeps it: its owner, the grant that opened it,
the client's handshake (replayed to every new child), its current child
and router, the sink of its GET stream, and whether it may hibernate.
The session table and each session's life are L{fjmcp.mcp.sessions}'.
"""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Iterator
from typing import Any

import attrs

from fjmcp.mcp.children import Child
from fjmcp.mcp.router import SessionRouter

STANDALONE_QUEUE = 256


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
    token_digest: bytes = attrs.field(repr=False)
    # The grant (token family) whose bearer last used the session: the one
    # that opened it, or a newer one of the same user (the client signed in
    # again).  Its revocation ends the session.  Empty: not known.
    family_id: str = ""
    # The client's initialize request, replayed to a replacement child.
    initialize: dict[str, Any] | None = None
    retiring: list[tuple[Child, SessionRouter]] = attrs.Factory(list)
    ended: bool = False
    # Whether the client sent any request after initialize; sessions that
    # never get one are reaped sooner.
    used: bool = False
    # No child now: the next request starts one (L{SessionManager.ensure_child}).
    hibernating: bool = False
    # The broker's own session for a user's stateless (2026-07-28) requests
    # (L{fjmcp.mcp.warm}): no client knows its id.
    stateless: bool = False
    # The child's answer to the broker's own initialize, for server/discover.
    handshake_result: dict[str, Any] | None = None
    # Numbers for the ids of the children's requests to the client: one
    # sequence for all of the session's children, so an answer meant for a
    # retiring child's question never reaches the new child's.
    question_numbers: Iterator[int] = attrs.Factory(lambda: itertools.count(1))
    # The last use the store's record of the session knows of (see
    # L{fjmcp.mcp.keeper.SessionKeeper.touched}).
    stored_use: float = 0.0

    def idle_since(self) -> float:
        """
        When the session last did anything: the client's last request, or
        the child's last message.
        """
        return max(self.last_used, self.router.last_heard)

    def can_hibernate(self) -> bool:
        """
        Nothing would be lost by stopping the child now: no request waits
        for it, it waits for nothing, no older child is still finishing,
        and the handshake to replay is known.
        """
        return (
            not self.hibernating
            and not self.ended
            and self.initialize is not None
            and self.router.in_flight == 0
            and self.router.server_requests_pending == 0
            and not self.retiring
        )


# Client notifications a hibernating session takes without a child: nothing
# is in flight to cancel, and the handshake is replayed on waking anyway.
NEEDS_NO_CHILD = frozenset({"notifications/cancelled", "notifications/initialized"})


def wakes(message: dict[str, Any]) -> bool:
    """
    Whether a client message (not a response) needs the session's child.
    """
    return "id" in message or message.get("method") not in NEEDS_NO_CHILD
