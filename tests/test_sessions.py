"""
MCP sessions over the wire: a real broker on loopback, the scripted stdio
child behind it, and raw HTTP in front.  This module has the happy path and
the protocol rules of `/mcp`; C{test_sessions_lifecycle} has caps, reaping,
faults, the child's environment and resource hygiene.  The helpers here are
shared by both.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.web.http_headers import Headers

from fjmcp.mcp.session import Session
from tests.broker_support import SCRIPTED_CHILD, Broker, BrokerTestCase
from tests.helpers import http_client

ACCEPT = b"application/json, text/event-stream"
# How long anything that should happen "at once" may take on a busy machine.
PROMPT = 10.0
INIT_PARAMS = {"capabilities": {}, "clientInfo": {"name": "test_sessions", "version": "1"}}


def request(id: Any, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"jsonrpc": "2.0", "id": id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def notification(method: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method}


def tool(
    id: Any, name: str, arguments: dict[str, Any] | None = None, meta: dict[str, Any] | None = None
) -> dict[str, Any]:
    params: dict[str, Any] = {"name": name, "arguments": arguments or {}}
    if meta is not None:
        params["_meta"] = meta
    return request(id, "tools/call", params)


def initialize(id: Any = 1, version: str = "2025-06-18") -> dict[str, Any]:
    return request(id, "initialize", {"protocolVersion": version, **INIT_PARAMS})


def tool_text(message: dict[str, Any]) -> str:
    """
    The text of a tools/call result.
    """
    assert "result" in message, message
    text: str = message["result"]["content"][0]["text"]
    return text


async def within(d: Deferred[Any], timeout: float = PROMPT) -> Any:
    """
    C{d}'s result, or a failure if it takes longer than C{timeout} seconds.
    """
    return await d.addTimeout(timeout, reactor)


class Reply:
    """
    One HTTP response from /mcp, read as it arrives: a JSON body, or the
    events of a text/event-stream.
    """

    def __init__(self, response: Any) -> None:
        self.response = response
        self.code: int = response.code
        self.headers: Headers = response.headers
        self.body = bytearray()
        self.events: list[dict[str, Any]] = []
        self.comments = 0
        self._buffer = b""
        self._waiters: list[tuple[Callable[[dict[str, Any]], bool], Deferred[dict[str, Any]]]] = []
        self.done: Deferred[None] = treq.collect(response, self._data)

    @property
    def content_type(self) -> str | None:
        values = self.headers.getRawHeaders(b"content-type")
        return values[0].decode() if values else None

    @property
    def is_sse(self) -> bool:
        return self.content_type == "text/event-stream"

    @property
    def session_id(self) -> str | None:
        values = self.headers.getRawHeaders(b"mcp-session-id")
        return values[0].decode() if values else None

    def json(self) -> Any:
        return json.loads(bytes(self.body))

    def _data(self, data: bytes) -> None:
        self.body += data
        if not self.is_sse:
            return
        self._buffer += data
        while b"\n\n" in self._buffer:
            frame, self._buffer = self._buffer.split(b"\n\n", 1)
            data_lines = []
            for line in frame.split(b"\n"):
                if line.startswith(b":"):
                    self.comments += 1
                elif line.startswith(b"data: "):
                    data_lines.append(line[len(b"data: ") :])
            if data_lines:
                self._event(json.loads(b"\n".join(data_lines)))

    def _event(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        for waiter in list(self._waiters):
            predicate, d = waiter
            if predicate(event):
                self._waiters.remove(waiter)
                d.callback(event)

    async def event(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = PROMPT
    ) -> dict[str, Any]:
        """
        The first event (already received or still to come) that matches.
        """
        for event in self.events:
            if predicate(event):
                return event
        d: Deferred[dict[str, Any]] = Deferred()
        self._waiters.append((predicate, d))
        result: dict[str, Any] = await within(d, timeout)
        return result

    async def finished(self, timeout: float = PROMPT) -> Reply:
        """
        Wait for the end of the body.
        """
        await within(self.done, timeout)
        return self


class SessionTestCase(BrokerTestCase):
    """
    Raw MCP over HTTP against C{self.broker}, with the steps of a session.
    """

    timeout = 120

    def setUp(self) -> None:
        super().setUp()
        self.http = http_client()

    def use_broker(self, **kwargs: Any) -> Broker:
        """
        Replace the default broker with one built with C{kwargs}.
        """
        self.broker = Broker(self, **kwargs)
        return self.broker

    def use_behaviours(self, *behaviours: str) -> None:
        """
        The scripted child's behaviours for sessions started from now on,
        so one broker can run a well-behaved and a misbehaving session side
        by side.
        """
        self.broker.sessions._args_prefix = ["-S", SCRIPTED_CHILD, *behaviours]

    def session_object(self, session_id: str) -> Session:
        """
        The broker's own record of a session (whoever owns it).
        """
        session = self.broker.sessions._sessions.get(session_id)
        assert session is not None, f"no session {session_id}"
        return session

    def live(self, session_id: str) -> bool:
        return session_id in self.broker.sessions._sessions

    async def token(self, login: str = "alice") -> str:
        tokens = await self.login_tokens(login)
        access: str = tokens["access_token"]
        return access

    async def send(
        self,
        method: str,
        token: str | None,
        body: Any = None,
        session_id: str | None = None,
        path: str = "/mcp",
        headers: dict[bytes, bytes] | None = None,
        timeout: float = PROMPT,
    ) -> Reply:
        """
        Start one request to /mcp: the L{Reply} is there once the response
        headers are (within C{timeout} seconds); its body goes on arriving.
        C{body} is JSON-encoded unless it is already bytes.
        """
        all_headers = {b"Accept": [ACCEPT]}
        if token is not None:
            all_headers[b"Authorization"] = [b"Bearer " + token.encode()]
        if session_id is not None:
            all_headers[b"Mcp-Session-Id"] = [session_id.encode()]
        data = None
        if body is not None:
            all_headers[b"Content-Type"] = [b"application/json"]
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
        for name, value in (headers or {}).items():
            all_headers[name] = [value]
        response = await within(
            self.http.request(
                method, self.broker.url + path, data=data, headers=Headers(all_headers)
            ),
            timeout,
        )
        return Reply(response)

    def start(self, *args: Any, **kwargs: Any) -> Deferred[Reply]:
        """
        L{send}, not awaited: for requests that are meant to stay open.
        """
        return Deferred.fromCoroutine(self.send(*args, **kwargs))

    async def post(
        self, token: str | None, body: Any, session_id: str | None = None, **kw: Any
    ) -> Reply:
        """
        One whole POST: headers and body.
        """
        return await (await self.send("POST", token, body, session_id, **kw)).finished()

    async def rpc(self, token: str, session_id: str, message: dict[str, Any]) -> dict[str, Any]:
        """
        A request in a session that must succeed: its response (the last
        event of an SSE answer).
        """
        reply = await self.post(token, message, session_id)
        self.assertEqual(reply.code, 200, bytes(reply.body))
        response: dict[str, Any] = reply.events[-1] if reply.is_sse else reply.json()
        self.assertEqual(response.get("id"), message["id"])
        return response

    async def initialize(
        self, token: str, version: str = "2025-06-18", path: str = "/mcp"
    ) -> tuple[Reply, str]:
        """
        Initialize a session and send notifications/initialized.
        """
        reply = await self.post(token, initialize(1, version), path=path)
        self.assertEqual(reply.code, 200, bytes(reply.body))
        self.assertEqual(reply.content_type, "application/json")
        self.assertEqual(reply.json()["result"]["serverInfo"]["name"], "scripted-child")
        session_id = reply.session_id
        assert session_id is not None
        done = await self.post(
            token, notification("notifications/initialized"), session_id, path=path
        )
        self.assertEqual(done.code, 202)
        self.assertEqual(bytes(done.body), b"")
        return reply, session_id

    async def open_session(self, token: str, version: str = "2025-06-18") -> str:
        return (await self.initialize(token, version))[1]

    async def delete(self, token: str, session_id: str, path: str = "/mcp") -> Reply:
        return await (await self.send("DELETE", token, None, session_id, path=path)).finished()

    async def whoami(self, token: str, session_id: str) -> dict[str, Any]:
        info: dict[str, Any] = json.loads(
            tool_text(await self.rpc(token, session_id, tool(1, "whoami")))
        )
        return info

    def assert_rpc_error(
        self, reply: Reply, status: int, code: int | None = None
    ) -> dict[str, Any]:
        """
        C{reply} is an HTTP C{status} whose body is a JSON-RPC error.
        """
        self.assertEqual(reply.code, status, bytes(reply.body))
        self.assertEqual(reply.content_type, "application/json")
        body: dict[str, Any] = reply.json()
        self.assertEqual(body["jsonrpc"], "2.0")
        self.assertIn("message", body["error"])
        if code is not None:
            self.assertEqual(body["error"]["code"], code)
        return body

    async def assert_gone(self, token: str, session_id: str) -> None:
        reply = await self.post(token, request(99, "tools/list"), session_id)
        self.assert_rpc_error(reply, 404)


class HappyPathTests(SessionTestCase):
    async def test_handshake_list_call_delete(self) -> None:
        token = await self.token()
        reply, session_id = await self.initialize(token)
        # At least 128 random bits, as URL-safe base64.
        self.assertGreaterEqual(len(session_id), 22)
        self.assertRegex(session_id, r"^[A-Za-z0-9_-]+$")
        self.assertEqual(reply.json()["id"], 1)
        self.assertEqual(reply.json()["result"]["protocolVersion"], "2025-06-18")

        listed = await self.rpc(token, session_id, request(2, "tools/list"))
        names = {t["name"] for t in listed["result"]["tools"]}
        self.assertTrue({"whoami", "echo", "slow", "ask", "change"} <= names)

        echoed = await self.rpc(token, session_id, tool(3, "echo", {"say": "héllo"}))
        self.assertEqual(json.loads(tool_text(echoed)), {"say": "héllo"})

        deleted = await self.delete(token, session_id)
        self.assertEqual(deleted.code, 204)
        self.assertEqual(bytes(deleted.body), b"")
        await self.assert_gone(token, session_id)
        # A second DELETE finds nothing either.
        self.assert_rpc_error(await self.delete(token, session_id), 404)

    async def test_session_ids_differ(self) -> None:
        token = await self.token()
        ids = {await self.open_session(token) for _ in range(3)}
        self.assertEqual(len(ids), 3)

    async def test_progress_comes_first_on_an_event_stream(self) -> None:
        token = await self.token()
        session_id = await self.open_session(token)
        reply = await self.send(
            "POST",
            token,
            tool("slow-1", "slow", {"delay": 0.01}, meta={"progressToken": "my-progress"}),
            session_id,
        )
        await reply.finished()
        self.assertEqual(reply.code, 200)
        self.assertTrue(reply.is_sse, reply.content_type)
        progress = reply.events[:-1]
        self.assertEqual(
            [
                (p["method"], p["params"]["progressToken"], p["params"]["progress"])
                for p in progress
            ],
            [("notifications/progress", "my-progress", n) for n in (1, 2, 3)],
        )
        # The response is the last event, and the stream ended after it.
        self.assertEqual(reply.events[-1]["id"], "slow-1")
        self.assertEqual(tool_text(reply.events[-1]), "done")

    async def test_without_progress_token_the_answer_is_json(self) -> None:
        token = await self.token()
        session_id = await self.open_session(token)
        reply = await self.post(token, tool(4, "slow", {"delay": 0.01}), session_id)
        self.assertEqual(reply.content_type, "application/json")
        self.assertEqual(tool_text(reply.json()), "done")

    async def test_same_id_out_of_order(self) -> None:
        """
        Two requests in flight in one session under the same JSON-RPC id:
        the slow one (it waits for the client) and a fast one that overtakes
        it.  Each gets its own answer under that id.
        """
        token = await self.token()
        session_id = await self.open_session(token)
        slow = await self.send("POST", token, tool(7, "ask"), session_id)
        question = await slow.event(lambda e: e.get("method") == "sampling/createMessage")
        fast = await self.post(token, tool(7, "echo", {"n": 1}), session_id)
        self.assertEqual(fast.json()["id"], 7)
        self.assertEqual(json.loads(tool_text(fast.json())), {"n": 1})
        self.assertFalse(slow.done.called, "the slow request finished before the fast one")
        answer = await self.post(
            token,
            {"jsonrpc": "2.0", "id": question["id"], "result": {"text": "slow answer"}},
            session_id,
        )
        self.assertEqual(answer.code, 202)
        await slow.finished()
        self.assertEqual(slow.events[-1]["id"], 7)
        self.assertEqual(json.loads(tool_text(slow.events[-1])), {"text": "slow answer"})

    async def test_same_id_concurrently(self) -> None:
        """
        Several requests under one id at once, with progress tokens that
        clash too: every answer and every progress event reaches its own
        request.
        """
        token = await self.token()
        session_id = await self.open_session(token)
        calls = [
            self.start(
                "POST",
                token,
                tool(1, "slow", {"delay": 0.02}, meta={"progressToken": 1}),
                session_id,
            ),
            self.start("POST", token, tool(1, "echo", {"which": "a"}), session_id),
            self.start("POST", token, tool(1, "echo", {"which": "b"}), session_id),
        ]
        slow, a, b = [await (await within(d)).finished() for d in calls]
        self.assertEqual(tool_text(slow.events[-1]), "done")
        self.assertEqual([e["params"]["progressToken"] for e in slow.events[:-1]], [1, 1, 1])
        self.assertEqual(json.loads(tool_text(a.json())), {"which": "a"})
        self.assertEqual(json.loads(tool_text(b.json())), {"which": "b"})
        for reply in (slow.events[-1], a.json(), b.json()):
            self.assertEqual(reply["id"], 1)

    async def test_get_stream_carries_list_changed(self) -> None:
        token = await self.token()
        session_id = await self.open_session(token)
        stream = await self.send("GET", token, None, session_id)
        self.assertEqual(stream.code, 200)
        self.assertEqual(stream.content_type, "text/event-stream")
        changed = await self.post(token, tool(5, "change"), session_id)
        # The response alone on the POST; the notification on the GET stream.
        self.assertEqual(changed.content_type, "application/json")
        self.assertEqual(tool_text(changed.json()), "changed")
        event = await stream.event(lambda e: True)
        self.assertEqual(event, {"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        # Ending the session ends its GET stream.
        self.assertEqual((await self.delete(token, session_id)).code, 204)
        await stream.finished()

    async def test_notification_waits_for_the_get_stream(self) -> None:
        """
        A standalone notification sent while no GET stream is open is kept
        and delivered when one opens.
        """
        token = await self.token()
        session_id = await self.open_session(token)
        await self.rpc(token, session_id, tool(5, "change"))
        stream = await self.send("GET", token, None, session_id)
        event = await stream.event(lambda e: True)
        self.assertEqual(event["method"], "notifications/tools/list_changed")
        await self.delete(token, session_id)
        await stream.finished()

    async def test_a_new_get_stream_replaces_the_old(self) -> None:
        token = await self.token()
        session_id = await self.open_session(token)
        first = await self.send("GET", token, None, session_id)
        second = await self.send("GET", token, None, session_id)
        await first.finished()
        await self.rpc(token, session_id, tool(5, "change"))
        await second.event(lambda e: e.get("method") == "notifications/tools/list_changed")
        self.assertEqual(first.events, [])
        await self.delete(token, session_id)
        await second.finished()

    async def test_sampling_request_on_the_post_stream(self) -> None:
        token = await self.token()
        session_id = await self.open_session(token)
        call = await self.send("POST", token, tool("q1", "ask"), session_id)
        self.assertEqual(call.code, 200)
        self.assertTrue(call.is_sse)
        question = await call.event(lambda e: e.get("method") == "sampling/createMessage")
        # The broker's own id, not the child's ("ask-N").
        self.assertRegex(str(question["id"]), r"^fjmcp-\d+$")
        self.assertEqual(question["params"]["maxTokens"], 5)
        sampled = {"role": "assistant", "content": {"type": "text", "text": "4"}, "model": "m"}
        answer = await self.post(
            token, {"jsonrpc": "2.0", "id": question["id"], "result": sampled}, session_id
        )
        self.assertEqual(answer.code, 202)
        self.assertEqual(bytes(answer.body), b"")
        await call.finished()
        self.assertEqual(call.events[-1]["id"], "q1")
        self.assertEqual(json.loads(tool_text(call.events[-1])), sampled)
        # The question was answered: a second answer has nowhere to go.
        again = await self.post(
            token, {"jsonrpc": "2.0", "id": question["id"], "result": sampled}, session_id
        )
        self.assert_rpc_error(again, 400)

    async def test_trailing_slash(self) -> None:
        token = await self.token()
        _, session_id = await self.initialize(token, path="/mcp/")
        reply = await self.post(token, request(2, "tools/list"), session_id, path="/mcp/")
        self.assertEqual(reply.code, 200)
        self.assertIn("tools", reply.json()["result"])
        # The same session on either path.
        await self.rpc(token, session_id, request(3, "tools/list"))
        stream = await self.send("GET", token, None, session_id, path="/mcp/")
        self.assertEqual(stream.content_type, "text/event-stream")
        self.assertIsNone(stream.headers.getRawHeaders(b"location"))
        self.assertEqual((await self.delete(token, session_id, path="/mcp/")).code, 204)
        await stream.finished()
        await self.assert_gone(token, session_id)


class OwnershipAndProtocolTests(SessionTestCase):
    async def test_another_users_session_does_not_exist(self) -> None:
        alice = await self.token("alice")
        session_id = await self.open_session(alice)
        bob = await self.token("bob")
        self.assertNotEqual(alice, bob)
        bobs = await self.open_session(bob)
        self.assertEqual(self.session_object(bobs).user_login, "bob")
        self.assertEqual(self.session_object(session_id).user_login, "alice")

        posted = await self.post(bob, tool(1, "whoami"), session_id)
        self.assert_rpc_error(posted, 404)
        stream = await (await self.send("GET", bob, None, session_id)).finished()
        self.assert_rpc_error(stream, 404)
        deleted = await self.delete(bob, session_id)
        self.assert_rpc_error(deleted, 404)
        answer = await self.post(bob, {"jsonrpc": "2.0", "id": "fjmcp-1", "result": {}}, session_id)
        self.assert_rpc_error(answer, 404)
        # Alice's session is untouched, and the children hold different tokens.
        mine = await self.whoami(alice, session_id)
        theirs = await self.whoami(bob, bobs)
        self.assertNotEqual(mine["token"], theirs["token"])

    async def test_unknown_session(self) -> None:
        token = await self.token()
        await self.open_session(token)
        for method, body, id in (
            ("POST", request(7, "tools/list"), 7),
            ("GET", None, None),
            ("DELETE", None, None),
        ):
            reply = await (await self.send(method, token, body, "no-such-session")).finished()
            body_ = self.assert_rpc_error(reply, 404)
            # JSON-RPC: the error answers the request under its own id.
            self.assertEqual(body_["id"], id)

    async def test_no_session_id(self) -> None:
        token = await self.token()
        for message in (
            request(1, "tools/list"),
            request(1, "server/discover"),
            notification("notifications/initialized"),
        ):
            self.assert_rpc_error(await self.post(token, message), 400, -32600)
        stream = await (await self.send("GET", token)).finished()
        self.assert_rpc_error(stream, 400)
        self.assert_rpc_error(await (await self.send("DELETE", token)).finished(), 400)

    async def test_initialize_inside_a_session(self) -> None:
        token = await self.token()
        session_id = await self.open_session(token)
        reply = await self.post(token, initialize(5), session_id)
        self.assertEqual(self.assert_rpc_error(reply, 400)["id"], 5)
        await self.rpc(token, session_id, request(6, "tools/list"))

    async def test_protocol_version_header(self) -> None:
        token = await self.token()
        session_id = await self.open_session(token)
        for bad in (b"1999-01-01", b"2026-07-28", b"nonsense"):
            # Not a handshake-era version: the request is taken for one of
            # the stateless revision, which lacks its envelope.
            reply = await self.post(
                token,
                request(2, "tools/list"),
                session_id,
                headers={b"MCP-Protocol-Version": bad},
            )
            self.assert_rpc_error(reply, 400, -32602)
        for good in (b"2025-06-18", b"2025-03-26", b"2025-11-25"):
            reply = await self.post(
                token,
                request(3, "tools/list"),
                session_id,
                headers={b"MCP-Protocol-Version": good},
            )
            self.assertEqual(reply.code, 200)

    async def test_origin(self) -> None:
        token = await self.token()
        for origin in (b"https://evil.example", b"http://127.0.0.1:1", b"null"):
            reply = await self.post(token, initialize(), headers={b"Origin": origin})
            self.assert_rpc_error(reply, 403)
            self.assertIsNone(reply.session_id)
        self.assertEqual(len(self.broker.sessions), 0)
        ok = await self.post(token, initialize(), headers={b"Origin": self.broker.url.encode()})
        self.assertEqual(ok.code, 200)
        self.assertIsNotNone(ok.session_id)
        # An unlisted Origin is refused on a live session too.
        assert ok.session_id is not None
        refused = await self.post(
            token,
            request(2, "tools/list"),
            ok.session_id,
            headers={b"Origin": b"https://x.example"},
        )
        self.assert_rpc_error(refused, 403)

    async def test_body_too_large(self) -> None:
        self.use_broker(max_request_body=512)
        token = await self.token()
        session_id = await self.open_session(token)
        reply = await self.post(token, tool(2, "echo", {"pad": "x" * 600}), session_id)
        self.assert_rpc_error(reply, 413)
        too_big_initialize = initialize()
        too_big_initialize["params"]["clientInfo"]["pad"] = "x" * 600
        reply = await self.post(token, too_big_initialize)
        self.assert_rpc_error(reply, 413)
        self.assertIsNone(reply.session_id)
        # Just under the limit is fine.
        echoed = await self.rpc(token, session_id, tool(3, "echo", {"pad": "x" * 300}))
        self.assertEqual(len(json.loads(tool_text(echoed))["pad"]), 300)

    async def test_not_json(self) -> None:
        token = await self.token()
        session_id = await self.open_session(token)
        for raw in (b"{not json", b"", b"\xff\xfe"):
            self.assert_rpc_error(await self.post(token, raw, session_id), 400, -32700)
        self.assert_rpc_error(await self.post(token, b"{nope"), 400, -32700)
        for invalid in ({"id": 1, "method": "x"}, 42, {"jsonrpc": "2.0"}):
            self.assert_rpc_error(await self.post(token, invalid, session_id), 400, -32600)
        await self.rpc(token, session_id, request(2, "tools/list"))

    async def test_batch_refused_after_2025_03_26(self) -> None:
        token = await self.token()
        session_id = await self.open_session(token, "2025-06-18")
        batch = [request(1, "tools/list"), request(2, "tools/list")]
        self.assert_rpc_error(await self.post(token, batch, session_id), 400, -32600)
        notifications = [notification("notifications/initialized")]
        self.assert_rpc_error(await self.post(token, notifications, session_id), 400)

    async def test_batch_in_a_2025_03_26_session(self) -> None:
        token = await self.token()
        reply, session_id = await self.initialize(token, "2025-03-26")
        self.assertEqual(reply.json()["result"]["protocolVersion"], "2025-03-26")
        only_notifications = [
            notification("notifications/initialized"),
            notification("notifications/roots/list_changed"),
        ]
        accepted = await self.post(token, only_notifications, session_id)
        self.assertEqual(accepted.code, 202)
        self.assertEqual(bytes(accepted.body), b"")

        both = await self.post(
            token,
            [tool("a", "echo", {"n": 1}), notification("x/y"), request("b", "tools/list")],
            session_id,
        )
        self.assertEqual(both.code, 200)
        self.assertTrue(both.is_sse)
        by_id = {e["id"]: e for e in both.events}
        self.assertEqual(set(by_id), {"a", "b"})
        self.assertEqual(len(both.events), 2)
        self.assertEqual(json.loads(tool_text(by_id["a"])), {"n": 1})
        self.assertIn("tools", by_id["b"]["result"])
        # An empty batch is invalid; an initialize in a batch is refused
        # under its own id, and the rest of the batch is served.
        self.assert_rpc_error(await self.post(token, [], session_id), 400)
        mixed = await self.post(token, [initialize(9), request(10, "tools/list")], session_id)
        self.assertEqual(mixed.code, 200)
        by_id = {e["id"]: e for e in mixed.events}
        self.assertEqual(by_id[9]["error"]["code"], -32600)
        self.assertIn("tools", by_id[10]["result"])
