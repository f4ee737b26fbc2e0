"""
Every request ends and no user starves the others (issue 10): messages a
child could not answer are refused under their own id, requests have a
deadline, a client that goes away is forgotten, a child that stops
answering is ended, and one user's processes, open exchanges and
descriptors are bounded.  A real broker on loopback, the scripted child
behind it, raw HTTP in front.
"""

from __future__ import annotations

import gc
import json
import os
import signal
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import deferLater
from twisted.web.server import Request

from fjmcp.http.streamable import BatchExchange, PostExchange
from fjmcp.mcp import resources
from tests.helpers import wait_until
from tests.test_sessions import (
    PROMPT,
    Reply,
    SessionTestCase,
    initialize,
    notification,
    request,
    tool,
    tool_text,
    within,
)


def answer_of(reply: Reply) -> dict[str, Any]:
    """
    The JSON-RPC answer of a finished POST (its last event on a stream).
    """
    answer: dict[str, Any] = reply.events[-1] if reply.is_sse else reply.json()
    return answer


class InvalidMessageTests(SessionTestCase):
    """
    What forgejo-mcp could only answer with C{"id": null} (which no client can
    place) never reaches it: the broker answers, under the request's id.
    """

    async def test_method_that_is_not_a_string(self) -> None:
        token = await self.token()
        session_id = await self.open_session(token)
        body = {"jsonrpc": "2.0", "id": 1, "method": 1}
        for sid in (session_id, None):
            answer = self.assert_rpc_error(await self.post(token, body, sid), 400, -32600)
            self.assertEqual(answer["id"], 1)
            self.assertIn('"method"', answer["error"]["message"])
        bad_params = {"jsonrpc": "2.0", "id": "p", "method": "tools/list", "params": "x"}
        answer = self.assert_rpc_error(await self.post(token, bad_params, session_id), 400)
        self.assertEqual(answer["id"], "p")
        # An id that cannot be echoed gets null.
        for bad_id in (1.5, True, {"a": 1}, [1]):
            body = {"jsonrpc": "2.0", "id": bad_id, "method": "tools/list"}
            answer = self.assert_rpc_error(await self.post(token, body, session_id), 400, -32600)
            self.assertIsNone(answer["id"])
        await self.rpc(token, session_id, request(2, "tools/list"))

    async def test_numbers_no_peer_can_read(self) -> None:
        token = await self.token()
        session_id = await self.open_session(token)
        for number in (b"NaN", b"Infinity", b"-Infinity", b"1e999"):
            body = (
                b'{"jsonrpc":"2.0","id":3,"method":"tools/call",'
                b'"params":{"name":"echo","arguments":{"n":' + number + b"}}}"
            )
            answer = self.assert_rpc_error(await self.post(token, body, session_id), 400, -32700)
            self.assertIn("Parse error", answer["error"]["message"])
        self.assertEqual(self.session_object(session_id).router.in_flight, 0)
        echoed = await self.rpc(token, session_id, tool(4, "echo", {"n": 1.5}))
        self.assertEqual(json.loads(tool_text(echoed)), {"n": 1.5})

    async def test_text_that_is_not_unicode(self) -> None:
        token = await self.token()
        session_id = await self.open_session(token)
        for body in (
            b'{"jsonrpc":"2.0","id":"\\ud800","method":"tools/list"}',
            b'{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"\\udfff"}}',
            b'{"jsonrpc":"2.0","id":5,"method":"tools/list","params":{"x":"\xff"}}',
        ):
            self.assert_rpc_error(await self.post(token, body, session_id), 400, -32700)
        # Pairs of surrogate escapes are just characters.
        paired = b'{"jsonrpc":"2.0","id":"\\ud83d\\ude00","method":"tools/list"}'
        reply = await self.post(token, paired, session_id)
        self.assertEqual(reply.code, 200)
        self.assertEqual(answer_of(reply)["id"], "\U0001f600")

    async def test_deep_nesting(self) -> None:
        token = await self.token()
        session_id = await self.open_session(token)
        for depth in (100, 100_000):
            body = b'{"jsonrpc":"2.0","id":6,"method":"tools/list","params":{"a":'
            body += b"[" * depth + b"]" * depth + b"}}"
            answer = self.assert_rpc_error(await self.post(token, body, session_id), 400)
            self.assertIn("nested deeper", answer["error"]["message"])
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_batch_elements_are_answered_one_by_one(self) -> None:
        token = await self.token()
        session_id = await self.open_session(token, "2025-03-26")
        batch = [
            tool("a", "echo", {"n": 1}),
            {"jsonrpc": "2.0", "id": "b", "method": 1},
            {"jsonrpc": "2.0", "id": 2.5, "method": "tools/list"},
            {"jsonrpc": "1.0", "id": "c", "method": "tools/list"},
            notification("notifications/roots/list_changed"),
        ]
        reply = await self.post(token, batch, session_id)
        self.assertEqual(reply.code, 200)
        ids = sorted(json.dumps(e["id"]) for e in reply.events)
        self.assertEqual(ids, sorted(['"a"', '"b"', '"c"', "null"]))
        by_id = {json.dumps(e["id"]): e for e in reply.events}
        self.assertEqual(json.loads(tool_text(by_id['"a"'])), {"n": 1})
        for refused in ('"b"', '"c"', "null"):
            self.assertEqual(by_id[refused]["error"]["code"], -32600)
        nan_batch = b'[{"jsonrpc":"2.0","id":"d","method":"tools/list","params":{"x":NaN}}]'
        self.assert_rpc_error(await self.post(token, nan_batch, session_id), 400, -32700)

    async def test_a_refused_initialize_leaves_no_session(self) -> None:
        token = await self.token()
        for body in (
            b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"capabilities":NaN}}',
            b'{"jsonrpc":"2.0","id":"\\udc00","method":"initialize","params":{}}',
            b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":"x"}',
        ):
            reply = await self.post(token, body)
            self.assertEqual(reply.code, 400, bytes(reply.body))
            self.assertIsNone(reply.session_id)
        self.assertEqual(len(self.broker.sessions), 0)
        self.assertEqual(len(self.broker.sessions._children), 0)


class DeadlineTests(SessionTestCase):
    """
    No request waits longer than --request-timeout.
    """

    async def test_a_request_the_child_never_answers(self) -> None:
        self.use_broker(request_timeout=1.0)
        token = await self.token()
        session_id = await self.open_session(token)
        session = self.session_object(session_id)
        # Not awaited: a JSON answer's headers come with the answer.
        pending = self.start("POST", token, tool(7, "hang"), session_id)
        # The child keeps answering other requests meanwhile: it is slow on
        # one call, not stuck, so its session lives on.
        for i in range(4):
            await deferLater(reactor, 0.3, lambda: None)
            await self.rpc(token, session_id, request(100 + i, "ping"))
        hanging = await (await pending).finished()
        answer = self.assert_rpc_error(hanging, 200, -32001)
        self.assertEqual(answer["id"], 7)
        self.assertIn("timed out", answer["error"]["message"])
        self.assertEqual(session.router.in_flight, 0)
        # ... and the child was told to stop working on it.
        cancelled = json.loads(tool_text(await self.rpc(token, session_id, tool(8, "cancelled"))))
        self.assertEqual(len(cancelled), 1)
        self.assertTrue(self.live(session_id))

    async def test_a_child_that_says_nothing_is_ended(self) -> None:
        self.use_broker(request_timeout=1.0)
        token = await self.token()
        session_id = await self.open_session(token)
        child = self.session_object(session_id).child
        reply = await self.post(token, tool(9, "hang"), session_id)
        self.assertEqual(reply.json()["error"]["code"], -32001)
        await within_exit(child.protocol.exited)
        await self.assert_gone(token, session_id)

    async def test_a_stopped_child(self) -> None:
        """
        SIGSTOP: the child neither answers nor dies.  Its callers get an
        error at the deadline, and the child is ended (SIGKILL reaches a
        stopped process).
        """
        self.use_broker(request_timeout=1.0)
        token = await self.token()
        session_id = await self.open_session(token)
        child = self.session_object(session_id).child
        pid = child.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        self.addCleanup(_kill_quietly, pid)
        started = reactor.seconds()
        replies = await DeferredList(
            [self.start("POST", token, tool(i, "echo"), session_id) for i in (1, 2)],
            fireOnOneErrback=True,
        )
        for i, (_, reply) in enumerate(replies, start=1):
            await reply.finished()
            # The first deadline ends the session; the other request ends
            # with it (its own deadline was due in the same instant).
            answer = self.assert_rpc_error(reply, 200)
            self.assertEqual(answer["id"], i)
        self.assertLess(reactor.seconds() - started, 1.0 + PROMPT)
        await within_exit(child.protocol.exited)
        await self.assert_gone(token, session_id)


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


async def within_exit(exited: Deferred[Any]) -> None:
    """
    Wait for a child's exit (it may have happened already).
    """
    done: Deferred[None] = Deferred()

    def relay(result: Any) -> Any:
        if not done.called:
            done.callback(None)
        return result

    exited.addBoth(relay)
    await within(done)


class DisconnectTests(SessionTestCase):
    """
    The broker keeps no events for a client to resume: when a client goes
    away, its requests are forgotten and the child is told.
    """

    async def test_a_client_that_goes_away(self) -> None:
        token = await self.token()
        session_id = await self.open_session(token)
        router = self.session_object(session_id).router
        pending = self.start("POST", token, tool(11, "hang"), session_id)
        await wait_until(lambda: router.in_flight == 1)
        user = self.session_object(session_id).user_id
        mcp = self.broker.mcp
        self.assertEqual(mcp.open_exchanges(user), 1)
        pending.cancel()
        self.failureResultOf(pending)
        await wait_until(lambda: router.in_flight == 0)
        await wait_until(lambda: mcp.open_exchanges(user) == 0)
        cancelled = json.loads(tool_text(await self.rpc(token, session_id, tool(12, "cancelled"))))
        self.assertEqual(len(cancelled), 1)

    async def test_a_client_that_goes_away_during_initialize(self) -> None:
        """
        It never learnt the session's id, so nobody can use that session:
        it ends at once, not at idle reaping.
        """
        self.use_broker(child=["slow-initialize"])
        token = await self.token()
        pending = self.start("POST", token, initialize(1))
        await wait_until(lambda: len(self.broker.sessions) == 1)
        pending.cancel()
        self.failureResultOf(pending)
        await wait_until(lambda: len(self.broker.sessions) == 0)
        await wait_until(lambda: len(self.broker.sessions._children) == 0)


class CapTests(SessionTestCase):
    async def test_requests_in_flight_per_user(self) -> None:
        self.use_broker(max_requests_per_user=2)
        alice = await self.token("alice")
        bob = await self.token("bob")
        mine = await self.open_session(alice)
        bobs = await self.open_session(bob)
        user = self.session_object(mine).user_id
        held = [self.start("POST", alice, tool(i, "hang"), mine) for i in (1, 2)]
        await wait_until(lambda: self.broker.mcp.open_exchanges(user) == 2)
        refused = await self.post(alice, tool(3, "echo"), mine)
        answer = self.assert_rpc_error(refused, 429)
        self.assertEqual(answer["id"], 3)
        self.assertIn("Too many requests in flight", answer["error"]["message"])
        self.assertEqual(refused.headers.getRawHeaders(b"retry-after"), [b"5"])
        stream = await (await self.send("GET", alice, None, mine)).finished()
        self.assertEqual(stream.code, 429)
        self.assert_rpc_error(await self.post(alice, initialize(4)), 429)
        # Notifications hold nothing open and still go through.
        self.assertEqual(
            (await self.post(alice, notification("notifications/roots/list_changed"), mine)).code,
            202,
        )
        # Another user is not affected.
        await self.rpc(bob, bobs, tool(5, "echo"))
        for d in held:
            d.cancel()
            self.failureResultOf(d)
        await wait_until(lambda: self.broker.mcp.open_exchanges(user) == 0)
        await self.rpc(alice, mine, tool(6, "echo"))

    async def test_concurrent_initializes_do_not_multiply_processes(self) -> None:
        self.use_broker(max_sessions_per_user=2, max_children_per_user=2, max_sessions=20)
        alice = await self.token("alice")
        bob = await self.token("bob")
        most = _watch_processes(self)
        replies = await DeferredList(
            [self.start("POST", alice, initialize(i)) for i in range(40)], fireOnOneErrback=True
        )
        codes = []
        for _, reply in replies:
            await reply.finished()
            codes.append(reply.code)
            if reply.code == 503:
                self.assertIsNotNone(reply.headers.getRawHeaders(b"retry-after"))
        self.assertLessEqual(set(codes), {200, 503})
        self.assertIn(503, codes)
        user = self.broker.sessions.of_user
        self.assertLessEqual(max(most), 2 * 2, "a user's processes, stopping ones included")
        self.assertLessEqual(len(user(_alice_id(self))), 2)
        # Bob gets his session all the same.
        await self.open_session(bob)

    async def test_out_of_descriptors(self) -> None:
        token = await self.token()
        session_id = await self.open_session(token)
        self.broker.sessions._budget = resources.Budget(count=lambda: 1000, cap=lambda: 1024)
        refused = await self.post(token, initialize(2))
        answer = self.assert_rpc_error(refused, 503)
        self.assertIn("file descriptors", answer["error"]["message"])
        self.assertIsNotNone(refused.headers.getRawHeaders(b"retry-after"))
        # Sessions that exist go on working.
        await self.rpc(token, session_id, tool(3, "echo"))

    async def test_unused_sessions_are_reaped_sooner(self) -> None:
        self.use_broker(session_unused_timeout=0.3)
        token = await self.token()
        unused = await self.open_session(token)
        used = await self.open_session(token)
        await self.rpc(token, used, request(1, "tools/list"))
        await deferLater(reactor, 0.5, lambda: None)
        self.broker.sessions.reap()
        self.assertFalse(self.live(unused))
        self.assertTrue(self.live(used))


def _held() -> int:
    """
    How many HTTP requests and /mcp exchanges are alive in this process.
    """
    gc.collect()
    kinds = (Request, PostExchange, BatchExchange)
    return sum(1 for o in gc.get_objects() if isinstance(o, kinds))


def _alice_id(test: SessionTestCase) -> int:
    ids = {s.user_id for s in test.broker.sessions._sessions.values() if s.user_login == "alice"}
    return ids.pop() if ids else -1


def _watch_processes(test: SessionTestCase) -> list[int]:
    """
    The supervisor's process count, recorded after every spawn.
    """
    counts: list[int] = [0]
    supervisor = test.broker.sessions._children
    spawn = supervisor.spawn

    def counting(*args: Any, **kwargs: Any) -> Any:
        child = spawn(*args, **kwargs)
        counts.append(len(supervisor))
        return child

    supervisor.spawn = counting  # type: ignore[method-assign]
    return counts


class FloodTests(SessionTestCase):
    """
    One user floods; another keeps working; the broker's descriptors and
    processes stay within bounds and come back when the flood ends.
    """

    timeout = 240

    async def test_one_user_floods_another_keeps_working(self) -> None:
        self.use_broker(
            request_timeout=3.0, max_requests_per_user=20, max_sessions_per_user=3, max_sessions=10
        )
        # A wave's connections all arrive before the reactor next accepts;
        # the test broker's listener has a deep enough queue for them
        # (tests/broker_support.py), so this times the broker, not TCP.
        alice = await self.token("alice")
        bob = await self.token("bob")
        alices = await self.open_session(alice)
        bobs = await self.open_session(bob)
        await self.rpc(bob, bobs, tool(0, "echo"))
        baseline_fds = resources.in_use()
        baseline_objects = _held()
        most = _watch_processes(self)
        peak_fds = [baseline_fds]

        def sample() -> None:
            peak_fds.append(resources.in_use())

        from twisted.internet.task import LoopingCall

        sampler = LoopingCall(sample)
        sampler.start(0.05)
        self.addCleanup(lambda: sampler.running and sampler.stop())

        # Generous: on two busy cores the flood's own connections queue.
        wait = 120.0
        codes: dict[int, int] = {}
        # A thousand requests, in waves of 100 at once, the first two with
        # fifty initializes each beside them.
        for wave in range(10):
            flood = [
                self.start("POST", alice, tool(wave * 1000 + i, "hang"), alices, timeout=wait)
                for i in range(100)
            ]
            if wave < 2:
                flood += [
                    self.start("POST", alice, initialize(wave * 100 + i), timeout=wait)
                    for i in range(50)
                ]
            for i in range(2):
                await self.rpc(bob, bobs, tool(wave * 10 + i + 1, "echo", {"i": i}))
            for reply in await DeferredList(flood, fireOnOneErrback=True, consumeErrors=True):
                finished = await reply[1].finished(timeout=wait)
                codes[finished.code] = codes.get(finished.code, 0) + 1
        sampler.stop()
        # 404: the flooded session ended when its child had answered nothing
        # by the deadline; alice's later requests on it find it gone.
        self.assertLessEqual(set(codes), {200, 404, 429, 503}, codes)
        self.assertEqual(sum(codes.values()), 1100)
        self.assertGreater(codes.get(429, 0), 0, codes)
        self.assertLessEqual(max(most), 10 + 3)
        # Every exchange ended; nothing of the flood is held.
        await wait_until(lambda: self.broker.mcp.open_exchanges(_alice_id(self)) == 0)
        for session in self.broker.sessions._sessions.values():
            self.assertEqual(session.router.in_flight, 0)
        await wait_until(lambda: len(self.broker.sessions._children) <= 2 + 3)
        # Descriptors come back (within the sessions alice may keep).
        await wait_until(
            lambda: resources.in_use() <= baseline_fds + 3 * resources.PER_CHILD + 8,
            timeout=30,
        )
        await self.rpc(bob, bobs, tool(99, "echo"))
        # Memory: nothing of the flood's thousand exchanges is still held.
        await wait_until(lambda: _held() <= baseline_objects)
