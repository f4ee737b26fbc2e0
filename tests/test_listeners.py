"""
L{fjmcp.app.listeners.Listener} without a real daemon: a listen that fails
before the reactor runs, one that fails later, and the one log line.
(tests/test_daemon.py runs the real thing against a taken port.)
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from fjmcp.app.listeners import (
    BACKLOG,
    EXIT_CANNOT_LISTEN,
    Listener,
    describe_failure,
    with_backlog,
)


class FakeReactor:
    def __init__(self, running: bool) -> None:
        self.running = running
        self.stops = 0

    def stop(self) -> None:
        self.stops += 1


@implementer(IStreamServerEndpoint)
class FakeEndpoint:
    def __init__(self, result: Deferred[Any]) -> None:
        self.result = result

    def listen(self, factory: IProtocolFactory) -> Deferred[Any]:
        return self.result


@implementer(ILogObserver)
class Events(list[LogEvent]):
    def __call__(self, event: LogEvent) -> None:
        self.append(event)


def address_in_use() -> Failure:
    return Failure(
        CannotListenError("127.0.0.1", 8080, OSError(errno.EADDRINUSE, "Address already in use"))
    )


class ListenerTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = Events()
        globalLogPublisher.addObserver(self.events)
        self.addCleanup(globalLogPublisher.removeObserver, self.events)
        self.exits: list[int] = []

    def listener(self, reactor: FakeReactor, result: Deferred[Any]) -> Listener:
        return Listener(
            reactor, "tcp:8080", FakeEndpoint(result), Factory(), on_exit=self.exits.append
        )

    def lines(self) -> list[str]:
        return [
            formatEvent(e) for e in self.events if e.get("log_namespace") == "fjmcp.app.listeners"
        ]

    def test_fails_before_the_reactor_runs(self) -> None:
        """
        How twistd meets a taken port: listen fails inside
        privilegedStartService, before the reactor runs; one line, then
        SystemExit with the status, nothing left for the reactor to do.
        """
        reactor = FakeReactor(running=False)
        listener = self.listener(reactor, fail(address_in_use()))
        with self.assertRaises(SystemExit) as cm:
            listener.privilegedStartService()
        self.assertEqual(cm.exception.code, EXIT_CANNOT_LISTEN)
        self.assertEqual(
            self.lines(),
            ["cannot listen on tcp:8080: address already in use; exiting with status 3"],
        )
        self.assertEqual((reactor.stops, self.exits), (0, []))
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_fails_once_the_reactor_runs(self) -> None:
        """
        An endpoint that answers later: the reactor is stopped (services
        wind down in order) and the exit status is arranged.
        """
        reactor = FakeReactor(running=False)
        later: Deferred[Any] = Deferred()
        listener = self.listener(reactor, later)
        listener.privilegedStartService()
        listener.startService()
        reactor.running = True
        later.errback(address_in_use())
        self.assertEqual((reactor.stops, self.exits), (1, [EXIT_CANNOT_LISTEN]))
        self.assertEqual(len(self.lines()), 1)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_listening_is_quiet(self) -> None:
        reactor = FakeReactor(running=False)
        listener = self.listener(reactor, succeed(None))
        listener.privilegedStartService()
        listener.startService()
        self.assertEqual((reactor.stops, self.exits, self.lines()), (0, [], []))

    def test_cancelled_by_stop_is_quiet(self) -> None:
        """
        Stopped before the endpoint answered: a cancelled listen, not a
        failure to report.
        """
        reactor = FakeReactor(running=True)
        listener = self.listener(reactor, Deferred())
        listener.startService()
        listener.stopService()
        self.assertEqual((reactor.stops, self.exits, self.lines()), (0, [], []))

    def test_describe_failure(self) -> None:
        self.assertEqual(describe_failure(address_in_use()), "address already in use")
        self.assertEqual(
            describe_failure(Failure(PermissionError(errno.EACCES, "Permission denied"))),
            "permission denied",
        )
        self.assertEqual(
            describe_failure(Failure(OverflowError("bind(): port must be 0-65535."))),
            "bind(): port must be 0-65535.",
        )
        self.assertEqual(describe_failure(Failure(KeyError())), "KeyError")


class BacklogTests(SynchronousTestCase):
    """
    The broker's own listening sockets get a deep accept queue (Twisted's
    default of 50 drops a burst of reconnecting clients); what the operator
    or systemd chose is kept.
    """

    def test_listening_sockets_get_a_deep_queue(self) -> None:
        from twisted.internet import endpoints, reactor

        for description in (
            "tcp:8080:interface=127.0.0.1",
            "tcp6:8080",
            "unix:/run/fjmcp/fjmcp.sock",
        ):
            endpoint = endpoints.serverFromString(reactor, with_backlog(description))
            self.assertEqual(endpoint._backlog, BACKLOG, description)

    def test_chosen_queues_and_systemd_sockets_are_kept(self) -> None:
        for description in ("tcp:8080:backlog=10", "systemd:domain=INET:name=fjmcp"):
            self.assertEqual(with_backlog(description), description)
