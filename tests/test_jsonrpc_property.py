"""
Generated JSON-RPC thrown at C{/mcp} (issue 10: every request ends).

Valid requests, notifications and responses, invalid messages (wrong
C{jsonrpc}, a C{method} that is not a string, ids of every JSON type),
batches mixing all of them, and bodies that are not JSON the broker accepts
(NaN, 1e999, lone surrogates, deep nesting, bytes that are not UTF-8) go
through the real L{MCPEndpoint}, L{SessionManager}, L{SessionRouter} and
L{JSONRPCChildProtocol} to an in-process child that answers like
forgejo-mcp.  Everything runs on a L{Clock}, so a whole exchange (deadline
included) takes no real time and hypothesis can drive it synchronously.

What must hold for every HTTP request:

  - it gets exactly one complete answer (or, when its client went away,
    nothing more from then on), never a 500, with the status the body
    calls for;
  - every JSON-RPC request in it (a valid id and a method) is answered
    exactly once under its own id, as JSON or as an SSE event, within the
    deadline; a refused message carries its id, or null when its id is not
    a valid one;
  - the child receives each message the broker accepted once, and nothing
    the broker refused; it never gets a line it cannot parse.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import attrs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http_headers import Headers
from zope.interface import implementer

from fjmcp.http.streamable import MCPEndpoint
from fjmcp.mcp import resources
from fjmcp.mcp.children import ChildSupervisor
from fjmcp.mcp.session import Session
from fjmcp.mcp.sessions import SessionManager
from fjmcp.safejson import MAX_DEPTH

TIMEOUT = 5.0
MAX_BODY = 16 * 1024
MAX_EXCHANGES = 2
KEEPALIVE = 2.0
USER = 7
SUPPORTED = ("2025-03-26", "2025-06-18", "2025-11-25")
# Every generated message that is a JSON object carries its number here, so
# the child's side can tell which one reached it.  The broker passes
# members it does not know through unchanged.
SERIAL = "x-serial"

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
SERVER_ERROR = -32000
SESSION_NOT_FOUND = -32001
TIMED_OUT = "the request timed out"
DISCONNECTED = "the client disconnected"


def valid_id(value: Any) -> bool:
    """
    What MCP allows as a request id: a string or an integer, not a boolean.
    """
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def canonical(value: Any) -> str:
    """
    JSON equality that tells C{1}, C{1.0}, C{True} and C{"1"} apart.
    """
    return json.dumps(value, sort_keys=True)


# --- the child


class ScriptedChild:
    """
    forgejo-mcp as far as the broker can tell, in-process on the fake clock:
    its IProcessTransport (stdin, signals, pausing) and what it writes.

    It answers C{initialize}, C{tools/list} and C{ping}; of the tools,
    C{echo} at once, C{slow} after C{arguments.seconds} (with a progress
    notification first when asked for progress), C{never} never, any other
    with an error; other methods with "method not found".  A line it cannot
    parse gets C{"id": null} and -32700, as forgejo-mcp answers.  Each
    answer names the message it answers (C{_serial}), so the test can tell
    which request an answer reached.  It writes in random pieces, as a pipe
    delivers.  Behaviour C{log-on-initialize}: a log notification before
    the answer to C{initialize}.
    """

    def __init__(
        self,
        reactor: Clock,
        protocol: Any,
        rng: random.Random,
        pid: int,
        behaviours: frozenset[str] = frozenset(),
    ) -> None:
        self._reactor = reactor
        self._protocol = protocol
        self._rng = rng
        self.pid = pid
        self.behaviours = behaviours
        self._stdin = bytearray()
        self.lines: list[bytes] = []
        # Every message read from stdin, in order.
        self.received: list[dict[str, Any]] = []
        self.unparseable: list[bytes] = []
        self.writes_after_stdin_closed = 0
        self.signals: list[str] = []
        self.stdin_closed = False
        self.ended = False
        self.paused = False
        self._held = bytearray()
        self._timers: list[IDelayedCall] = []

    # IProcessTransport, as far as the broker uses it.

    def write(self, data: bytes) -> None:
        if self.stdin_closed or self.ended:
            self.writes_after_stdin_closed += 1
            return
        self._stdin += data
        while (newline := self._stdin.find(b"\n")) >= 0:
            line = bytes(self._stdin[:newline])
            del self._stdin[: newline + 1]
            self._line(line)

    def writeSequence(self, data: list[bytes]) -> None:
        for chunk in data:
            self.write(chunk)

    def closeStdin(self) -> None:
        # forgejo-mcp exits when its stdin ends.
        if not self.stdin_closed:
            self.stdin_closed = True
            self._reactor.callLater(0, self._exit, None)

    def closeStdout(self) -> None:
        pass

    def closeStderr(self) -> None:
        pass

    def closeChildFD(self, fd: int) -> None:
        pass

    def signalProcess(self, name: str) -> None:
        if self.ended:
            raise error.ProcessExitedAlready()
        self.signals.append(name)
        self._reactor.callLater(0, self._exit, {"TERM": 15, "KILL": 9}.get(name, 9))

    def loseConnection(self) -> None:
        self.closeStdin()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        held, self._held = bytes(self._held), bytearray()
        self._deliver(held)

    def stopProducing(self) -> None:
        self.loseConnection()

    def _exit(self, signal: int | None) -> None:
        if self.ended:
            return
        self.ended = True
        for timer in self._timers:
            if timer.active():
                timer.cancel()
        reason = error.ProcessDone(0) if signal is None else error.ProcessTerminated(None, signal)
        self._protocol.processEnded(Failure(reason))

    # Its stdout.

    def _say(self, message: dict[str, Any]) -> None:
        if self.ended:
            return
        data = (json.dumps(message) + "\n").encode()
        if self.paused:
            self._held += data
        else:
            self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        while data and not self.ended:
            cut = self._rng.randint(1, len(data))
            piece, data = data[:cut], data[cut:]
            self._protocol.childDataReceived(1, piece)

    def _later(self, seconds: float, message: dict[str, Any]) -> None:
        self._timers = [t for t in self._timers if t.active()]
        self._timers.append(self._reactor.callLater(seconds, self._say, message))

    # What it does with what it reads.

    def _line(self, line: bytes) -> None:
        self.lines.append(line)
        try:
            message = json.loads(line.decode("utf-8"), parse_constant=_not_a_number)
        except ValueError:
            message = None
        if (
            not isinstance(message, dict)
            or message.get("jsonrpc") != "2.0"
            or not isinstance(message.get("method", ""), str)
        ):
            # What forgejo-mcp cannot read into a JSON-RPC message.
            self.unparseable.append(line)
            self._later(
                0,
                {"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "Parse error"}},
            )
            return
        self.received.append(message)
        method, id = message.get("method"), message.get("id")
        if method is None or id is None:
            # A response, or a notification: nothing to answer.
            return
        self._request(id, method, message.get("params"), message.get(SERIAL))

    def _request(self, id: Any, method: str, params: Any, serial: Any) -> None:
        def result(value: dict[str, Any], seconds: float = 0) -> None:
            self._later(
                seconds, {"jsonrpc": "2.0", "id": id, "result": {**value, "_serial": serial}}
            )

        def refuse(code: int, text: str) -> None:
            self._later(
                0,
                {
                    "jsonrpc": "2.0",
                    "id": id,
                    "error": {"code": code, "message": text, "data": {"serial": serial}},
                },
            )

        if "log-on-initialize" in self.behaviours and method == "initialize":
            self._say(
                {
                    "jsonrpc": "2.0",
                    "method": "notifications/message",
                    "params": {"level": "info", "data": "starting"},
                }
            )
        if method == "initialize":
            asked = params.get("protocolVersion") if isinstance(params, dict) else None
            result(
                {
                    "protocolVersion": asked if asked in SUPPORTED else "2025-06-18",
                    "capabilities": {"tools": {}},
                    "serverInfo": {"name": "scripted", "version": "1"},
                }
            )
        elif method == "tools/list":
            result({"tools": [{"name": n} for n in ("echo", "slow", "never")]})
        elif method == "ping":
            result({})
        elif method != "tools/call":
            refuse(-32601, "Method not found")
        elif not isinstance(params, dict):
            refuse(-32602, "Invalid params")
        else:
            name, args = params.get("name"), params.get("arguments")
            meta = params.get("_meta")
            token = meta.get("progressToken") if isinstance(meta, dict) else None
            if name == "echo":
                result({"content": [{"type": "text", "text": json.dumps(args)}]})
            elif name == "slow":
                seconds = args.get("seconds") if isinstance(args, dict) else None
                if not isinstance(seconds, int | float) or isinstance(seconds, bool):
                    seconds = 1
                if token is not None:
                    self._later(
                        0,
                        {
                            "jsonrpc": "2.0",
                            "method": "notifications/progress",
                            "params": {"progressToken": token, "progress": 1, "total": 2},
                        },
                    )
                result({"content": [{"type": "text", "text": "done"}]}, seconds)
            elif name == "never":
                return
            else:
                refuse(-32602, f"unknown tool {name!r}")


def _not_a_number(name: str) -> Any:
    raise ValueError(name)


class FakeProcessReactor(Clock):
    """
    A clock that also spawns L{ScriptedChild}ren.
    """

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng
        self.behaviours: frozenset[str] = frozenset()
        self.children: list[ScriptedChild] = []

    def spawnProcess(
        self, protocol: Any, executable: str, args: Any = (), env: Any = None, **kw: Any
    ) -> ScriptedChild:
        child = ScriptedChild(self, protocol, self.rng, 4000 + len(self.children), self.behaviours)
        self.children.append(child)
        protocol.makeConnection(child)
        return child


# --- HTTP


class FakeRequest:
    """
    The parts of a twisted.web Request that L{MCPEndpoint} uses, recording
    what a client would see and every misuse Twisted would refuse (or
    silently ignore, like a header set after the body started).
    """

    def __init__(self, clock: Clock, body: bytes, headers: dict[bytes, bytes]) -> None:
        self._clock = clock
        self.content = io.BytesIO(body)
        self._headers = {k.lower(): v for k, v in headers.items()}
        self.requestHeaders = Headers({k: [v] for k, v in self._headers.items()})
        self.method = b"POST"
        self.code = 200
        self.responseHeaders = Headers()
        self.startedWriting = 0
        # The headers as they went out with the first byte of the body.
        self.sent_headers: dict[bytes, bytes] | None = None
        self.defaultContentType: bytes | None = b"text/html"
        self.body = bytearray()
        self.finished = 0
        self.finished_at: float | None = None
        self.producer: Any = None
        self.gone = False
        self.problems: list[str] = []

    def getHeader(self, name: bytes) -> bytes | None:
        return self._headers.get(name.lower())

    def setHeader(self, name: bytes, value: bytes) -> None:
        if self.startedWriting and self.finished == 0 and not self.gone:
            self.problems.append(f"header {name!r} set after the response started: it is lost")
        self.responseHeaders.setRawHeaders(name, [value])

    def _start(self) -> None:
        if not self.startedWriting:
            self.startedWriting = 1
            self.sent_headers = {
                name.lower(): values[-1] for name, values in self.responseHeaders.getAllRawHeaders()
            }

    def setResponseCode(self, code: int) -> None:
        if self.startedWriting:
            self.problems.append(f"status {code} set after the response started")
        self.code = code

    def write(self, data: bytes) -> None:
        if self.finished:
            self.problems.append("write after finish")
            raise RuntimeError("Request.write called on a request after Request.finish was called.")
        if self.gone:
            self.problems.append("write after the client went away")
            return
        self._start()
        self.body += data

    def finish(self) -> None:
        if self.finished:
            self.problems.append("finished twice")
            raise RuntimeError("Request.finish called twice")
        if self.gone:
            self.problems.append("finished after the client went away")
            raise RuntimeError("Request.finish called after the connection was lost")
        self._start()
        if self.producer is not None:
            self.problems.append("finished with a producer registered")
        self.finished += 1
        self.finished_at = self._clock.seconds()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.producer is not None:
            self.problems.append("a second producer registered")
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def content_type(self) -> bytes | None:
        """
        The content type the client saw (or would see, if nothing went out
        yet).
        """
        if self.sent_headers is not None:
            return self.sent_headers.get(b"content-type")
        return self.responseHeaders.getRawHeaders(b"content-type", [None])[-1]


def sse_events(body: bytes) -> list[dict[str, Any]]:
    """
    The data of each event of a text/event-stream body, parsed as JSON; the
    stream must end with a complete event.
    """
    text = body.decode("utf-8")
    assert text.endswith("\n\n"), text[-80:]
    events: list[dict[str, Any]] = []
    data: list[str] = []
    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if line == "":
            if data:
                events.append(json.loads("\n".join(data)))
                data = []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                data.append(value)
            else:
                assert field == "event" and value == "message", line
    assert not data
    return events


@attrs.define
class Exchange:
    """
    One HTTP POST: what was sent, what the test expects, what came back.
    """

    request: FakeRequest
    deferred: Deferred[Any]
    posted_at: float
    body: Any = None
    prediction: Prediction | None = None
    failure: Failure | None = None
    gone_at: float | None = None

    def answers(self) -> list[dict[str, Any]]:
        """
        The JSON-RPC messages of the answer, in order (one for JSON).
        """
        body = bytes(self.request.body)
        if self.request.content_type() == b"text/event-stream":
            return sse_events(body)
        if not body:
            return []
        return [json.loads(body)]


class Users:
    def get_user(self, user_id: int) -> Deferred[Any]:
        return succeed(SimpleNamespace(login=f"user{user_id}"))


def advance(clock: Clock, seconds: float) -> None:
    """
    Let C{seconds} pass, stopping at each timer on the way, so that
    whatever a timer does happens at its own time, not at the end.
    """
    end = clock.seconds() + seconds
    while True:
        due = [c.getTime() for c in clock.getDelayedCalls() if c.getTime() <= end]
        if not due:
            clock.advance(max(0.0, end - clock.seconds()))
            return
        clock.advance(max(0.0, min(due) - clock.seconds()))


class World:
    """
    A broker's MCP side on a fake clock: the endpoint, the session table,
    the supervisor, and a reactor whose processes are L{ScriptedChild}ren.
    """

    def __init__(self, rng: random.Random, behaviours: frozenset[str] = frozenset()) -> None:
        self.reactor = FakeProcessReactor(rng)
        self.reactor.behaviours = behaviours
        self.supervisor = ChildSupervisor(self.reactor, stdin_grace=1.0, term_grace=1.0)
        self.supervisor.startService()
        self.sessions = SessionManager(
            self.reactor,
            self.supervisor,
            "/usr/local/bin/forgejo-mcp",
            "https://forgejo.invalid",
            max_sessions=8,
            max_per_user=4,
            idle_timeout=3600.0,
            request_timeout=TIMEOUT,
            budget=resources.Budget(count=lambda: 0, cap=lambda: 1 << 20),
        )
        self.sessions.startService()
        self.endpoint = MCPEndpoint(
            self.sessions,
            Users(),
            self.reactor,
            max_body=MAX_BODY,
            keepalive=KEEPALIVE,
            max_exchanges_per_user=MAX_EXCHANGES,
        )
        self.exchanges: list[Exchange] = []

    def post(
        self, body: bytes, session_id: str | None = None, version: str | None = None
    ) -> Exchange:
        """
        POST C{body} to /mcp as Klein does: bytes returned are written and
        the request finished; None means the endpoint answered (or will)
        itself, and Klein finishes whatever is still open.
        """
        headers = {b"content-type": b"application/json"}
        if session_id is not None:
            headers[b"mcp-session-id"] = session_id.encode()
        if version is not None:
            headers[b"mcp-protocol-version"] = version.encode()
        request = FakeRequest(self.reactor, body, headers)
        coroutine = self.endpoint.post(
            request,  # type: ignore[arg-type]
            USER,
            "client-1",
            "forgejo-token",
            family_id="grant-1",
        )
        exchange = Exchange(request, Deferred.fromCoroutine(coroutine), self.reactor.seconds())

        def respond(result: Any) -> None:
            if isinstance(result, bytes):
                request.write(result)
            if not request.finished and not request.gone:
                request.finish()

        def failed(failure: Failure) -> None:
            # Klein would answer 500.
            exchange.failure = failure

        exchange.deferred.addCallbacks(respond, failed)
        self.exchanges.append(exchange)
        return exchange

    def go_away(self, exchange: Exchange) -> bool:
        """
        The client disconnects: Klein cancels the handler's Deferred.
        """
        if exchange.deferred.called:
            return False
        exchange.request.gone = True
        exchange.gone_at = self.reactor.seconds()
        exchange.deferred.cancel()
        return True

    def open_session(self, version: str) -> str:
        body = {
            "jsonrpc": "2.0",
            "id": "init",
            "method": "initialize",
            "params": {
                "protocolVersion": version,
                "capabilities": {},
                "clientInfo": {"name": "property", "version": "1"},
            },
            SERIAL: 0,
        }
        exchange = self.post(json.dumps(body).encode())
        advance(self.reactor, 0)
        request = exchange.request
        assert request.finished == 1 and request.code == 200, (request.code, request.body)
        [answer] = exchange.answers()
        assert answer["result"]["protocolVersion"] == version, answer
        assert request.sent_headers is not None
        session_id = request.sent_headers[b"mcp-session-id"].decode()
        note = {"jsonrpc": "2.0", "method": "notifications/initialized", SERIAL: 0}
        assert self.post(json.dumps(note).encode(), session_id).request.code == 202
        return session_id

    def session(self, session_id: str) -> Session:
        [session] = [s for s in self.sessions.of_user(USER) if s.id == session_id]
        return session

    def child_of(self, session: Session) -> ScriptedChild:
        [child] = [c for c in self.reactor.children if c.pid == session.child.pid]
        return child

    def stop(self) -> None:
        self.sessions.stopService()
        self.supervisor.stopService()
        advance(self.reactor, 10)


# --- what is thrown at it


@attrs.frozen
class Msg:
    """
    One JSON-RPC message as generated: its value and what it is meant to be
    (request, initialize, notification, response, invalid).
    """

    value: Any
    intent: str

    @property
    def serial(self) -> int | None:
        return self.value.get(SERIAL) if isinstance(self.value, dict) else None

    @property
    def answer_id(self) -> Any:
        """
        The id an answer to it (or a refusal of it) must carry.
        """
        if isinstance(self.value, dict) and valid_id(self.value.get("id")):
            return self.value["id"]
        return None


@attrs.frozen
class Single:
    msg: Msg


@attrs.frozen
class Batch:
    msgs: tuple[Msg, ...]


@attrs.frozen
class Raw:
    """
    Bytes that are not JSON the broker accepts (why says which rule).
    """

    data: bytes
    why: str


@attrs.frozen
class Step:
    body: Single | Batch | Raw
    layout: tuple[bool, str, str, int]  # ensure_ascii, separators, surrounding space, padding
    target: str  # "A", "B", "stale" or "none"
    version: str | None
    wait: float
    goes_away: bool


ODD_TEXT = [
    "",
    "ünï",
    "\u202e\u2066evil",
    "\u2028\u2029\u0085",
    "\x00\x01\x1f",
    "\ufeff",
    "\uffff\ufffe",
    "\U0010ffff",
    "\U0001f600",
    "\\ud800",
    '"',
    "\\",
    "fjmcp-1",
    "1",
]

odd_text = st.sampled_from(ODD_TEXT) | st.text(st.characters(codec="utf-8"), max_size=6)
# Small pools, so ids clash and cancellations find their request.
pooled_ids = st.sampled_from([0, 1, 2, -1, "a", "b", "1"])
big_ints = st.sampled_from([2**31, 2**53 + 1, 2**63, -(2**63) - 1, 10**40, 2**1000])
valid_ids = pooled_ids | st.integers() | big_ints | odd_text
invalid_ids = st.sampled_from(
    [None, True, False, 1.0, -0.0, 1.5, 1e300, [], [1], {}, {"id": 1}]
) | (st.floats(allow_nan=False, allow_infinity=False))
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | big_ints
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from([5e-324, 1.7976931348623157e308, -0.0])
    | odd_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(odd_text, inner, max_size=3),
    max_leaves=6,
)
tokens = valid_ids | st.sampled_from([None, True, 1.5, [1], {"t": 1}])


def with_meta(params: dict[str, Any], token: Any) -> dict[str, Any]:
    return {**params, "_meta": {"progressToken": token}}


ALL_REQUESTS = [
    "echo",
    "echo",
    "slow",
    "never",
    "other tool",
    "tools/list",
    "ping",
    "method",
    "init",
]


@st.composite
def requests(
    draw: Any, kinds: tuple[str, ...] = tuple(ALL_REQUESTS), in_batch: bool = False
) -> Msg:
    """
    A valid request; with C{kinds}, of those only (C{slow} and C{never}
    hold their exchange open).  Its arguments may nest as deep as the
    broker takes, which is one level less in a batch.
    """
    id = draw(valid_ids)
    what = draw(st.sampled_from(kinds))
    params: Any
    if what == "echo":
        arguments = draw(st.dictionaries(odd_text, json_values))
        if draw(st.integers(0, 9)) == 0:
            # As deep as the broker takes: the call is three levels (four
            # in a batch).
            deep: Any = 1
            for _ in range(draw(st.sampled_from([1, MAX_DEPTH - (4 if in_batch else 3)]))):
                deep = [deep]
            arguments = {"deep": deep}
        params = {"name": "echo", "arguments": arguments}
    elif what == "slow":
        params = {"name": "slow", "arguments": {"seconds": draw(st.sampled_from([1, 3, 8]))}}
    elif what == "never":
        params = {"name": "never", "arguments": {}}
    elif what == "other tool":
        params = {"name": draw(odd_text | st.integers()), "arguments": draw(json_values)}
    elif what == "init":
        params = {"protocolVersion": draw(st.sampled_from(SUPPORTED)), "capabilities": {}}
    else:
        params = draw(
            st.none() | st.just({}) | st.just([]) | st.dictionaries(odd_text, json_values)
        )
    method = {"echo": "tools/call", "slow": "tools/call", "never": "tools/call"}.get(what)
    if method is None:
        method = {"other tool": "tools/call", "init": "initialize", "method": None}.get(what, what)
    if method is None:
        method = draw(odd_text.filter(bool))
    if isinstance(params, dict) and draw(st.booleans()):
        params = with_meta(params, draw(tokens))
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        message["params"] = params
    return Msg(message, "initialize" if method == "initialize" else "request")


@st.composite
def notifications(draw: Any) -> Msg:
    method = draw(
        st.sampled_from(
            [
                "notifications/initialized",
                "notifications/cancelled",
                "notifications/progress",
                "notifications/roots/list_changed",
                "other",
            ]
        )
    )
    params: Any
    if method == "notifications/cancelled":
        params = {"requestId": draw(pooled_ids | valid_ids | invalid_ids), "reason": "gave up"}
    elif method == "notifications/progress":
        params = {"progressToken": draw(tokens), "progress": draw(st.integers(0, 3))}
    else:
        params = draw(st.none() | st.just([]) | st.dictionaries(odd_text, json_values, max_size=2))
        if method == "other":
            method = draw(odd_text.filter(bool))
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        message["params"] = params
    return Msg(message, "notification")


@st.composite
def responses(draw: Any) -> Msg:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": draw(valid_ids | st.just("fjmcp-1"))}
    if draw(st.booleans()):
        message["result"] = draw(json_values)
    else:
        message["error"] = {"code": draw(st.integers()), "message": draw(odd_text)}
    return Msg(message, "response")


@st.composite
def invalid_messages(draw: Any, in_batch: bool) -> Msg:
    """
    A message the broker must refuse, made from a valid one by one change.
    """
    how = draw(
        st.sampled_from(
            [
                "jsonrpc",
                "no jsonrpc",
                "method",
                "params",
                "request id",
                "result and method",
                "neither",
                "response id",
                "both",
                "no result",
                "error",
                "not an object",
            ]
        )
    )
    if how == "not an object":
        scalars = st.none() | st.booleans() | st.integers() | odd_text | st.floats(-1e9, 1e9)
        return Msg(
            draw(scalars | st.lists(json_values, max_size=2) if in_batch else scalars), "bad"
        )
    if how in ("response id", "both", "no result", "error"):
        message = dict(draw(responses()).value)
    elif how in ("jsonrpc", "no jsonrpc", "params"):
        message = dict(draw(requests(in_batch=in_batch) | notifications()).value)
    else:
        message = dict(draw(requests(in_batch=in_batch)).value)
    if how == "jsonrpc":
        message["jsonrpc"] = draw(st.sampled_from([None, "1.0", "2", "2.0 ", 2.0, 2, ["2.0"], ""]))
    elif how == "no jsonrpc":
        del message["jsonrpc"]
    elif how == "method":
        message["method"] = draw(
            st.sampled_from(["", None, 1, 0, True, ["tools/list"], {"m": 1}]) | st.integers()
        )
    elif how == "params":
        message["params"] = draw(st.none() | st.booleans() | st.integers() | odd_text)
    elif how == "request id":
        message["id"] = draw(invalid_ids)
    elif how == "result and method":
        message[draw(st.sampled_from(["result", "error"]))] = {}
    elif how == "neither":
        del message["method"]
        del message["id"]
    elif how == "response id":
        message["id"] = draw(invalid_ids)
    elif how == "both":
        message["result"] = {}
        message["error"] = {"code": 1, "message": "x"}
    elif how == "no result":
        message.pop("result", None)
        message.pop("error", None)
    else:
        message.pop("result", None)
        message["error"] = draw(
            st.sampled_from(
                [
                    None,
                    "boom",
                    [],
                    {"message": "no code"},
                    {"code": True, "message": "x"},
                    {"code": 1.0, "message": "x"},
                    {"code": "1", "message": "x"},
                    {"code": 1},
                    {"code": 1, "message": 5},
                ]
            )
        )
    return Msg(message, "bad")


def messages(in_batch: bool) -> st.SearchStrategy[Msg]:
    return st.one_of(
        requests(in_batch=in_batch),
        requests(in_batch=in_batch),
        requests(("slow", "never"), in_batch),
        notifications(),
        responses(),
        invalid_messages(in_batch),
    )


SURROGATES = [b'"\\ud800"', b'"\\udfff"', b'"a\\uDBFFb"', b'"\\ude00\\ud83d"', b'"\\udc00x"']
BAD_VALUES = {
    # Numbers no peer reads back (Python would write NaN, Infinity).
    "number": [b"NaN", b"-NaN", b"Infinity", b"-Infinity", b"1e999", b"-1E400", b"1e309"],
    # Text that is not Unicode: lone UTF-16 surrogates, as escapes.
    "surrogate": SURROGATES,
    # Bytes that are not UTF-8 (a stray byte, an encoded surrogate, an
    # overlong form), and a raw control character.
    "utf-8": [b'"\xff"', b'"\xed\xa0\x80"', b'"\xc0\xaf"', b'"\xfe\xfe"', b'"\x01"'],
    "syntax": [
        b"9" * 5000,
        b"undefined",
        b"'x'",
        b"01",
        b"1.",
        b".5",
        b"+1",
        b"0x10",
        b"tru",
        b"[1,]",
        b'{"a":1,}',
        b"{}{}",
    ],
}
FRAMING = [b"", b" ", b"\r\n", b"{", b"[", b"}", b'{"jsonrpc":"2.0"', b"\xef\xbb\xbf{}"]
TEMPLATES = [
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call","params":{"name":"echo","arguments":{"x":%s}}}',
    b'{"jsonrpc":"2.0","id":%s,"method":"ping"}',
    b'[{"jsonrpc":"2.0","id":1,"method":"ping"},%s]',
    b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":%s}}',
    b'{"jsonrpc":"2.0","id":"r","result":%s}',
    b"%s",
]


@st.composite
def raw_bodies(draw: Any) -> Raw:
    """
    Bodies the broker must refuse as a whole with a parse error, one kind
    of defect at a time, mostly inside an otherwise valid message.
    """
    kind = draw(
        st.sampled_from(["number", "surrogate", "utf-8", "deep", "syntax", "garbage", "framing"])
    )
    if kind == "deep":
        # One level deeper than the broker takes (the echo call itself is
        # three levels), or far deeper than Python's parser manages.
        levels = draw(st.sampled_from([MAX_DEPTH - 2, MAX_DEPTH, 3000]))
        deep = draw(
            st.sampled_from(
                [b"[" * levels + b"]" * levels, b'{"a":' * levels + b"1" + b"}" * levels]
            )
        )
        return Raw(TEMPLATES[0] % deep, f"nested {levels + 3} deep")
    if kind == "surrogate" and draw(st.booleans()):
        key = draw(st.sampled_from(SURROGATES))
        return Raw(b'{"jsonrpc":"2.0","id":1,"method":"ping","params":{%s:1}}' % key, "key")
    if kind == "garbage":
        return Raw(b"<" + draw(st.binary(max_size=16)), "not JSON")
    if kind == "framing":
        return Raw(draw(st.sampled_from(FRAMING)), "framing")
    bad = draw(st.sampled_from(BAD_VALUES[kind]))
    return Raw(draw(st.sampled_from(TEMPLATES)) % bad, f"{kind} {bad[:20]!r}")


BODY_KINDS = ["holds"] * 3 + ["single"] * 3 + ["batch"] * 3 + ["raw"] * 2


@st.composite
def bodies(draw: Any) -> Single | Batch | Raw:
    """
    A body of each kind about as often as its share of C{BODY_KINDS}
    (C{one_of} leans towards the simpler branches): requests that hold
    their exchange open (so that the per-user cap is reached), single
    messages, batches, and bodies that are not JSON the broker takes.
    """
    kind = draw(st.sampled_from(BODY_KINDS))
    if kind == "holds":
        return Single(draw(requests(("slow", "never"))))
    if kind == "single":
        return Single(draw(messages(False)))
    if kind == "batch":
        return Batch(tuple(draw(st.lists(messages(True), max_size=5))))
    return draw(raw_bodies())


steps = st.builds(
    Step,
    body=bodies(),
    layout=st.tuples(
        st.booleans(),
        st.sampled_from(["compact", "spaced"]),
        st.sampled_from(["", " ", "\n", " \r\n\t"]),
        st.sampled_from([0] * 18 + [MAX_BODY, MAX_BODY + 1]),
    ),
    target=st.sampled_from(["A"] * 6 + ["B"] * 3 + ["stale", "none"]),
    version=st.sampled_from([None] * 6 + ["2025-03-26", "2025-06-18", "2024-11-05"]),
    wait=st.sampled_from([0.0, 0.0, 0.0, 0.5, 1.0, 2.0]),
    goes_away=st.sampled_from([False] * 4 + [True]),
)


def numbered(all_steps: list[Step]) -> Iterator[Step]:
    """
    The steps with every object message numbered (C{SERIAL}), from 1.
    """
    serial = 0

    def number(msg: Msg) -> Msg:
        nonlocal serial
        if not isinstance(msg.value, dict):
            return msg
        serial += 1
        return Msg({**msg.value, SERIAL: serial}, msg.intent)

    for step in all_steps:
        body = step.body
        if isinstance(body, Single):
            body = Single(number(body.msg))
        elif isinstance(body, Batch):
            body = Batch(tuple(number(m) for m in body.msgs))
        target = step.target
        if isinstance(body, Single) and body.msg.intent == "initialize" and target == "none":
            # That would open another session; initialize is tested on its own.
            target = "A"
        yield attrs.evolve(step, body=body, target=target)


def encode(step: Step) -> bytes:
    body = step.body
    if isinstance(body, Raw):
        data = body.data
    else:
        value = body.msg.value if isinstance(body, Single) else [m.value for m in body.msgs]
        ensure_ascii, separators, space, _ = step.layout
        data = json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            separators=(",", ":") if separators == "compact" else (", ", ": "),
        ).encode()
        data = space.encode() + data + space.encode()
    padding = step.layout[3]
    if padding and len(data) < padding:
        data += b" " * (padding - len(data))
    return data


# --- what must come back


@attrs.frozen
class Prediction:
    """
    The answer a body calls for: its status; for an answer that is one
    JSON-RPC error about the whole body, its id and code; else the messages
    each to be answered once (requests and refusals); and the messages the
    child is to get.
    """

    status: int
    error_id: Any = None
    error_code: int | None = None
    answered: tuple[Msg, ...] = ()
    forwarded: tuple[Msg, ...] = ()

    @property
    def whole(self) -> bool:
        return self.error_code is not None


def predict(data: bytes, step: Step, alive: bool, version: str | None, full: bool) -> Prediction:
    """
    What the broker must answer, from the body and the state of the session
    and the user's exchanges when it was posted.
    """
    if len(data) > MAX_BODY:
        return Prediction(413, None, INVALID_REQUEST)
    body = step.body
    if isinstance(body, Raw):
        return Prediction(400, None, PARSE_ERROR)

    def session(id: Any) -> Prediction | None:
        if step.version is not None and step.version not in SUPPORTED:
            return Prediction(400, id, INVALID_REQUEST)
        if step.target == "none":
            return Prediction(400, id, INVALID_REQUEST)
        if not alive:
            return Prediction(404, id, SESSION_NOT_FOUND)
        return None

    if isinstance(body, Batch):
        if (refused := session(None)) is not None:
            return refused
        if version != "2025-03-26" or not body.msgs:
            return Prediction(400, None, INVALID_REQUEST)
        refusals = tuple(m for m in body.msgs if m.intent in ("bad", "initialize", "response"))
        requests = tuple(m for m in body.msgs if m.intent == "request")
        notes = tuple(m for m in body.msgs if m.intent == "notification")
        if not requests and not refusals:
            return Prediction(202, forwarded=notes)
        if requests and full:
            # Refused as a whole: nothing of it may reach the child.
            return Prediction(429, None, SERVER_ERROR)
        return Prediction(200, answered=refusals + requests, forwarded=notes + requests)

    msg = body.msg
    if step.version is not None and step.version not in SUPPORTED:
        # Taken for a request of the stateless revision, whose envelope
        # (params._meta) none of these messages has.
        if msg.intent in ("bad", "response"):
            return Prediction(400, msg.answer_id, INVALID_REQUEST)
        return Prediction(400, msg.answer_id, INVALID_PARAMS)
    if msg.intent in ("bad", "initialize"):
        return Prediction(400, msg.answer_id, INVALID_REQUEST)
    if (refused := session(msg.answer_id)) is not None:
        return refused
    if msg.intent == "notification":
        return Prediction(202, forwarded=(msg,))
    if msg.intent == "response":
        return Prediction(400, msg.answer_id, INVALID_REQUEST)
    if full:
        return Prediction(429, msg.answer_id, SERVER_ERROR)
    return Prediction(200, answered=(msg,), forwarded=(msg,))


def answer_serial(answer: dict[str, Any]) -> Any:
    """
    Which message the child answered, when the answer came from the child.
    """
    result = answer.get("result")
    if isinstance(result, dict) and "_serial" in result:
        return result["_serial"]
    data = answer.get("error", {}).get("data")
    if isinstance(data, dict):
        return data.get("serial")
    return None


class Run:
    """
    One generated scenario against a fresh L{World}, and its checks.
    """

    def __init__(self, test: SynchronousTestCase, rng: random.Random) -> None:
        self.test = test
        self.world = World(rng)
        self.sessions = {
            "A": self.world.open_session("2025-03-26"),
            "B": self.world.open_session("2025-06-18"),
        }
        self.world.exchanges.clear()

    def post(self, step: Step) -> Exchange:
        world = self.world
        session_id = {"stale": "no-such-session", "none": None}.get(step.target)
        session: Session | None = None
        if step.target in self.sessions:
            session_id = self.sessions[step.target]
            session = world.session(session_id) if not self._ended(session_id) else None
        data = encode(step)
        prediction = predict(
            data,
            step,
            alive=session is not None,
            version=session.protocol_version if session is not None else None,
            full=world.endpoint.open_exchanges(USER) >= MAX_EXCHANGES,
        )
        exchange = world.post(data, session_id, step.version)
        exchange.body = step
        exchange.prediction = prediction
        return exchange

    def _ended(self, session_id: str) -> bool:
        return all(s.id != session_id for s in self.world.sessions.of_user(USER))

    def go_away(self, exchange: Exchange) -> None:
        """
        The client disconnects; the requests of the exchange still waiting
        are cancelled in the child, at once.
        """
        children = self.world.reactor.children
        before = [len(c.received) for c in children]
        answered_so_far = len(
            [a for a in self._answers_so_far(exchange) if "method" not in a and "id" in a]
        )
        if not self.world.go_away(exchange):
            return
        assert exchange.prediction is not None
        waiting = len(exchange.prediction.answered) - answered_so_far
        sent = [m for c, n in zip(children, before, strict=True) for m in c.received[n:]]
        cancels = [m for m in sent if m.get("method") == "notifications/cancelled"]
        self.test.assertEqual(len(cancels), waiting, (exchange.body, sent))
        for cancel in cancels:
            self.test.assertEqual(cancel["params"]["reason"], DISCONNECTED)

    def _answers_so_far(self, exchange: Exchange) -> list[dict[str, Any]]:
        body = bytes(exchange.request.body)
        if not body:
            return []
        if exchange.request.content_type() == b"text/event-stream":
            return sse_events(body) if body.endswith(b"\n\n") else []
        return [json.loads(body)]

    # Checks.

    def check_exchange(self, exchange: Exchange) -> None:
        t = self.test
        request, prediction = exchange.request, exchange.prediction
        assert prediction is not None
        where = (exchange.body, bytes(request.body)[:300], request.code)
        t.assertIsNone(exchange.failure, where)
        t.assertEqual(request.problems, [], where)
        if exchange.gone_at is not None:
            t.assertEqual(request.finished, 0, where)
            return
        t.assertEqual(request.finished, 1, where)
        t.assertIn(request.code, {200, 202, 400, 404, 413, 429}, where)
        t.assertEqual(request.code, prediction.status, where)
        assert request.finished_at is not None
        t.assertLessEqual(request.finished_at - exchange.posted_at, TIMEOUT, where)
        answers = exchange.answers()
        if request.code == 202:
            t.assertEqual(answers, [], where)
            t.assertIsNone(request.content_type(), where)
            return
        for answer in answers:
            if "method" not in answer:
                t.assertEqual(answer.get("jsonrpc"), "2.0", where)
                t.assertEqual(len({"result", "error"} & set(answer)), 1, where)
                if "error" in answer:
                    t.assertIsInstance(answer["error"]["code"], int, where)
                    t.assertIsInstance(answer["error"]["message"], str, where)
        if prediction.whole:
            t.assertEqual(request.content_type(), b"application/json", where)
            [answer] = answers
            t.assertEqual(canonical(answer["id"]), canonical(prediction.error_id), where)
            t.assertEqual(answer["error"]["code"], prediction.error_code, where)
            return
        responses = [a for a in answers if "method" not in a]
        if isinstance(exchange.body.body, Batch):
            t.assertEqual(request.content_type(), b"text/event-stream", where)
        else:
            t.assertTrue(responses, where)
            t.assertEqual(answers[-1], responses[-1], where)
            [msg] = prediction.answered
            for note in answers[:-1]:
                self._check_interim(note, msg, where)
        self._match(responses, prediction.answered, where)

    def _check_interim(self, note: dict[str, Any], msg: Msg, where: Any) -> None:
        """
        What comes before a request's answer on its stream: progress under
        its own token.
        """
        self.test.assertEqual(note.get("method"), "notifications/progress", where)
        self.test.assertNotIn("id", note, where)
        token = msg.value["params"]["_meta"]["progressToken"]
        self.test.assertEqual(canonical(note["params"]["progressToken"]), canonical(token), where)

    def _match(
        self, responses: list[dict[str, Any]], expected: tuple[Msg, ...], where: Any
    ) -> None:
        """
        Each expected message answered exactly once under its id; an answer
        from the child reaches the very message it answers.
        """
        t = self.test
        left = list(expected)
        by_child = [r for r in responses if answer_serial(r) is not None]
        others = [r for r in responses if answer_serial(r) is None]
        for response in by_child:
            mine = [m for m in left if m.serial == answer_serial(response)]
            t.assertEqual(len(mine), 1, ("answered twice, or not asked", response, where))
            msg = mine[0]
            t.assertEqual(canonical(response["id"]), canonical(msg.answer_id), where)
            left.remove(msg)
        for response in others:
            same = [m for m in left if canonical(m.answer_id) == canonical(response["id"])]
            t.assertTrue(same, ("an answer nobody asked for", response, where))
            left.remove(same[0])
        t.assertEqual(left, [], ("not answered", where))

    def check_child(self) -> None:
        """
        The children got what the broker accepted (requests each once), and
        nothing it refused, and every line they got parsed.
        """
        t = self.test
        accepted: dict[int, Msg] = {}
        for exchange in self.world.exchanges:
            assert exchange.prediction is not None
            for msg in exchange.prediction.forwarded:
                assert msg.serial is not None
                accepted[msg.serial] = msg
        received: dict[int, dict[str, Any]] = {}
        for child in self.world.reactor.children:
            t.assertEqual(child.unparseable, [])
            requests_seen: dict[int, Any] = {}
            for message in child.received:
                serial = message.get(SERIAL)
                if serial == 0:
                    # The session's own initialize and initialized.
                    if "id" in message:
                        requests_seen[message["id"]] = serial
                    continue
                if serial is None:
                    # The broker's own: cancelling one of this child's requests.
                    t.assertEqual(message.get("method"), "notifications/cancelled", message)
                    t.assertIn(message["params"]["reason"], (TIMED_OUT, DISCONNECTED))
                    t.assertIn(message["params"]["requestId"], requests_seen, message)
                    continue
                t.assertIn(serial, accepted, ("the child got a refused message", message))
                t.assertNotIn(serial, received, ("the child got a message twice", message))
                received[serial] = message
                if "id" in message:
                    child_id = message["id"]
                    t.assertTrue(valid_id(child_id) and not isinstance(child_id, str), message)
                    t.assertNotIn(child_id, requests_seen, message)
                    requests_seen[child_id] = serial
            cancelled = [
                m["params"]["requestId"]
                for m in child.received
                if m.get("method") == "notifications/cancelled" and m.get(SERIAL) is None
            ]
            t.assertEqual(len(cancelled), len(set(cancelled)), "a request cancelled twice")
        for serial, msg in accepted.items():
            if msg.intent == "request":
                t.assertIn(serial, received, ("a request never reached the child", msg))
            elif msg.value.get("method") != "notifications/cancelled":
                t.assertIn(serial, received, ("a notification never reached the child", msg))

    def check_quiet(self) -> None:
        """
        Nothing held: no exchange counted, no request waiting in any router.
        """
        self.test.assertEqual(self.world.endpoint.open_exchanges(USER), 0)
        for session in self.world.sessions.of_user(USER):
            self.test.assertEqual(session.router.in_flight, 0)


@implementer(ILogObserver)
class CapturedLog:
    """
    Errors and failures logged while a scenario ran.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if "log_failure" in event or level in (LogLevel.error, LogLevel.critical):
            self.events.append(event)

    def __enter__(self) -> CapturedLog:
        globalLogPublisher.addObserver(self)
        return self

    def __exit__(self, *exc: object) -> None:
        globalLogPublisher.removeObserver(self)


class GeneratedTrafficTests(SynchronousTestCase):
    @settings(
        max_examples=200,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(all_steps=st.lists(steps, min_size=2, max_size=10), rng=st.randoms())
    def test_every_request_ends(self, all_steps: list[Step], rng: random.Random) -> None:
        with CapturedLog() as logged:
            run = Run(self, rng)
            for step in numbered(all_steps):
                exchange = run.post(step)
                advance(run.world.reactor, step.wait)
                if step.goes_away:
                    run.go_away(exchange)
            # Past every deadline (and every slow answer).
            advance(run.world.reactor, TIMEOUT + 5)
            for exchange in run.world.exchanges:
                run.check_exchange(exchange)
            run.check_child()
            run.check_quiet()
            run.world.stop()
            self.assertEqual(run.world.reactor.getDelayedCalls(), [])
            self.assertTrue(all(c.ended for c in run.world.reactor.children))
        self.assertEqual(
            [e.get("log_format") for e in logged.events], [], [e for e in logged.events]
        )


def post_json(world: World, value: Any, session_id: str | None = None) -> Exchange:
    return world.post(json.dumps(value).encode(), session_id)


def tool_call(id: Any, name: str, serial: int, **arguments: Any) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id,
        "method": "tools/call",
        "params": {"name": name, "arguments": arguments},
        SERIAL: serial,
    }


class HarnessTests(SynchronousTestCase):
    """
    The pieces of the generated test on their own: the scripted child, the
    fake request and the checks see what they are meant to see.
    """

    def setUp(self) -> None:
        self.world = World(random.Random(1))
        self.session_id = self.world.open_session("2025-03-26")

    def test_echo(self) -> None:
        exchange = post_json(self.world, tool_call(3, "echo", 1, x=[1]), self.session_id)
        self.assertEqual(exchange.request.finished, 0)
        self.world.reactor.advance(0)
        self.assertEqual(exchange.request.code, 200)
        [answer] = exchange.answers()
        self.assertEqual(answer["id"], 3)
        self.assertEqual(answer["result"]["content"][0]["text"], '{"x": [1]}')
        self.assertEqual(answer_serial(answer), 1)

    def test_never_ends_at_the_deadline(self) -> None:
        exchange = post_json(self.world, tool_call("n", "never", 1), self.session_id)
        self.world.reactor.advance(TIMEOUT - 0.5)
        self.assertEqual(exchange.request.finished, 0)
        self.world.reactor.advance(0.5)
        self.assertEqual(exchange.request.finished_at, TIMEOUT)
        [answer] = exchange.answers()
        self.assertEqual(answer["id"], "n")
        self.assertEqual(answer["error"]["code"], -32001)
        child = self.world.child_of(self.world.session(self.session_id))
        self.assertEqual(child.received[-1]["method"], "notifications/cancelled")
        self.assertEqual(child.received[-1]["params"]["reason"], TIMED_OUT)

    def test_slow_with_progress_is_sse(self) -> None:
        call = tool_call(4, "slow", 1, seconds=3)
        call["params"]["_meta"] = {"progressToken": "mine"}
        exchange = post_json(self.world, call, self.session_id)
        self.world.reactor.advance(0)
        self.assertEqual(exchange.request.content_type(), b"text/event-stream")
        self.world.reactor.advance(3)
        progress, answer = exchange.answers()
        self.assertEqual(progress["params"]["progressToken"], "mine")
        self.assertEqual(answer["id"], 4)
        self.assertEqual(exchange.request.finished, 1)

    def test_child_refuses_what_it_cannot_parse(self) -> None:
        child = self.world.child_of(self.world.session(self.session_id))
        router = self.world.session(self.session_id).router
        exchange = post_json(self.world, tool_call(5, "never", 1), self.session_id)
        child.write(b"{not json\n")
        self.world.reactor.advance(0)
        self.assertEqual(child.unparseable, [b"{not json"])
        # The router takes the refusal for the request written last.
        self.assertEqual(router.in_flight, 0)
        [answer] = exchange.answers()
        self.assertEqual(answer, {"jsonrpc": "2.0", "id": 5, "error": answer["error"]})
        self.assertEqual(answer["error"]["code"], -32700)

    def test_batch_refused_in_a_2025_06_18_session(self) -> None:
        other = self.world.open_session("2025-06-18")
        exchange = post_json(self.world, [tool_call(1, "echo", 1)], other)
        self.assertEqual(exchange.request.code, 400)
        [answer] = exchange.answers()
        self.assertIsNone(answer["id"])
        self.assertEqual(self.world.child_of(self.world.session(other)).received[-1][SERIAL], 0)

    def test_disconnect_cancels_in_the_child(self) -> None:
        exchange = post_json(self.world, tool_call(6, "never", 1), self.session_id)
        child = self.world.child_of(self.world.session(self.session_id))
        child_id = child.received[-1]["id"]
        self.assertTrue(self.world.go_away(exchange))
        self.assertEqual(
            child.received[-1]["params"], {"requestId": child_id, "reason": DISCONNECTED}
        )
        self.assertEqual(self.world.endpoint.open_exchanges(USER), 0)
        self.world.reactor.advance(TIMEOUT * 2)
        self.assertEqual(exchange.request.body, b"")
        self.assertEqual(exchange.request.problems, [])

    def test_checks_catch_what_they_are_for(self) -> None:
        """
        The checks fail for a request not answered (yet), for an answer
        under another id, and for a message the child should not have got.
        """

        def never(id: Any, serial: int) -> Step:
            return Step(
                Single(Msg(tool_call(id, "never", serial), "request")),
                (False, "compact", "", 0),
                "A",
                None,
                0.0,
                False,
            )

        run = Run(self, random.Random(2))
        waiting = run.post(never(1, 1))
        self.assertRaises(self.failureException, run.check_exchange, waiting)
        advance(run.world.reactor, TIMEOUT)
        run.check_exchange(waiting)
        run.check_child()
        waiting.request.body = waiting.request.body.replace(b'"id":1', b'"id":"1"')
        self.assertRaises(self.failureException, run.check_exchange, waiting)
        # A refused message (its prediction says so) that reached the child.
        run.post(attrs.evolve(never(2, 2), target="stale"))
        session = run.world.session(run.sessions["A"])
        session.child.send(tool_call(2, "echo", 2))
        self.assertRaises(self.failureException, run.check_child)


class FoundBugTests(SynchronousTestCase):
    """
    What the generated test found in the product.
    """

    def test_batch_refused_with_429_reaches_the_child(self) -> None:
        """
        A batch answered 429 ("retry when some have ended") was refused as
        a whole, so none of it may reach the child: a client that retries it
        would deliver its notifications (and answers to the server's
        requests) twice.
        """
        world = World(random.Random(3))
        session_id = world.open_session("2025-03-26")
        for n in range(MAX_EXCHANGES):
            post_json(world, tool_call(n, "never", 100 + n), session_id)
        self.assertEqual(world.endpoint.open_exchanges(USER), MAX_EXCHANGES)
        child = world.child_of(world.session(session_id))
        before = len(child.received)
        batch = [
            {"jsonrpc": "2.0", "method": "notifications/roots/list_changed", SERIAL: 1},
            tool_call("b", "echo", 2),
        ]
        exchange = post_json(world, batch, session_id)
        self.assertEqual(exchange.request.code, 429)
        self.assertEqual(child.received[before:], [])

    def test_session_id_survives_an_sse_answer_to_initialize(self) -> None:
        """
        A child that logs while it initializes (MCP allows logging before
        initialized) turns the answer into an SSE stream; the Mcp-Session-Id
        header must still go out with it, or the client never learns its
        session.
        """
        world = World(random.Random(4), behaviours=frozenset({"log-on-initialize"}))
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}},
        }
        exchange = post_json(world, body)
        world.reactor.advance(0)
        self.assertEqual(exchange.request.content_type(), b"text/event-stream")
        [_, answer] = exchange.answers()
        self.assertIn("result", answer)
        assert exchange.request.sent_headers is not None
        self.assertIn(b"mcp-session-id", exchange.request.sent_headers)
