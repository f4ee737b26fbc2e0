"""
Sessions that outlive their child: an idle session's child is stopped and
the session stays; its next request starts a child with the session's
handshake replayed.  At the cap on running children, the least recently
used idle session hibernates to make room; a session busy with a request
never does.  Over real HTTP, with the scripted child.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor

from fjmcp.app.tap import store_location
from fjmcp.secrets.crypto import token_hash
from tests.helpers import process_gone, sleep, wait_until
from tests.store_engines import OnPostgreSQL, rows
from tests.store_engines import dump as database_dump
from tests.test_sessions import (
    SessionTestCase,
    initialize,
    notification,
    tool,
    tool_text,
    within,
)


class HibernationTests(SessionTestCase):
    async def pid(self, token: str, session_id: str) -> int:
        info = await self.whoami(token, session_id)
        pid: int = info["pid"]
        return pid

    async def test_an_idle_session_hibernates_and_wakes(self) -> None:
        self.use_broker(session_hibernate_after=0.3)
        alice = await self.token("alice")
        session_id = await self.open_session(alice)
        first = await self.pid(alice, session_id)
        session = self.session_object(session_id)
        await wait_until(lambda: session.hibernating, what="hibernation")
        await wait_until(lambda: process_gone(first), what="the child's exit")
        self.assertEqual(self.broker.sessions.children_running(), 0)
        self.assertTrue(self.live(session_id))
        # The same session id works; a new child serves it, with the
        # user's token, and the client's own request ids.
        info = await self.whoami(alice, session_id)
        self.assertNotEqual(info["pid"], first)
        self.assertEqual(info["url"], self.broker.forgejo_url)
        self.assertFalse(session.hibernating)
        echoed = await self.rpc(alice, session_id, tool(77, "echo", {"said": "hello"}))
        self.assertEqual(json.loads(tool_text(echoed)), {"said": "hello"})

    async def test_no_hibernation_with_a_request_in_flight(self) -> None:
        self.use_broker(session_hibernate_after=0.2)
        alice = await self.token("alice")
        session_id = await self.open_session(alice)
        await self.pid(alice, session_id)
        session = self.session_object(session_id)
        slow = self.start("POST", alice, tool(5, "slow", {"delay": 1.5}), session_id)
        reply = await (await within(slow)).finished()
        answer = reply.events[-1] if reply.is_sse else reply.json()
        self.assertEqual(answer["id"], 5)
        self.assertIn("result", answer)
        # It stayed awake all along: the slow call's child answered it.
        self.assertEqual(self.broker.sessions._sessions[session_id], session)
        await wait_until(lambda: session.hibernating, what="hibernation after the call")

    async def test_notifications_that_need_no_child_do_not_wake_it(self) -> None:
        self.use_broker(session_hibernate_after=0.2)
        alice = await self.token("alice")
        session_id = await self.open_session(alice)
        await self.pid(alice, session_id)
        session = self.session_object(session_id)
        await wait_until(lambda: session.hibernating, what="hibernation")
        reply = await self.post(alice, notification("notifications/cancelled"), session_id)
        self.assertEqual(reply.code, 202)
        self.assertTrue(session.hibernating)
        self.assertEqual(self.broker.sessions.children_running(), 0)

    async def test_a_get_stream_stays_open_across_hibernation(self) -> None:
        self.use_broker(session_hibernate_after=0.3)
        alice = await self.token("alice")
        session_id = await self.open_session(alice)
        await self.pid(alice, session_id)
        stream = await self.send("GET", alice, None, session_id)
        self.assertEqual(stream.code, 200)
        session = self.session_object(session_id)
        await wait_until(lambda: session.hibernating, what="hibernation")
        self.assertFalse(stream.done.called)
        await self.pid(alice, session_id)
        self.assertFalse(stream.done.called)
        await self.delete(alice, session_id)
        await stream.finished()

    async def test_the_least_recently_used_idle_session_makes_room(self) -> None:
        """
        Two children at most: a third session's child is started after the
        least recently used idle session hibernates; each session then still
        answers, waking in turn.
        """
        self.use_broker(max_children=2, session_hibernate_after=3600)
        alice = await self.token("alice")
        bob = await self.token("bob")
        a = await self.open_session(alice)
        b = await self.open_session(bob)
        await self.pid(alice, a)
        await self.pid(bob, b)
        c = await self.open_session(alice)
        self.assertTrue(self.session_object(a).hibernating)
        self.assertFalse(self.session_object(b).hibernating)
        self.assertEqual(self.broker.sessions.children_running(), 2)
        self.assertEqual((await self.whoami(alice, a))["url"], self.broker.forgejo_url)
        # a woke; b was now the least recently used.
        self.assertTrue(self.session_object(b).hibernating)
        self.assertEqual(self.broker.sessions.children_running(), 2)
        await self.pid(bob, b)
        await self.pid(alice, c)

    async def test_busy_children_are_never_stopped_for_room(self) -> None:
        self.use_broker(max_children=1, session_hibernate_after=3600)
        alice = await self.token("alice")
        bob = await self.token("bob")
        a = await self.open_session(alice)
        slow = self.start("POST", alice, tool(5, "slow", {"delay": 1.0}), a)
        await wait_until(lambda: self.session_object(a).router.in_flight == 1)
        refused = await self.post(bob, initialize(1))
        body = self.assert_rpc_error(refused, 503)
        self.assertEqual(body["id"], 1)
        self.assertIn("busy", body["error"]["message"])
        self.assertTrue(refused.headers.getRawHeaders(b"retry-after"))
        reply = await (await within(slow)).finished()
        answer: Any = reply.events[-1] if reply.is_sse else reply.json()
        self.assertIn("result", answer)

    async def test_a_users_own_idle_session_makes_room_at_their_cap(self) -> None:
        """
        At the per-user children cap, the user's own least recently used
        idle session hibernates, even with room under the broker's cap and
        another user's session idler still.
        """
        self.use_broker(max_children=10, max_children_per_user=2, session_hibernate_after=3600)
        alice = await self.token("alice")
        bob = await self.token("bob")
        bobs = await self.open_session(bob)
        await self.pid(bob, bobs)
        a = await self.open_session(alice)
        b = await self.open_session(alice)
        await self.pid(alice, a)
        await self.pid(alice, b)
        c = await self.open_session(alice)
        self.assertTrue(self.session_object(a).hibernating)
        self.assertFalse(self.session_object(b).hibernating)
        self.assertFalse(self.session_object(bobs).hibernating)
        self.assertEqual(self.broker.sessions.children_running(), 3)
        # a wakes in its turn, b (now alice's least recently used) makes room.
        await self.pid(alice, a)
        self.assertTrue(self.session_object(b).hibernating)
        await self.pid(alice, c)
        await self.pid(bob, bobs)

    async def test_one_users_busy_children_do_not_refuse_another_user(self) -> None:
        self.use_broker(max_children=10, max_children_per_user=1, session_hibernate_after=3600)
        alice = await self.token("alice")
        bob = await self.token("bob")
        a = await self.open_session(alice)
        slow = self.start("POST", alice, tool(5, "slow", {"delay": 1.0}), a)
        await wait_until(lambda: self.session_object(a).router.in_flight == 1)
        refused = await self.post(alice, initialize(1))
        body = self.assert_rpc_error(refused, 503)
        self.assertEqual(body["id"], 1)
        self.assertIn("all 1 of your MCP server processes are busy", body["error"]["message"])
        self.assertEqual(refused.headers.getRawHeaders(b"retry-after"), [b"1"])
        bobs = await self.open_session(bob)
        await self.pid(bob, bobs)
        reply = await (await within(slow)).finished()
        answer: Any = reply.events[-1] if reply.is_sse else reply.json()
        self.assertIn("result", answer)


class ResumeTests(SessionTestCase):
    """
    Sessions are kept in the store: after a broker restart the client's
    next request with the same session id is served by a new child, with
    the handshake replayed.
    """

    async def test_a_session_survives_a_restart(self) -> None:
        alice = await self.token("alice")
        bob = await self.token("bob")
        session_id = await self.open_session(alice)
        before = (await self.whoami(alice, session_id))["pid"]
        await self.broker.restart()
        self.assertFalse(self.live(session_id))
        # Not bob's to use, after a restart as before.
        refused = await self.post(bob, tool(3, "whoami"), session_id)
        self.assert_rpc_error(refused, 404)
        info = await self.whoami(alice, session_id)
        self.assertNotEqual(info["pid"], before)
        self.assertEqual(info["url"], self.broker.forgejo_url)
        self.assertTrue(self.live(session_id))
        echoed = await self.rpc(alice, session_id, tool(9, "echo", {"after": "restart"}))
        self.assertEqual(json.loads(tool_text(echoed)), {"after": "restart"})

    async def test_an_ended_session_stays_ended(self) -> None:
        alice = await self.token("alice")
        ended = await self.open_session(alice)
        await self.whoami(alice, ended)
        self.assertEqual((await self.delete(alice, ended)).code, 204)
        kept = await self.open_session(alice)
        await self.whoami(alice, kept)
        await self.broker.restart()
        self.assert_rpc_error(await self.post(alice, tool(3, "whoami"), ended), 404)
        # Deleting a kept session needs no child.
        self.assertEqual((await self.delete(alice, kept)).code, 204)
        self.assertEqual(self.broker.sessions.children_running(), 0)
        self.assert_rpc_error(await self.post(alice, tool(4, "whoami"), kept), 404)

    async def test_kept_by_digest_only(self) -> None:
        """
        A session is kept once its initialize succeeded, its id as a
        digest only.
        """
        alice = await self.token("alice")
        session_id = await self.open_session(alice)
        await self.whoami(alice, session_id)
        location = store_location(self.broker.config)
        [(count,)] = rows(location, "SELECT COUNT(*) FROM mcp_sessions")
        self.assertEqual(count, 1)
        self.assertNotIn(session_id.encode(), database_dump(location))

    async def test_a_session_another_node_took_over_stays_kept(self) -> None:
        """
        A client's initialize reaches one node and its next requests another
        (Caddy picks the node by the session id the first one made up): the
        second resumes the session and writes that use; the first, letting
        its unused copy go, leaves the record to the second.  Without a use
        elsewhere, letting go forgets the record as before.
        """
        self.use_broker(session_unused_timeout=0.3)
        alice = await self.token("alice")
        moved = await self.open_session(alice)
        stayed = await self.open_session(alice)
        location = store_location(self.broker.config)
        # What the other node's resume writes.
        await self.broker.store.touch_mcp_session(
            token_hash(moved), reactor.seconds() + 1, self.session_object(moved).family_id
        )
        await sleep(0.4)
        self.broker.sessions.reap()
        self.assertFalse(self.live(moved) or self.live(stayed))
        await wait_until(
            lambda: len(rows(location, "SELECT session_hash FROM mcp_sessions")) == 1,
            what="the unused session's record forgotten",
        )
        [(kept,)] = rows(location, "SELECT session_hash FROM mcp_sessions")
        self.assertEqual(bytes(kept), token_hash(moved))

    async def test_a_busy_session_stays_kept(self) -> None:
        """
        Every process on the database forgets the kept sessions idle longer
        than the idle timeout, wherever they run: a session in use keeps its
        record fresh, so neither another node nor this one after a restart
        forgets it while it is busy.  (The record said when the session
        started, until it hibernated or the broker stopped.)
        """
        self.use_broker(session_idle_timeout=2.0)
        alice = await self.token("alice")
        session_id = await self.open_session(alice)
        location = store_location(self.broker.config)
        for _ in range(6):
            await self.whoami(alice, session_id)
            await sleep(0.5)
            self.broker.sessions.reap()
        # Three seconds in, the session never idle for long: still kept.
        await sleep(0.2)
        [(count,)] = rows(location, "SELECT COUNT(*) FROM mcp_sessions")
        self.assertEqual(count, 1)
        await self.broker.restart()
        info = await self.whoami(alice, session_id)
        self.assertIn("pid", info)


class ResumeOnPostgreSQL(OnPostgreSQL, ResumeTests):
    """
    Kept sessions in PostgreSQL: resumed by a broker that never saw them.
    """
