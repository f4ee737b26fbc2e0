"""
`/mcp` for MCP 2026-07-28 (stateless) clients, over real HTTP through the
broker the daemon builds, with the scripted child: server/discover from the
child's own initialize, requests served by the grant's warm child and
stamped as the revision requires, the envelope and header checks in the
revision's order, errors under the request's id, one user's requests never
on another's child, and the warm child hibernating and waking like any
session's.
"""

from __future__ import annotations

import json
from typing import Any

from tests.broker_support import REDIRECT, run_sdk_client
from tests.helpers import process_gone, wait_until
from tests.test_sdk_oauth import SCRIPT
from tests.test_sessions import Reply, SessionTestCase, tool_text

VERSION = "2026-07-28"
CAPABILITIES: dict[str, Any] = {"sampling": {}}


def envelope(
    id: Any,
    method: str,
    params: dict[str, Any] | None = None,
    version: str = VERSION,
    capabilities: dict[str, Any] = CAPABILITIES,
) -> dict[str, Any]:
    body = dict(params or {})
    body["_meta"] = {
        "io.modelcontextprotocol/protocolVersion": version,
        "io.modelcontextprotocol/clientCapabilities": capabilities,
        "io.modelcontextprotocol/clientInfo": {"name": "test_stateless", "version": "1"},
    }
    return {"jsonrpc": "2.0", "id": id, "method": method, "params": body}


def routing_headers(message: dict[str, Any]) -> dict[bytes, bytes]:
    """
    The headers a 2026-07-28 client sends with C{message}.
    """
    params = message.get("params", {})
    headers = {
        b"MCP-Protocol-Version": params["_meta"][
            "io.modelcontextprotocol/protocolVersion"
        ].encode(),
        b"Mcp-Method": message["method"].encode(),
    }
    if message["method"] in ("tools/call", "prompts/get"):
        headers[b"Mcp-Name"] = params["name"].encode()
    return headers


class StatelessTests(SessionTestCase):
    async def stateless(
        self,
        token: str,
        message: dict[str, Any],
        headers: dict[bytes, bytes] | None = None,
    ) -> Reply:
        sent = routing_headers(message) if headers is None else headers
        return await self.post(token, message, headers=sent)

    async def answer(self, token: str, message: dict[str, Any]) -> dict[str, Any]:
        reply = await self.stateless(token, message)
        self.assertEqual(reply.code, 200, bytes(reply.body))
        self.assertIsNone(reply.session_id)
        response: dict[str, Any] = reply.events[-1] if reply.is_sse else reply.json()
        self.assertEqual(response["id"], message["id"])
        return response

    async def whoami(self, token: str, id: int = 9) -> dict[str, Any]:  # type: ignore[override]
        response = await self.answer(token, envelope(id, "tools/call", {"name": "whoami"}))
        info: dict[str, Any] = json.loads(tool_text(response))
        return info

    async def test_discover_list_call(self) -> None:
        alice = await self.token("alice")
        discovered = (await self.answer(alice, envelope(1, "server/discover")))["result"]
        self.assertEqual(discovered["supportedVersions"], [VERSION])
        self.assertEqual(discovered["resultType"], "complete")
        self.assertEqual((discovered["ttlMs"], discovered["cacheScope"]), (0, "private"))
        # The child's own capabilities (list changes come through
        # subscriptions/listen) and identity.
        self.assertEqual(discovered["capabilities"], {"tools": {"listChanged": True}})
        self.assertEqual(
            discovered["_meta"]["io.modelcontextprotocol/serverInfo"],
            {"name": "scripted-child", "version": "1"},
        )
        listed = (await self.answer(alice, envelope("two", "tools/list")))["result"]
        self.assertIn("echo", {t["name"] for t in listed["tools"]})
        self.assertEqual(
            (listed["resultType"], listed["ttlMs"], listed["cacheScope"]),
            ("complete", 0, "private"),
        )
        called = await self.answer(
            alice, envelope(3, "tools/call", {"name": "echo", "arguments": {"say": "héllo"}})
        )
        self.assertEqual(called["result"]["resultType"], "complete")
        self.assertNotIn("ttlMs", called["result"])
        self.assertEqual(json.loads(tool_text(called)), {"say": "héllo"})
        # The envelope stayed with the broker: the child got its own kind
        # of request (the echo tool would have shown extra arguments, and
        # _meta is checked below through whoami's token).
        info = await self.whoami(alice)
        self.assertEqual(info["url"], self.broker.forgejo_url)

    async def test_one_warm_child_per_grant_never_shared(self) -> None:
        alice = await self.token("alice")
        bob = await self.token("bob")
        a1 = await self.whoami(alice, 1)
        b1 = await self.whoami(bob, 2)
        a2 = await self.whoami(alice, 3)
        self.assertEqual(a1["pid"], a2["pid"])
        self.assertNotEqual(a1["pid"], b1["pid"])
        self.assertNotEqual(a1["token"], b1["token"])
        # Each user's child holds that user's Forgejo token.
        for info, login in ((a1, "alice"), (b1, "bob")):
            owner = self.broker.forge.user_for_access_token(info["token"])
            assert owner is not None
            self.assertEqual(owner[0].login, login)
        # No client can reach the broker's own sessions by id.
        for session in self.broker.sessions._sessions.values():
            self.assertTrue(session.stateless)
            refused = await self.post(
                alice, {"jsonrpc": "2.0", "id": 5, "method": "tools/list"}, session.id
            )
            self.assert_rpc_error(refused, 404)

    async def test_header_and_envelope_checks_in_order(self) -> None:
        alice = await self.token("alice")
        call = envelope(7, "tools/call", {"name": "echo", "arguments": {}})
        cases: list[tuple[dict[str, Any], dict[bytes, bytes] | None, int, int]] = [
            # No envelope version: invalid params.
            (
                {"jsonrpc": "2.0", "id": 7, "method": "tools/list", "params": {"_meta": {}}},
                {b"MCP-Protocol-Version": VERSION.encode(), b"Mcp-Method": b"tools/list"},
                400,
                -32602,
            ),
            # Header and body disagree: the method, its case, the name.
            (call, {**routing_headers(call), b"Mcp-Method": b"tools/list"}, 400, -32020),
            (call, {**routing_headers(call), b"Mcp-Method": b"TOOLS/CALL"}, 400, -32020),
            (call, {**routing_headers(call), b"Mcp-Name": b"whoami"}, 400, -32020),
            (
                call,
                {b"MCP-Protocol-Version": VERSION.encode(), b"Mcp-Method": b"tools/call"},
                400,
                -32020,
            ),
            # The header mismatch is found before the unsupported version.
            (
                envelope(7, "tools/list", version="v999"),
                {b"MCP-Protocol-Version": VERSION.encode(), b"Mcp-Method": b"tools/list"},
                400,
                -32020,
            ),
            (envelope(7, "tools/list", version="v999"), None, 400, -32022),
            # Removed by the revision, or served by nothing.
            (envelope(7, "initialize"), None, 404, -32601),
            (envelope(7, "ping"), None, 404, -32601),
            (envelope(7, "unknown/method"), None, 404, -32601),
        ]
        for message, headers, status, code in cases:
            reply = await self.stateless(alice, message, headers)
            body = self.assert_rpc_error(reply, status, code)
            self.assertEqual(body["id"], 7, (message, headers))
        unsupported = await self.stateless(alice, envelope(8, "tools/list", version="v999"))
        self.assertEqual(
            unsupported.json()["error"]["data"], {"supported": [VERSION], "requested": "v999"}
        )
        # A name outside plain ASCII comes base64-encoded, and matches.
        odd = envelope(9, "tools/call", {"name": "écho", "arguments": {}})
        headers = {**routing_headers(odd), b"Mcp-Name": b"=?base64?w6ljaG8=?="}
        reply = await self.stateless(alice, odd, headers)
        # The child's own answer (it has no such tool), not a mismatch.
        self.assert_rpc_error(reply, 400, -32602)
        self.assertEqual(reply.json()["error"]["message"], "unknown tool")
        # None of this started a child before it was needed.
        self.assertLessEqual(self.broker.sessions.children_running(), 1)

    async def listen(self, token: str, id: Any, **asked: bool) -> Reply:
        message = envelope(id, "subscriptions/listen", {"notifications": asked})
        reply = await self.send("POST", token, message, headers=routing_headers(message))
        self.assertEqual(reply.code, 200)
        self.assertTrue(reply.is_sse)
        return reply

    async def test_listen_streams_the_childs_list_changes(self) -> None:
        alice = await self.token("alice")
        bob = await self.token("bob")
        tools = await self.listen(alice, "L1", toolsListChanged=True, promptsListChanged=True)
        prompts = await self.listen(alice, "L2", promptsListChanged=True)
        bobs = await self.listen(bob, "L3", toolsListChanged=True)
        ack = await tools.event(lambda e: True)
        # First, what the stream will carry: the list changes asked for that
        # the child announces (the scripted child has no prompts).
        self.assertEqual(
            ack,
            {
                "jsonrpc": "2.0",
                "method": "notifications/subscriptions/acknowledged",
                "params": {
                    "_meta": {"io.modelcontextprotocol/subscriptionId": "L1"},
                    "notifications": {"toolsListChanged": True},
                },
            },
        )
        self.assertEqual((await prompts.event(lambda e: True))["params"]["notifications"], {})
        await self.answer(alice, envelope(5, "tools/call", {"name": "change"}))
        changed = await tools.event(lambda e: e.get("method") != ack["method"])
        self.assertEqual(
            changed,
            {
                "jsonrpc": "2.0",
                "method": "notifications/tools/list_changed",
                "params": {"_meta": {"io.modelcontextprotocol/subscriptionId": "L1"}},
            },
        )
        # Not to the stream that did not ask, nor to another user's.
        await self.whoami(alice, 6)
        self.assertEqual(len(prompts.events), 1)
        self.assertEqual(len(bobs.events), 1)
        self.assertFalse(tools.done.called)

    async def test_listen_ends_with_its_grant(self) -> None:
        self.use_broker(revocation_interval=3600)
        tokens = await self.login_tokens("alice")
        stream = await self.listen(tokens["access_token"], 11, toolsListChanged=True)
        await stream.event(lambda e: True)
        await self.revoke_token(tokens)
        await stream.finished()
        last = stream.events[-1]
        self.assertEqual(last["id"], 11)
        self.assertEqual(last["result"]["resultType"], "complete")
        self.assertEqual(last["result"]["_meta"]["io.modelcontextprotocol/subscriptionId"], 11)

    async def test_no_stream_no_delete(self) -> None:
        alice = await self.token("alice")
        headers = {b"MCP-Protocol-Version": VERSION.encode()}
        for method in ("GET", "DELETE"):
            reply = await (await self.send(method, alice, None, headers=headers)).finished()
            self.assert_rpc_error(reply, 405)
            self.assertEqual(reply.headers.getRawHeaders(b"allow"), [b"POST"])

    async def test_a_question_the_client_cannot_answer_is_refused_not_hung(self) -> None:
        """
        A client that did not declare sampling is not asked for it: the
        child is told at once, and the call ends.
        """
        alice = await self.token("alice")
        call = envelope(4, "tools/call", {"name": "ask"}, capabilities={})
        called = await self.answer(alice, call)
        # The scripted child's tool shows the answer it got.
        self.assertEqual(json.loads(tool_text(called))["code"], -32601)

    async def ask(self, token: str, id: Any = 1) -> tuple[dict[str, Any], str, str]:
        """
        Call the scripted child's tool that asks its client for a sampling:
        the question that comes back, its key and the request state.
        """
        result = (await self.answer(token, envelope(id, "tools/call", {"name": "ask"})))["result"]
        self.assertEqual(result["resultType"], "input_required")
        self.assertNotIn("ttlMs", result)
        ((key, question),) = result["inputRequests"].items()
        self.assertEqual(question["method"], "sampling/createMessage")
        self.assertEqual(question["params"]["maxTokens"], 5)
        return question, key, result["requestState"]

    def follow_up(self, id: Any, state: Any, responses: Any, name: str = "ask") -> dict[str, Any]:
        return envelope(
            id,
            "tools/call",
            {"name": name, "inputResponses": responses, "requestState": state},
        )

    async def test_the_childs_question_goes_to_the_client_and_back(self) -> None:
        alice = await self.token("alice")
        _, key, state = await self.ask(alice)
        answer = {"role": "assistant", "content": {"type": "text", "text": "4"}, "model": "m"}
        done = await self.answer(alice, self.follow_up(2, state, {key: answer}))
        self.assertEqual(done["result"]["resultType"], "complete")
        # The child got the client's answer as the result of its request.
        self.assertEqual(json.loads(tool_text(done)), answer)

    async def test_the_request_state_is_its_owners_once_and_for_that_call(self) -> None:
        alice = await self.token("alice")
        bob = await self.token("bob")
        _, key, state = await self.ask(alice)
        answer = {"role": "assistant", "content": {"type": "text", "text": "4"}, "model": "m"}
        refusals = [
            (bob, self.follow_up(3, state, {key: answer})),
            (alice, self.follow_up(4, state + "x", {key: answer})),
            (alice, self.follow_up(5, state, {key: answer}, name="echo")),
            (alice, self.follow_up(6, state, {key: 5})),
        ]
        for token, message in refusals:
            reply = await self.stateless(token, message)
            body = self.assert_rpc_error(reply, 400, -32602)
            self.assertEqual(body["id"], message["id"])
        # None of that used it up: its owner's follow-up goes through, once.
        done = await self.answer(alice, self.follow_up(7, state, {key: answer}))
        self.assertEqual(json.loads(tool_text(done)), answer)
        again = await self.stateless(alice, self.follow_up(8, state, {key: answer}))
        self.assertEqual(
            self.assert_rpc_error(again, 400, -32602)["error"]["data"],
            {"reason": "invalid_request_state"},
        )

    async def test_the_python_sdk_answers_the_childs_question(self) -> None:
        """
        The MCP Python SDK's client, pinned to 2026-07-28, gets the child's
        sampling request as an input_required result, answers it through
        its sampling callback and repeats the call: the tool gets the answer.
        """
        summary, stderr = await run_sdk_client(
            self,
            [
                SCRIPT,
                self.broker.url + "/mcp",
                "--redirect-uri",
                REDIRECT,
                "--mode",
                VERSION,
                "--sampling-answer",
                "four",
                "--call",
                "ask",
                "{}",
            ],
        )
        self.assertTrue(summary["initialize"]["ok"], (summary, stderr))
        (call,) = summary["initialize"]["calls"]
        (text,) = call["text"]
        got = json.loads(text)
        self.assertEqual(got["content"], {"type": "text", "text": "four"})
        self.assertEqual(got["role"], "assistant")

    async def test_a_question_nobody_answers_expires(self) -> None:
        """
        A client that never comes back: after the parked call's lifetime
        its question is refused and its call cancelled in the child, so
        nothing keeps the grant's child busy, and the state is void.
        """
        # The lifetime is the broker's constant (120 s); shortened here.
        self.broker.mcp._stateless._waits._lifetime = 0.3
        alice = await self.token("alice")
        _, key, state = await self.ask(alice)
        (session,) = self.broker.sessions._sessions.values()
        await wait_until(
            lambda: session.router.in_flight == 0 and session.router.server_requests_pending == 0,
            what="the parked call's end",
        )
        answer = {"role": "assistant", "content": {"type": "text", "text": "4"}, "model": "m"}
        late = await self.stateless(alice, self.follow_up(2, state, {key: answer}))
        self.assert_rpc_error(late, 400, -32602)
        # The child goes on serving.
        self.assertIn("pid", await self.whoami(alice, 3))

    async def test_a_client_gone_during_the_warm_start_leaves_no_orphan(self) -> None:
        """
        The first request's client goes away while the warm child starts:
        the start completes all the same and the next request uses it.
        """
        self.use_broker(child=["slow-initialize"])
        alice = await self.token("alice")
        message = envelope(1, "tools/list")
        first = self.start("POST", alice, message, headers=routing_headers(message))
        await wait_until(lambda: len(self.broker.sessions) == 1, what="the warm start")
        first.cancel()
        # The client saw its request fail (it went away).
        self.failureResultOf(first)
        (session,) = self.broker.sessions._sessions.values()
        await wait_until(lambda: session.handshake_result is not None, timeout=10)
        info = await self.whoami(alice, 2)
        self.assertEqual(info["pid"], session.child.pid)
        self.assertEqual(len(self.broker.sessions), 1)

    async def test_an_unanswered_question_is_asked_again(self) -> None:
        alice = await self.token("alice")
        question, key, state = await self.ask(alice)
        again = (await self.answer(alice, self.follow_up(2, state, {})))["result"]
        self.assertEqual(again["resultType"], "input_required")
        self.assertEqual(again["inputRequests"], {key: question})
        self.assertNotEqual(again["requestState"], state)
        answer = {"role": "assistant", "content": {"type": "text", "text": "4"}, "model": "m"}
        done = await self.answer(alice, self.follow_up(3, again["requestState"], {key: answer}))
        self.assertEqual(json.loads(tool_text(done)), answer)

    async def test_a_childs_request_with_others_in_flight_is_refused_too(self) -> None:
        """
        With several calls in flight on the grant's child, a request of the
        child's belongs to none of them that the broker could tell: it is
        refused to the child all the same, never left waiting.
        """
        alice = await self.token("alice")
        message = envelope(1, "tools/call", {"name": "slow", "arguments": {"delay": 1.5}})
        slow = self.start("POST", alice, message, headers=routing_headers(message))
        await wait_until(
            lambda: any(s.router.in_flight for s in self.broker.sessions._sessions.values())
        )
        asked = await self.answer(alice, envelope(2, "tools/call", {"name": "ask"}))
        self.assertEqual(json.loads(tool_text(asked))["code"], -32601)
        # Answered while the slow call was still in flight.
        self.assertTrue(any(s.router.in_flight for s in self.broker.sessions._sessions.values()))
        reply = await (await slow).finished()
        self.assertEqual(reply.code, 200)

    async def test_warm_child_hibernates_and_wakes(self) -> None:
        self.use_broker(session_hibernate_after=0.3)
        alice = await self.token("alice")
        first = await self.whoami(alice, 1)
        (session,) = self.broker.sessions._sessions.values()
        await wait_until(lambda: session.hibernating, what="hibernation")
        await wait_until(lambda: process_gone(first["pid"]), what="the child's exit")
        # Discovery needs no child: the handshake is known.
        discovered = await self.answer(alice, envelope(3, "server/discover"))
        self.assertEqual(discovered["result"]["supportedVersions"], [VERSION])
        self.assertTrue(session.hibernating)
        self.assertEqual(self.broker.sessions.children_running(), 0)
        again = await self.whoami(alice, 2)
        self.assertNotEqual(again["pid"], first["pid"])
        self.assertIs(next(iter(self.broker.sessions._sessions.values())), session)

    async def test_revoked_grant_ends_its_warm_child(self) -> None:
        self.use_broker(revocation_interval=3600)
        tokens = await self.login_tokens("alice")
        alice = tokens["access_token"]
        first = await self.whoami(alice, 1)
        bob = await self.token("bob")
        bobs = await self.whoami(bob, 2)
        await self.revoke_token(tokens)
        await wait_until(lambda: process_gone(first["pid"]), what="the warm child's end")
        reply = await self.stateless(alice, envelope(3, "tools/list"))
        self.assertEqual(reply.code, 401)
        # Another user's warm child is not touched.
        self.assertEqual((await self.whoami(bob, 4))["pid"], bobs["pid"])
