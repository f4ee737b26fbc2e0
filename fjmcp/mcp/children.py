"""
Child processes: spawning C{forgejo-mcp} with exactly the environment it
needs, newline-delimited JSON-RPC framing over its stdio, and stopping it
politely first (stdin closed), then firmly (SIGTERM), then for good (SIGKILL).

Nothing here knows about HTTP or MCP sessions; the session bridge hands
messages in and gets messages, stderr lines and the exit out.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import attrs
from twisted.application.service import Service
from twisted.internet import error
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import (
    IDelayedCall,
    IProcessTransport,
    IReactorProcess,
    IReactorTime,
)
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from fjmcp import __version__, metrics, safejson
from fjmcp.logs import Redactor

# forgejo-mcp answers with whole tool results on one line; lists of issues or
# file contents can be large, so the limit is generous but still bounded.
DEFAULT_MAX_LINE = 16 * 1024 * 1024
MAX_STDERR_LINE = 8 * 1024
# Tool results carry Forgejo's JSON, which nests a few levels; the child is
# trusted further than clients, but nothing may nest without bound.
CHILD_MAX_DEPTH = 512
CHILD_PATH = "/usr/local/bin:/usr/bin:/bin"

log = Logger()


def child_environment(forgejo_url: str, access_token: str) -> dict[str, str]:
    """
    The whole environment of a forgejo-mcp child: where Forgejo is, this
    user's token, and nothing inherited from the broker (which holds the
    client secret and the encryption key).
    """
    return {
        "FORGEJO_URL": forgejo_url,
        "FORGEJO_ACCESS_TOKEN": access_token,
        "FORGEJO_USER_AGENT": f"fjmcp/{__version__} forgejo-mcp",
        "PATH": CHILD_PATH,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
    }


@attrs.frozen
class ChildExit:
    """
    How a child ended: an exit code, or the signal that killed it.
    """

    code: int | None
    signal: int | None

    @property
    def reason(self) -> str:
        if self.signal is not None:
            return f"killed by signal {self.signal}"
        return f"exited with status {self.code}"


class JSONRPCChildProtocol(ProcessProtocol):
    """
    Frames JSON-RPC messages on a child's stdio: one JSON value per line in
    both directions, stderr split into lines for logging.

    An over-long or unparseable stdout line is reported through
    C{on_protocol_error}; what that means for the session is the caller's
    decision, so one bad line never takes down the daemon.
    """

    def __init__(
        self,
        on_message: Callable[[Any], None],
        on_stderr: Callable[[str], None] = lambda line: None,
        on_protocol_error: Callable[[str], None] = lambda problem: None,
        max_line: int = DEFAULT_MAX_LINE,
    ) -> None:
        self._on_message = on_message
        self._on_stderr = on_stderr
        self._on_protocol_error = on_protocol_error
        self._max_line = max_line
        self._out = bytearray()
        self._err = bytearray()
        self._discarding = False
        self.exited: Deferred[ChildExit] = Deferred()
        self.exit: ChildExit | None = None

    def send(self, message: Any) -> None:
        """
        Write one message to the child's stdin.
        """
        if self.transport is None or self.exit is not None:
            raise error.ProcessDone(None)
        self.transport.write(safejson.dumps(message) + b"\n")

    def outReceived(self, data: bytes) -> None:
        self._out += data
        while True:
            newline = self._out.find(b"\n")
            if newline < 0:
                if len(self._out) > self._max_line:
                    # Drop the rest of this line as it arrives instead of
                    # buffering an unbounded amount of it.
                    self._out.clear()
                    if not self._discarding:
                        self._discarding = True
                        self._on_protocol_error(
                            f"child wrote a line longer than {self._max_line} bytes"
                        )
                return
            line = bytes(self._out[:newline])
            del self._out[: newline + 1]
            if self._discarding:
                self._discarding = False
                continue
            self._line(line)

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        if len(line) > self._max_line:
            self._on_protocol_error(f"child wrote a line longer than {self._max_line} bytes")
            return
        try:
            message = safejson.loads(line, max_depth=CHILD_MAX_DEPTH)
        except safejson.JSONInputError as e:
            self._on_protocol_error(f"child wrote a line that is not usable JSON ({e})")
            return
        self._on_message(message)

    def errReceived(self, data: bytes) -> None:
        self._err += data
        while (newline := self._err.find(b"\n")) >= 0:
            line = bytes(self._err[:newline])
            del self._err[: newline + 1]
            self._on_stderr(line[:MAX_STDERR_LINE].decode("utf-8", "replace").rstrip())
        if len(self._err) > MAX_STDERR_LINE:
            self._on_stderr(bytes(self._err[:MAX_STDERR_LINE]).decode("utf-8", "replace"))
            self._err.clear()

    def processEnded(self, reason: Failure) -> None:
        value = reason.value
        self.exit = ChildExit(
            code=getattr(value, "exitCode", None), signal=getattr(value, "signal", None)
        )
        self.exited.callback(self.exit)


class Child:
    """
    One running child process and the way to end it.
    """

    def __init__(
        self,
        reactor: IReactorTime,
        transport: IProcessTransport,
        protocol: JSONRPCChildProtocol,
        name: str,
        stdin_grace: float = 1.0,
        term_grace: float = 2.0,
    ) -> None:
        self._reactor = reactor
        self.transport = transport
        self.protocol = protocol
        self.name = name
        # The transport forgets its pid once the process is reaped.
        self._pid = transport.pid
        self._stdin_grace = stdin_grace
        self._term_grace = term_grace
        self._stopping: Deferred[ChildExit] | None = None
        self._pausers: set[object] = set()

    @property
    def pid(self) -> int | None:
        return self._pid

    def send(self, message: Any) -> None:
        self.protocol.send(message)

    def pause_reading(self, who: object) -> None:
        """
        Stop reading the child's output while any reader is behind: the
        child then blocks on its own writes, and nothing piles up here.
        """
        if not self._pausers and self.protocol.exit is None:
            # POSIX process transports can pause their readers, though
            # IProcessTransport does not say so.
            cast(Any, self.transport).pauseProducing()
        self._pausers.add(who)

    def resume_reading(self, who: object) -> None:
        if who not in self._pausers:
            return
        self._pausers.discard(who)
        if not self._pausers and self.protocol.exit is None:
            cast(Any, self.transport).resumeProducing()

    @property
    def reading_paused(self) -> bool:
        return bool(self._pausers)

    def stop(
        self, stdin_grace: float | None = None, term_grace: float | None = None
    ) -> Deferred[ChildExit]:
        """
        End the child: close its stdin (forgejo-mcp exits on EOF), SIGTERM it
        if it is still there after C{stdin_grace} seconds, SIGKILL it after
        C{term_grace} more (by default the grace periods it was started
        with).  Fires with how it ended; safe to call twice.
        """
        if stdin_grace is None:
            stdin_grace = self._stdin_grace
        if term_grace is None:
            term_grace = self._term_grace
        if self.protocol.exit is not None:
            return succeed(self.protocol.exit)
        if self._stopping is not None:
            return _chain(self._stopping)
        timers: list[IDelayedCall] = []

        def signal(name: str) -> None:
            try:
                self.transport.signalProcess(name)
            except error.ProcessExitedAlready:
                pass
            else:
                log.info("sent SIG{sig} to child {name}", sig=name, name=self.name)

        def cancel_timers(result: ChildExit) -> ChildExit:
            for t in timers:
                if t.active():
                    t.cancel()
            return result

        self._stopping = self.protocol.exited
        self._stopping.addBoth(cancel_timers)
        timers.append(self._reactor.callLater(stdin_grace, signal, "TERM"))
        timers.append(self._reactor.callLater(stdin_grace + term_grace, signal, "KILL"))
        self.transport.closeStdin()
        return _chain(self._stopping)


def _chain(d: Deferred[ChildExit]) -> Deferred[ChildExit]:
    """
    A new Deferred that fires with C{d}'s result, leaving C{d} untouched.
    """
    out: Deferred[ChildExit] = Deferred()

    def relay(result: ChildExit) -> ChildExit:
        out.callback(result)
        return result

    d.addCallback(relay)
    return out


@contextlib.contextmanager
def batch_scheduled() -> Iterator[None]:
    """
    Processes spawned inside run under Linux's C{SCHED_BATCH}: a child
    woken by a line on its stdin then no longer preempts the broker in the
    middle of its write, so the one reactor thread serving every session
    keeps the CPU it has (docs/benchmarks.md).  The calling thread's own
    policy is set for the spawn only (the child inherits it at exec, with
    every thread it starts later) and restored after.  Elsewhere, or where
    the policy cannot be changed, a no-op.
    """
    if not hasattr(os, "SCHED_BATCH"):
        yield
        return
    try:
        policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    except OSError:
        yield
        return
    try:
        yield
    finally:
        # Back to the policy it had, which needs no privilege either.
        os.sched_setscheduler(0, policy, param)


class ChildSupervisor(Service):
    """
    Starts children and ends every one of them when the service stops.

    @param reactor: times the children's stops (L{IReactorTime}) and spawns
        them: it must be an L{IReactorProcess} too.  Typed by the first
        because the tests' spawning clocks implement C{spawnProcess}
        without declaring the interface, so the second is a cast, not an
        adaptation.
    """

    name = "children"

    def __init__(
        self, reactor: IReactorTime, stdin_grace: float = 1.0, term_grace: float = 2.0
    ) -> None:
        self._reactor = reactor
        self._stdin_grace = stdin_grace
        self._term_grace = term_grace
        self._children: set[Child] = set()

    def __len__(self) -> int:
        return len(self._children)

    def spawn(
        self,
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str],
        protocol: JSONRPCChildProtocol,
        name: str,
    ) -> Child:
        """
        Start C{executable} with exactly C{env}.  Raises C{OSError} (for
        example EAGAIN from fork) to the caller, which owns the error answer.
        """
        if not self.running:
            raise RuntimeError("the child supervisor is not running")
        with batch_scheduled():
            transport = cast(IReactorProcess, self._reactor).spawnProcess(
                protocol, executable, [executable, *args], env=dict(env)
            )
        # Whoever ends this child (its session, most often) gives it the
        # supervisor's grace periods.
        child = Child(self._reactor, transport, protocol, name, self._stdin_grace, self._term_grace)
        self._children.add(child)

        def forget(result: ChildExit) -> ChildExit:
            self._children.discard(child)
            metrics.child_exited(result.code, result.signal)
            log.info(
                "child {name} (pid {pid}) {reason}",
                name=name,
                pid=child.pid,
                reason=result.reason,
            )
            return result

        protocol.exited.addCallback(forget)
        return child

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        stops = [c.stop(self._stdin_grace, self._term_grace) for c in list(self._children)]
        return DeferredList(stops, consumeErrors=True)


# forgejo-mcp colours its log levels; a log file wants plain text.
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
STDERR_BURST = 20
STDERR_WINDOW = 10.0
child_log = Logger(namespace="fjmcp.child")


# forgejo-mcp logs "<time>\t<LEVEL>\t<caller>\t<message>"; its own INFO
# lines (a dozen at every start, and a hibernating session starts a child on
# every wake) are the broker's debug, its warnings and errors stay visible.
_LEVELS = {
    "DEBUG": LogLevel.debug,
    "INFO": LogLevel.debug,
    "WARN": LogLevel.warn,
    "WARNING": LogLevel.warn,
    "ERROR": LogLevel.error,
    "DPANIC": LogLevel.error,
    "PANIC": LogLevel.error,
    "FATAL": LogLevel.error,
}


def stderr_level(line: str) -> LogLevel:
    """
    The level to log a child's stderr line at: forgejo-mcp's own, one step
    down for its INFO; C{info} for a line it did not format.
    """
    fields = line.split("\t", 2)
    if len(fields) >= 2:
        return _LEVELS.get(fields[1].strip().upper(), LogLevel.info)
    return LogLevel.info


class StderrLog:
    """
    A child's stderr, logged with its session and user, secrets scrubbed,
    at its own level (L{stderr_level}), at most C{STDERR_BURST} lines per
    C{STDERR_WINDOW} seconds.
    """

    def __init__(self, clock: IReactorTime, session_id: str, user: str, redact: Redactor) -> None:
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
        plain = _ANSI.sub("", line)
        child_log.emit(
            stderr_level(plain),
            "session {session} ({user}): {line}",
            session=self._session,
            user=self._user,
            line=self._redact(plain),
        )
