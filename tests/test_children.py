"""
Child processes: JSON-RPC line framing, the exact environment a child gets,
and the polite-then-firm stop sequence.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import error, reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from fjmcp.logs import Redactor
from fjmcp.mcp.children import (
    STDERR_BURST,
    STDERR_WINDOW,
    ChildSupervisor,
    JSONRPCChildProtocol,
    StderrLog,
    child_environment,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def collecting(
    max_line: int = 1 << 20,
) -> tuple[JSONRPCChildProtocol, list[Any], list[str], list[str]]:
    messages: list[Any] = []
    errors: list[str] = []
    stderr: list[str] = []
    proto = JSONRPCChildProtocol(
        messages.append, on_stderr=stderr.append, on_protocol_error=errors.append, max_line=max_line
    )
    return proto, messages, errors, stderr


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return pieces


class FramingTests(SynchronousTestCase):
    @given(st.lists(json_values, max_size=10), st.lists(st.integers(0, 10_000), max_size=20))
    def test_any_chunking(self, values: list[Any], cuts: list[int]) -> None:
        """
        However the pipe splits the bytes, the same messages come out in order.
        """
        proto, messages, errors, _ = collecting()
        data = b"".join(json.dumps(v).encode() + b"\n" for v in values)
        for piece in chunked(data, cuts):
            proto.outReceived(piece)
        self.assertEqual(messages, values)
        self.assertEqual(errors, [])

    def test_long_line_is_an_error_and_the_stream_recovers(self) -> None:
        proto, messages, errors, _ = collecting(max_line=100)
        proto.outReceived(b'{"a": "' + b"x" * 150)
        proto.outReceived(b"x" * 500)
        proto.outReceived(b'"}\n{"ok": 1}\n')
        self.assertEqual(messages, [{"ok": 1}])
        self.assertEqual(len(errors), 1)
        self.assertIn("longer than 100 bytes", errors[0])

    def test_not_json(self) -> None:
        proto, messages, errors, _ = collecting()
        proto.outReceived(b"hello\n\n  \n[1]\n")
        self.assertEqual(messages, [[1]])
        self.assertEqual(len(errors), 1)
        self.assertTrue(errors[0].startswith("child wrote a line that is not usable JSON"))

    def test_json_no_client_could_read(self) -> None:
        """
        NaN, numbers beyond a float, invalid UTF-8 and lone surrogates are
        JSON to Python's decoder but nothing a client can take: refused
        like any other bad line, so they never reach a client's answer.
        """
        for line in (
            b'{"id": 1, "result": NaN}',
            b'{"id": 1, "result": 1e999}',
            b'{"id": 1, "result": "\xff"}',
            b'{"id": 1, "result": "\\ud800"}',
        ):
            proto, messages, errors, _ = collecting()
            proto.outReceived(line + b"\n")
            self.assertEqual((messages, len(errors)), ([], 1), line)

    def test_stderr_lines(self) -> None:
        proto, _, _, stderr = collecting()
        proto.errReceived(b"one\ntw")
        proto.errReceived(b"o\r\n")
        proto.errReceived(b"z" * 20_000)
        self.assertEqual(stderr[:2], ["one", "two"])
        self.assertEqual(len(stderr), 3)
        self.assertLessEqual(len(stderr[2]), 8192)

    def test_send_frames_one_line(self) -> None:
        from twisted.internet.testing import StringTransport

        proto, _, _, _ = collecting()
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.send({"jsonrpc": "2.0", "method": "x", "params": {"text": "a\nb"}})
        written = transport.value()
        self.assertEqual(written.count(b"\n"), 1)
        self.assertTrue(written.endswith(b"\n"))
        self.assertEqual(json.loads(written)["params"]["text"], "a\nb")


class FakeProcess:
    """
    The bits of an IProcessTransport the stop sequence uses.
    """

    pid = 4242

    def __init__(self) -> None:
        self.signals: list[str] = []
        self.stdin_closed = False
        self.ended = False

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def signalProcess(self, name: str) -> None:
        if self.ended:
            raise error.ProcessExitedAlready()
        self.signals.append(name)

    def write(self, data: bytes) -> None:
        pass


class FakeSpawningReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[tuple[Any, FakeProcess, list[str], dict[str, str]]] = []

    def spawnProcess(self, protocol, executable, args, env=None, **kw):
        process = FakeProcess()
        protocol.makeConnection(process)
        self.spawned.append((protocol, process, args, env))
        return process


def end(protocol: JSONRPCChildProtocol, process: FakeProcess, signal: int | None = None) -> None:
    process.ended = True
    if signal is None:
        reason = Failure(error.ProcessDone(0))
    else:
        reason = Failure(error.ProcessTerminated(None, signal))
    protocol.processEnded(reason)


class StopSequenceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeSpawningReactor()
        self.supervisor = ChildSupervisor(self.reactor, stdin_grace=1.0, term_grace=2.0)
        self.supervisor.startService()

    def spawn(self) -> tuple[Any, JSONRPCChildProtocol, FakeProcess]:
        proto = JSONRPCChildProtocol(lambda m: None)
        child = self.supervisor.spawn("/bin/forgejo-mcp", ["--transport", "stdio"], {}, proto, "s1")
        _, process, args, _ = self.reactor.spawned[-1]
        self.assertEqual(args, ["/bin/forgejo-mcp", "--transport", "stdio"])
        return child, proto, process

    def test_exits_on_eof(self) -> None:
        """
        A child that exits when its stdin closes gets no signal at all.
        """
        child, proto, process = self.spawn()
        d = child.stop(1.0, 2.0)
        self.assertTrue(process.stdin_closed)
        self.assertNoResult(d)
        self.reactor.advance(0.5)
        end(proto, process)
        self.assertEqual(self.successResultOf(d).code, 0)
        self.reactor.advance(10)
        self.assertEqual(process.signals, [])
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_term_then_kill(self) -> None:
        child, proto, process = self.spawn()
        d = child.stop(1.0, 2.0)
        self.reactor.advance(1.0)
        self.assertEqual(process.signals, ["TERM"])
        self.reactor.advance(1.9)
        self.assertEqual(process.signals, ["TERM"])
        self.reactor.advance(0.1)
        self.assertEqual(process.signals, ["TERM", "KILL"])
        end(proto, process, signal=9)
        self.assertEqual(self.successResultOf(d).reason, "killed by signal 9")

    def test_stop_twice(self) -> None:
        child, proto, process = self.spawn()
        d1, d2 = child.stop(), child.stop()
        end(proto, process)
        self.assertEqual(self.successResultOf(d1), self.successResultOf(d2))
        self.assertEqual(self.successResultOf(child.stop()).code, 0)

    def test_supervisor_stops_everyone(self) -> None:
        children = [self.spawn() for _ in range(3)]
        self.assertEqual(len(self.supervisor), 3)
        d = self.supervisor.stopService()
        self.assertTrue(all(p.stdin_closed for _, _, p in children))
        self.assertNoResult(d)
        end(children[0][1], children[0][2])
        self.reactor.advance(3.0)
        for _, proto, process in children[1:]:
            self.assertEqual(process.signals, ["TERM", "KILL"])
            end(proto, process, signal=9)
        self.successResultOf(d)
        self.assertEqual(len(self.supervisor), 0)

    def test_no_spawn_when_stopped(self) -> None:
        self.supervisor.stopService()
        self.assertRaises(RuntimeError, self.spawn)


ECHO_CHILD = textwrap.dedent(
    """
    import json, os, signal, sys
    if "--ignore-term" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(json.dumps({"env": dict(os.environ)}), flush=True)
    for line in sys.stdin:
        msg = json.loads(line)
        print(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": msg["params"]}), flush=True)
    if "--linger" in sys.argv:
        import time
        while True:
            time.sleep(1)
    """
)


class RealProcessTests(TestCase):
    def spawn(self, *flags: str) -> tuple[Any, list[Any], Deferred[None]]:
        supervisor = ChildSupervisor(reactor, stdin_grace=0.5, term_grace=0.5)
        supervisor.startService()
        self.addCleanup(supervisor.stopService)
        messages: list[Any] = []
        first: Deferred[None] = Deferred()

        def on_message(m: Any) -> None:
            messages.append(m)
            if len(messages) == 1:
                first.callback(None)

        env = child_environment("http://127.0.0.1:1", "secret-token-value")
        env["PYTHONPATH"] = os.pathsep.join(sys.path)
        proto = JSONRPCChildProtocol(on_message)
        child = supervisor.spawn(sys.executable, ["-c", ECHO_CHILD, *flags], env, proto, "test")
        return child, messages, first

    async def test_environment_is_exactly_what_was_given(self) -> None:
        """
        Nothing of the broker's environment (its secrets included) reaches
        the child.
        """
        os.environ["FJMCP_FORGEJO_CLIENT_SECRET"] = "must-not-leak"
        self.addCleanup(os.environ.pop, "FJMCP_FORGEJO_CLIENT_SECRET")
        child, messages, first = self.spawn()
        await first
        env = messages[0]["env"]
        env.pop("PYTHONPATH")
        # Python itself may add LC_CTYPE when coercing the C locale.
        env.pop("LC_CTYPE", None)
        self.assertEqual(
            set(env),
            {"FORGEJO_URL", "FORGEJO_ACCESS_TOKEN", "FORGEJO_USER_AGENT", "PATH", "LANG", "LC_ALL"},
        )
        self.assertEqual(env["FORGEJO_ACCESS_TOKEN"], "secret-token-value")
        exit = await child.stop()
        self.assertEqual(exit.code, 0)

    async def test_roundtrip_and_eof_exit(self) -> None:
        child, messages, first = self.spawn()
        await first
        done: Deferred[None] = Deferred()
        child.protocol._on_message = lambda m: (messages.append(m), done.callback(None))
        child.send({"jsonrpc": "2.0", "id": 1, "method": "echo", "params": {"x": "é\n"}})
        await done
        self.assertEqual(messages[-1]["result"], {"x": "é\n"})
        exit = await child.stop()
        self.assertEqual((exit.code, exit.signal), (0, None))

    async def test_children_do_not_preempt_the_broker(self) -> None:
        """
        Children run under SCHED_BATCH (woken by the broker's write, they
        wait for its time slice); the broker's own thread keeps its policy.
        """
        if not hasattr(os, "SCHED_BATCH"):
            raise SkipTest("no SCHED_BATCH on this platform")
        before = os.sched_getscheduler(0)
        child, _, first = self.spawn()
        await first
        self.assertEqual(os.sched_getscheduler(child.pid), os.SCHED_BATCH)
        self.assertEqual(os.sched_getscheduler(0), before)
        await child.stop()

    async def test_stubborn_child_is_killed(self) -> None:
        """
        A child that ignores stdin EOF and SIGTERM is SIGKILLed after the
        grace periods, and stop() reports it.
        """
        child, _, first = self.spawn("--ignore-term", "--linger")
        await first
        exit = await child.stop(0.2, 0.3)
        self.assertEqual(exit.signal, 9)


class StderrLogTests(SynchronousTestCase):
    """
    A child's stderr in the broker's log: at forgejo-mcp's own level (its
    INFO chatter, repeated at every wake of a hibernating session, is
    debug), the token scrubbed, bursts cut short.
    """

    def setUp(self) -> None:
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.clock = Clock()
        self.log = StderrLog(self.clock, "session-id", "alice", Redactor(["gto_secret"]))

    def logged(self) -> list[tuple[LogLevel, str]]:
        return [
            (e["log_level"], e.get("line", ""))
            for e in self.events
            if e.get("log_namespace") == "fjmcp.child"
        ]

    def test_levels(self) -> None:
        self.log("2026-12-03 10:29:17\tINFO\tcmd/cmd.go:240\tStarting Forgejo MCP Server")
        self.log("2026-12-03 10:29:17\tWARN\tforgejo/forgejo.go:80\tslow")
        self.log("2026-12-03 10:29:17\tERROR\tforgejo/forgejo.go:80\ttoken gto_secret refused")
        self.log("panic: something else entirely")
        levels = [level for level, _ in self.logged()]
        self.assertEqual(levels, [LogLevel.debug, LogLevel.warn, LogLevel.error, LogLevel.info])
        self.assertNotIn("gto_secret", repr(self.events))

    def test_bursts_are_cut_short(self) -> None:
        for n in range(STDERR_BURST + 5):
            self.log(f"line {n}")
        self.assertEqual(len(self.logged()), STDERR_BURST)
        self.clock.advance(STDERR_WINDOW)
        self.log("after")
        suppressed = [e["n"] for e in self.events if "suppressed" in e.get("log_format", "")]
        self.assertEqual(suppressed, [5])
        self.assertEqual(self.logged()[-1][1], "after")
