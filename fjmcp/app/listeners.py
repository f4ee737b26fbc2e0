"""
Listeners that end the daemon when they cannot be opened.

twistd's own C{StreamServerEndpointService} logs a failed listen as an
unhandled error and lets the process run on with nothing listening, so
systemd shows it active and never restarts it.  A L{Listener} instead logs
one line (which endpoint, why) and makes the daemon exit with
L{EXIT_CANNOT_LISTEN}.
"""

from __future__ import annotations

import atexit
import os
import sys
from collections.abc import Callable
from typing import Protocol

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import Service
from twisted.internet.defer import CancelledError
from twisted.internet.error import CannotListenError, ReactorNotRunning
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

# Not 2: a port held by another process (often the previous instance still
# closing) is worth a restart, and the units only refuse to restart on 2.
EXIT_CANNOT_LISTEN = 3
# Twisted listens with a queue of 50 unless told otherwise: a burst of new
# connections (clients reconnecting after a restart, Caddy opening many at
# once) beyond it is dropped by the kernel and retried a second later.  As
# deep as a systemd socket unit's.
BACKLOG = 4096
_BACKLOG_TYPES = ("tcp", "tcp6", "unix", "ssl")


def with_backlog(description: str) -> str:
    """
    An endpoint description with L{BACKLOG} as its accept queue, unless it
    names one itself or is not a listening socket of ours (C{systemd:}'s
    queue is the socket unit's).
    """
    kind = description.split(":", 1)[0].lower()
    if kind not in _BACKLOG_TYPES or "backlog=" in description:
        return description
    return f"{description}:backlog={BACKLOG}"


def exit_after_stop(status: int) -> None:
    """
    Make the process exit with C{status} once twistd is done.

    twistd offers no exit status of its own after the reactor ran (only a
    signal), and C{SystemExit} raised inside the reactor is caught and
    printed as a traceback; so this waits until twistd has stopped every
    service, removed its pid file and returned, and ends the process from
    the first exit handler.
    """

    def end() -> None:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(status)

    atexit.register(end)


def describe_failure(failure: Failure) -> str:
    """
    Why a listen failed, as an operator reads it: C{"address already in
    use"} rather than the repr of a C{CannotListenError}.
    """
    error = failure.value
    if isinstance(error, CannotListenError) and error.socketError is not None:
        error = error.socketError
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[:1].lower() + error.strerror[1:]
    return str(error) or type(error).__name__


class StoppableReactor(Protocol):
    """
    What a L{Listener} asks of the reactor: the part of C{IReactorCore} it
    uses (whether the reactor runs, and stopping it).  A protocol rather
    than the interface, so a test's stand-in needs only these two members.
    """

    running: bool

    def stop(self) -> None: ...


class Listener(StreamServerEndpointService):
    """
    Listens on C{description}; a failure to listen ends the daemon.

    twistd opens listeners in C{privilegedStartService}, before the reactor
    runs, and every built-in endpoint fails right there: then this raises
    C{SystemExit}, before any service has started, so there is nothing to
    stop.  An endpoint that fails later (once the reactor runs) stops the
    reactor, so every service winds down in order, and the status is set by
    C{on_exit}.
    """

    def __init__(
        self,
        reactor: StoppableReactor,
        description: str,
        endpoint: IStreamServerEndpoint,
        factory: IProtocolFactory,
        on_exit: Callable[[int], None] = exit_after_stop,
    ) -> None:
        super().__init__(endpoint, factory)
        self._reactor = reactor
        self.description = description
        self._on_exit = on_exit
        self._listening_now = False
        self._failed_now: Failure | None = None
        # Once listening: the port (its getHost() says where, e.g. for tcp:0).
        self.port: IListeningPort | None = None

    def privilegedStartService(self) -> None:
        # Not the parent's: it logs the failure with a traceback before any
        # errback of ours could see it.
        Service.privilegedStartService(self)
        self._listening_now = True
        try:
            self._waitingForPort = self.endpoint.listen(self.factory)
            self._waitingForPort.addCallbacks(self._listening, self._cannot_listen)
        finally:
            self._listening_now = False
        if self._failed_now is not None:
            self._give_up(self._failed_now)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        return port

    def _cannot_listen(self, failure: Failure) -> None:
        if failure.check(CancelledError):
            # stopService before the endpoint answered: nothing to report.
            return
        if self._listening_now:
            self._failed_now = failure
        else:
            self._give_up(failure)

    def _give_up(self, failure: Failure) -> None:
        log.critical(
            "cannot listen on {endpoint}: {reason}; exiting with status {status}",
            endpoint=self.description,
            reason=describe_failure(failure),
            status=EXIT_CANNOT_LISTEN,
        )
        if not self._reactor.running:
            raise SystemExit(EXIT_CANNOT_LISTEN)
        self._on_exit(EXIT_CANNOT_LISTEN)
        try:
            self._reactor.stop()
        except ReactorNotRunning:
            # Already shutting down; the exit status is all that is left to set.
            pass
