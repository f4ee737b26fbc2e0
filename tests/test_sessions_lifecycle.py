"""
MCP sessions over the wire, continued: caps and reaping, what a
misbehaving or dying child does to its session (and to nobody else's), the
child's environment, and a thousand sessions without a leak.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.logger import Logger

from fjmcp.mcp.children import ChildExit
from tests.broker_support import SCRIPTED_CHILD
from tests.helpers import Answer, wait_until
from tests.test_sessions import (
    PROMPT,
    SessionTestCase,
    initialize,
    request,
    tool,
    tool_text,
    within,
)

log = Logger()


def alive(pid: int) -> bool:
    """
    Whether process C{pid} exists (a zombie counts: it is not reaped yet).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def zombie_child(pid: int) -> bool:
    """
    Whether C{pid} is a child of this process that nobody reaped.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)
    except FileNotFoundError:
        return False
    return int(fields["PPid"]) == os.getpid() and fields["State"].startswith("Z")


def restore_environ(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


class CapTests(SessionTestCase):
    async def test_per_user_cap_evicts_the_least_recently_used(self) -> None:
        self.use_broker(max_sessions_per_user=2)
        token = await self.token()
        first = await self.open_session(token)
        second = await self.open_session(token)
        # Using the first makes the second the least recently used.
        await self.rpc(token, first, request(2, "tools/list"))
        evicted = self.session_object(second)
        third = await self.open_session(token)
        await self.assert_gone(token, second)
        exit = await within(evicted.child.protocol.exited)
        self.assertIsInstance(exit, ChildExit)
        for live in (first, third):
            await self.rpc(token, live, request(3, "tools/list"))
        self.assertEqual(len(self.broker.sessions), 2)

    async def test_per_user_cap_is_per_user(self) -> None:
        self.use_broker(max_sessions_per_user=1)
        alice = await self.token("alice")
        bob = await self.token("bob")
        alices = await self.open_session(alice)
        bobs = await self.open_session(bob)
        await self.rpc(alice, alices, request(2, "tools/list"))
        await self.rpc(bob, bobs, request(2, "tools/list"))

    async def test_global_cap(self) -> None:
        self.use_broker(max_sessions=2)
        alice = await self.token("alice")
        bob = await self.token("bob")
        alices = await self.open_session(alice)
        bobs = await self.open_session(bob)
        full = await self.post(alice, initialize(7))
        body = self.assert_rpc_error(full, 503)
        self.assertEqual(body["id"], 7)
        self.assertEqual(full.headers.getRawHeaders(b"retry-after"), [b"30"])
        self.assertIsNone(full.session_id)
        # Nobody's session was sacrificed for it.
        await self.rpc(alice, alices, request(2, "tools/list"))
        await self.rpc(bob, bobs, request(2, "tools/list"))
        # Room again once one ends.
        self.assertEqual((await self.delete(bob, bobs)).code, 204)
        await self.open_session(alice)

    async def test_idle_sessions_are_reaped(self) -> None:
        self.use_broker(session_idle_timeout=0.5)
        token = await self.token()
        idle = await self.open_session(token)
        busy = await self.open_session(token)
        waiting = await self.open_session(token)
        # A request in flight keeps its session, however idle.
        asking = await self.send("POST", token, tool(1, "ask"), waiting)
        question = await asking.event(lambda e: e.get("method") == "sampling/createMessage")
        idle_child = self.session_object(idle).child
        cutoff = self.session_object(waiting).last_used + 0.5
        # Real time has to pass: the session manager reads the reactor's clock.
        await deferLater(reactor, max(0.0, cutoff - reactor.seconds()) + 0.1, lambda: None)
        await self.rpc(token, busy, request(2, "tools/list"))
        self.broker.sessions.reap()
        await self.assert_gone(token, idle)
        await within(idle_child.protocol.exited)
        await self.rpc(token, busy, request(3, "tools/list"))
        self.assertTrue(self.live(waiting))
        answered = await self.post(
            token, {"jsonrpc": "2.0", "id": question["id"], "result": {"ok": 1}}, waiting
        )
        self.assertEqual(answered.code, 202)
        await asking.finished()
        self.assertEqual(json.loads(tool_text(asking.events[-1])), {"ok": 1})

    async def test_a_stuck_request_does_not_keep_a_session_forever(self) -> None:
        """
        A request in flight keeps an idle session, but only until its
        deadline (--request-timeout): then it is answered with an error and
        the session is reaped like any idle one.
        """
        self.use_broker(session_idle_timeout=0.5, request_timeout=1.0)
        token = await self.token()
        session_id = await self.open_session(token)
        asking = await self.send("POST", token, tool("stuck", "ask"), session_id)
        await asking.event(lambda e: e.get("method") == "sampling/createMessage")
        last_used = self.session_object(session_id).last_used
        await deferLater(reactor, max(0.0, last_used + 0.5 - reactor.seconds()) + 0.1, lambda: None)
        self.broker.sessions.reap()
        self.assertTrue(self.live(session_id))
        await asking.finished()
        self.assertEqual(asking.events[-1]["id"], "stuck")
        self.assertIn("timed out", asking.events[-1]["error"]["message"])
        self.broker.sessions.reap()
        await self.assert_gone(token, session_id)


class SpawnFailureTests(SessionTestCase):
    async def check_broker_keeps_serving(self, token: str) -> None:
        health = await self.send("GET", None, path="/healthz")
        await health.finished()
        self.assertEqual(health.code, 200)
        self.assertEqual(health.json()["status"], "ok")
        self.assertEqual(len(self.broker.sessions), 0)

    async def check_initialize_fails(self, token: str) -> dict[str, Any]:
        """
        Initialize gets a JSON-RPC error at once: a 503 when the spawn itself
        failed, a 200 when the child started and died before answering.
        """
        reply = await self.post(token, initialize(3))
        self.assertIn(reply.code, (200, 503))
        body = self.assert_rpc_error(reply, reply.code, -32603)
        self.assertEqual(body["id"], 3)
        self.assertIsNone(reply.session_id)
        return body

    async def test_missing_binary(self) -> None:
        """
        On Linux, Twisted spawns with posix_spawnp, which reports ENOENT to
        the broker as an OSError (and closes the pipes it made): a 503 with
        a JSON-RPC error, every time, and nothing leaks.  (Where Twisted
        forks instead, the child exits 1: see the next test.)
        """
        self.use_broker(executable=["/nonexistent/forgejo-mcp"])
        token = await self.token()
        body = await self.check_initialize_fails(token)
        self.assertIn("forgejo-mcp", body["error"]["message"])
        await self.check_broker_keeps_serving(token)
        before = open_fds()
        for _ in range(20):
            await self.check_initialize_fails(token)
        await self.check_broker_keeps_serving(token)
        await wait_until(lambda: open_fds() <= before)

    async def test_child_that_exits_at_once(self) -> None:
        """
        A child that starts and exits 1 at once (what the fork path makes of
        a missing program): a JSON-RPC error, no session.
        """
        self.use_broker(executable=["/bin/false"])
        token = await self.token()
        for _ in range(2):
            body = await self.check_initialize_fails(token)
            self.assertIn("exited with status 1", body["error"]["message"])
            await self.check_broker_keeps_serving(token)


class FaultTests(SessionTestCase):
    async def test_crash_on_initialize(self) -> None:
        self.use_broker(child=["crash-on-initialize"])
        token = await self.token()
        reply = await self.post(token, initialize(4))
        body = self.assert_rpc_error(reply, 200, -32603)
        self.assertEqual(body["id"], 4)
        self.assertIn("exited with status 2", body["error"]["message"])
        self.assertIsNone(reply.session_id)
        self.assertEqual(len(self.broker.sessions), 0)

    async def test_crash_on_call(self) -> None:
        self.use_broker(child=["crash-on-call"])
        token = await self.token()
        session_id = await self.open_session(token)
        other = await self.open_session(token)
        reply = await self.post(token, tool("c", "echo"), session_id)
        body = self.assert_rpc_error(reply, 200, -32603)
        self.assertEqual(body["id"], "c")
        self.assertIn("exited with status 3", body["error"]["message"])
        await self.assert_gone(token, session_id)
        # The other session's child is still there.
        await self.rpc(token, other, request(5, "tools/list"))

    async def test_pending_requests_fail_when_the_child_dies(self) -> None:
        token = await self.token()
        session_id = await self.open_session(token)
        pid = (await self.whoami(token, session_id))["pid"]
        stream = await self.send("GET", token, None, session_id)
        asking = await self.send("POST", token, tool("p", "ask"), session_id)
        await asking.event(lambda e: e.get("method") == "sampling/createMessage")
        os.kill(pid, signal.SIGKILL)
        await asking.finished()
        self.assertEqual(asking.events[-1]["id"], "p")
        self.assertEqual(asking.events[-1]["error"]["code"], -32603)
        self.assertIn("signal 9", asking.events[-1]["error"]["message"])
        await stream.finished()
        await self.assert_gone(token, session_id)

    async def misbehaving_session_ends(self, behaviour: str) -> None:
        """
        A session whose child breaks the stdio framing is ended; another
        session of the same broker (and user) carries on.
        """
        token = await self.token()
        good = await self.open_session(token)
        good_stream = await self.send("GET", token, None, good)
        self.use_behaviours(behaviour)
        # The child answers initialize properly, then misbehaves.
        reply = await self.post(token, initialize(1))
        self.assertEqual(reply.code, 200)
        bad = reply.session_id
        assert bad is not None
        child = self.session_object(bad).child if self.live(bad) else None
        await wait_until(lambda: not self.live(bad))
        await self.assert_gone(token, bad)
        if child is not None:
            await within(child.protocol.exited)
        echoed = await self.rpc(token, good, tool(2, "echo", {"still": "here"}))
        self.assertEqual(json.loads(tool_text(echoed)), {"still": "here"})
        await self.rpc(token, good, tool(3, "change"))
        await good_stream.event(lambda e: e.get("method") == "notifications/tools/list_changed")
        self.assertEqual(len(self.broker.sessions), 1)
        await self.delete(token, good)
        await good_stream.finished()

    async def test_garbage_on_stdout_ends_the_session(self) -> None:
        await self.misbehaving_session_ends("garbage")

    async def test_over_long_line_ends_the_session(self) -> None:
        # The child writes a 200 kB line; this broker allows 64 kB.
        self.use_broker(max_line=64 * 1024)
        await self.misbehaving_session_ends("long-line")

    async def test_long_line_under_the_limit_is_fine(self) -> None:
        self.use_broker(child=["long-line"])
        token = await self.token()
        session_id = await self.open_session(token)
        await self.rpc(token, session_id, request(2, "tools/list"))
        self.assertTrue(self.live(session_id))

    async def test_never_answered_initialize_ends_with_delete(self) -> None:
        self.use_broker(child=["never-answer"])
        token = await self.token()
        pending = self.start("POST", token, initialize(8))
        await wait_until(lambda: len(self.broker.sessions.of_user(1)) == 1)
        session = self.broker.sessions.of_user(1)[0]
        # The broker answered everything else meanwhile; this one waits.
        health = await (await self.send("GET", None, path="/healthz")).finished()
        self.assertEqual(health.code, 200)
        self.assertFalse(pending.called)
        self.assertEqual(session.router.in_flight, 1)
        self.assertEqual((await self.delete(token, session.id)).code, 204)
        reply = await (await within(pending)).finished()
        body = self.assert_rpc_error(reply, 200, -32603)
        self.assertEqual(body["id"], 8)
        self.assertIsNone(reply.session_id)
        await within(session.child.protocol.exited)

    async def test_delete_answers_a_pending_call(self) -> None:
        token = await self.token()
        session_id = await self.open_session(token)
        asking = await self.send("POST", token, tool("slow", "ask"), session_id)
        await asking.event(lambda e: e.get("method") == "sampling/createMessage")
        self.assertEqual((await self.delete(token, session_id)).code, 204)
        await asking.finished()
        self.assertEqual(asking.events[-1]["id"], "slow")
        self.assertEqual(asking.events[-1]["error"]["code"], -32603)
        self.assertIn("ended", asking.events[-1]["error"]["message"])

    async def test_a_child_ignoring_sigterm_is_killed(self) -> None:
        """
        The harness gives children 0.5 s after stdin closes and 0.5 s after
        SIGTERM; then SIGKILL.
        """
        self.use_broker(child=["ignore-term"])
        token = await self.token()
        session_id = await self.open_session(token)
        pid = (await self.whoami(token, session_id))["pid"]
        self.assertTrue(alive(pid))
        exited = self.session_object(session_id).child.protocol.exited
        started = time.monotonic()
        self.assertEqual((await self.delete(token, session_id)).code, 204)
        await self.assert_gone(token, session_id)
        exit = await within(exited)
        self.assertEqual(exit.signal, signal.SIGKILL)
        # The supervisor's grace periods, not the 1 s + 2 s defaults.
        self.assertLess(time.monotonic() - started, 2.5)
        self.assertFalse(alive(pid))
        self.assertFalse(zombie_child(pid))


class EnvironmentTests(SessionTestCase):
    async def test_child_environment_holds_only_the_users_forgejo_token(self) -> None:
        leaked = "leaked-from-the-broker-environment"
        for name in ("FJMCP_FORGEJO_CLIENT_SECRET", "FJMCP_SECRET_KEY"):
            self.addCleanup(restore_environ, name, os.environ.get(name))
            os.environ[name] = leaked
        tokens = await self.login_tokens("alice")
        access = tokens["access_token"]
        session_id = await self.open_session(access)
        pid = (await self.whoami(access, session_id))["pid"]
        with open(f"/proc/{pid}/environ", "rb") as f:
            raw = f.read()
        env = dict(
            entry.decode().split("=", 1) for entry in raw.split(b"\0") if entry and b"=" in entry
        )
        forgejo_token = await self.broker.credentials.access_token(1)
        self.assertEqual(env["FORGEJO_ACCESS_TOKEN"], forgejo_token)
        self.assertEqual(env["FORGEJO_URL"], self.broker.forgejo_url)
        # What the tool reports is what the process holds.
        seen = json.loads(tool_text(await self.rpc(access, session_id, tool(2, "env"))))
        # Python may add LC_CTYPE to its own os.environ when coercing a C locale.
        seen.pop("LC_CTYPE", None)
        self.assertEqual(seen, env)
        config = self.broker.config
        secrets = {
            "the broker's client secret": config.forgejo_client_secret,
            "the secret key (base64)": base64.b64encode(config.secret_key).decode(),
            "the secret key (urlsafe base64)": base64.urlsafe_b64encode(config.secret_key).decode(),
            "the secret key (hex)": config.secret_key.hex(),
            "the user's broker access token": access,
            "the user's broker refresh token": tokens["refresh_token"],
            "an inherited FJMCP_ variable": leaked,
        }
        for what, secret in secrets.items():
            self.assertNotIn(secret.encode(), raw, what)
        self.assertNotIn(config.secret_key, raw)
        self.assertEqual([k for k in env if k.startswith("FJMCP")], [])
        self.assertEqual(
            set(env),
            {"FORGEJO_URL", "FORGEJO_ACCESS_TOKEN", "FORGEJO_USER_AGENT", "PATH", "LANG", "LC_ALL"},
        )

    async def test_each_child_holds_its_own_users_token(self) -> None:
        alice = await self.token("alice")
        bob = await self.token("bob")
        alices = await self.whoami(alice, await self.open_session(alice))
        bobs = await self.whoami(bob, await self.open_session(bob))
        self.assertEqual(alices["token"], await self.broker.credentials.access_token(1))
        self.assertEqual(bobs["token"], await self.broker.credentials.access_token(2))
        self.assertNotEqual(alices["token"], bobs["token"])


# 1,000 cycles take about 15-25 s on this 2-core machine (each is a Python
# interpreter starting, answering initialize and exiting).
CYCLES = 1000
CONCURRENCY = 8
HTTP_CYCLES = 25


class HygieneTests(SessionTestCase):
    timeout = 300

    async def cycle(self, user_id: int, pids: list[int]) -> None:
        """
        One session: spawn, initialize, end, and wait for the child's exit.
        """
        sessions = self.broker.sessions
        session = sessions.create(user_id, f"user{user_id}", "client", "2025-06-18", "tok")
        assert session.child.pid is not None
        pids.append(session.child.pid)
        answer = Answer()
        session.router.client_request(initialize(1), answer)
        response = await within(answer.done)
        self.assertEqual(response["result"]["serverInfo"]["name"], "scripted-child")
        exit = await within(sessions.end(session))
        # It exits on EOF; on a loaded machine it may not manage within the
        # harness' 0.5 s, and then SIGTERM ends it.  Either way it is gone.
        self.assertIn((exit.code, exit.signal), [(0, None), (None, signal.SIGTERM)])

    async def test_a_thousand_sessions_leave_nothing_behind(self) -> None:
        # The interpreter without site (-S): the child needs only the
        # standard library, and site's import hooks are most of a bare
        # interpreter's start-up, paid a thousand times here.
        self.use_broker(
            max_sessions=CONCURRENCY + 1,
            max_sessions_per_user=1,
            executable=[sys.executable, "-S", SCRIPTED_CHILD],
        )
        token = await self.token()
        pids: list[int] = []
        # Warm up whatever is created once (HTTP pools, the database's
        # connections, the reactor's process machinery).
        await self.delete(token, await self.open_session(token))
        await self.cycle(100, pids)
        await wait_until(lambda: len(self.broker.sessions) == 0)
        before = open_fds()

        # Through HTTP: initialize, a call, DELETE.
        for _ in range(HTTP_CYCLES):
            session_id = await self.open_session(token)
            pids.append((await self.whoami(token, session_id))["pid"])
            child = self.session_object(session_id).child
            self.assertEqual((await self.delete(token, session_id)).code, 204)
            await within(child.protocol.exited)

        # Straight through the session manager, several at a time.
        started = time.monotonic()

        async def worker(n: int) -> None:
            for _ in range(CYCLES // CONCURRENCY):
                await self.cycle(n + 1, pids)

        await gatherResults(
            [Deferred.fromCoroutine(worker(n)) for n in range(CONCURRENCY)]
        ).addTimeout(240, reactor)
        elapsed = time.monotonic() - started
        self.assertEqual(len(pids), 1 + HTTP_CYCLES + CYCLES)
        self.assertEqual(len(self.broker.sessions), 0)
        self.assertEqual(len(self.broker.sessions._children), 0)
        # Server-side HTTP connections close a moment after the client's.
        await wait_until(lambda: open_fds() <= before + 2, timeout=PROMPT)
        zombies = [pid for pid in pids if zombie_child(pid)]
        self.assertEqual(zombies, [])
        still_running = [pid for pid in pids if alive(pid) and _parent(pid) == os.getpid()]
        self.assertEqual(still_running, [])
        # Not an assertion on speed: just so a slow machine shows in test.log.
        log.info("{n} session cycles in {s:.1f} s", n=CYCLES, s=elapsed)


def _parent(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("PPid:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        return None
    return None
