"""
Revoking a grant ends the live sessions opened with it, within seconds,
wherever the revocation came from: this process's token endpoints and
connections page (at once, announced by the store after commit), or
another process writing the database (fjmcp-admin), which GrantEnds'
periodic check picks up.  Bearer checks cached for a revoked grant are
forgotten, so its tokens are refused at once.
"""

from __future__ import annotations

import sys
from collections.abc import Collection
from typing import Any, cast

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock, deferLater
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from twisted.trial.unittest import TestCase

import fjmcp.oauth.grants
from fjmcp.app.tap import store_location
from fjmcp.config import Config
from fjmcp.mcp.children import ChildSupervisor
from fjmcp.mcp.sessions import SessionManager
from fjmcp.oauth.grants import BEARER_CACHE_SECONDS, AccessGrant, BearerCache, GrantEnds
from fjmcp.store import Store, UpstreamUser
from fjmcp.store.database import StoreEvents
from tests.broker_support import REDIRECT, SCRIPTED_CHILD
from tests.helpers import Answer, make_config, wait_until
from tests.store_engines import OnPostgreSQL, database_overrides, migrated
from tests.test_sessions import (
    PROMPT,
    SessionTestCase,
    initialize,
    request,
    tool,
    within,
)


class FakeGrants:
    """
    The store's side of the revocation check, scripted: which families are
    revoked, and every question asked.
    """

    def __init__(self) -> None:
        self.revoked: set[str] = set()
        self.asked: list[set[str]] = []
        self.broken = False
        self.events = StoreEvents()

    def revoked_families(self, family_ids: Collection[str]) -> Deferred[set[str]]:
        self.asked.append(set(family_ids))
        if self.broken:
            return fail(RuntimeError("database is locked"))
        return succeed(self.revoked & set(family_ids))


class FakeCache(BearerCache):
    def __init__(self, families: set[str]) -> None:
        self.cached = families
        self.forgotten: list[set[str]] = []

    def families(self) -> set[str]:
        return set(self.cached)

    def forget_families(self, family_ids: Collection[str]) -> None:
        self.forgotten.append(set(family_ids))
        self.cached -= set(family_ids)


class PeriodicCheckTests(TestCase):
    """
    GrantEnds' revocation check on a fake clock, with scripted children
    (real processes) and a scripted store.
    """

    timeout = 60

    def setUp(self) -> None:
        self.clock = Clock()
        self.grants = FakeGrants()
        children = ChildSupervisor(reactor, stdin_grace=0.5, term_grace=0.5)
        children.startService()
        self.addCleanup(children.stopService)
        self.sessions = SessionManager(
            self.clock,
            children,
            sys.executable,
            "http://127.0.0.1:9",
            max_sessions=10,
            max_per_user=5,
            idle_timeout=3600,
            args_prefix=[SCRIPTED_CHILD],
        )
        self.sessions.startService()
        self.addCleanup(self.sessions.stopService)
        self.cache = FakeCache(set())
        self.ends = GrantEnds(self.grants, self.sessions, self.cache, self.clock, 2.0)
        self.ends.startService()
        self.addCleanup(self.ends.stopService)
        self.events: list[dict[str, Any]] = []
        observer = cast(ILogObserver, self.events.append)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def open(self, user_id: int, family_id: str, client_id: str = "client") -> Any:
        return self.sessions.create(
            user_id, f"user{user_id}", client_id, "2025-06-18", "gto_secret", family_id=family_id
        )

    async def test_revoked_families_sessions_end_others_stay(self) -> None:
        a1 = self.open(1, "fam-a")
        a2 = self.open(1, "fam-a")
        b = self.open(2, "fam-b")
        cache = self.cache
        cache.cached = {"fam-a", "fam-cached-only"}
        closed: list[str] = []
        a1.standalone.attach(lambda m: None, lambda: closed.append("a1"))
        pending = Answer()
        a2.router.client_request(tool(7, "slow", {"delay": 10}), pending)

        self.clock.advance(2.0)
        self.assertEqual(self.grants.asked, [{"fam-a", "fam-b", "fam-cached-only"}])
        self.assertEqual(len(self.sessions), 3)

        self.grants.revoked = {"fam-a", "fam-cached-only"}
        self.clock.advance(2.0)
        # One question per round, about every live grant at once.
        self.assertEqual(len(self.grants.asked), 2)
        self.assertTrue(a1.ended and a2.ended)
        self.assertFalse(b.ended)
        self.assertEqual(self.sessions.get(a1.id, 1), None)
        self.assertIs(self.sessions.get(b.id, 2), b)
        self.assertEqual(closed, ["a1"])
        answer = await within(pending.done)
        self.assertEqual(answer["id"], 7)
        self.assertIn("revoked", answer["error"]["message"])
        self.assertEqual(cache.forgotten, [{"fam-a", "fam-cached-only"}])
        for session in (a1, a2):
            await within(session.child.protocol.exited)
        self.assertFalse(b.child.protocol.exited.called)
        lines = [e for e in self.events if "ending session" in e.get("log_format", "")]
        self.assertEqual(len(lines), 2)
        for event in lines:
            self.assertEqual(event["family"], "fam-a")
            self.assertNotIn("gto_secret", repr(event))

    def test_nothing_to_ask_no_query(self) -> None:
        self.clock.advance(10.0)
        self.assertEqual(self.grants.asked, [])

    def test_a_failing_store_is_retried_and_logged_once(self) -> None:
        session = self.open(1, "fam-a")
        self.grants.broken = True
        self.clock.pump([2.0] * 5)
        self.assertEqual(len(self.grants.asked), 5)
        errors = [e for e in self.events if e.get("log_level") == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.grants.broken = False
        self.grants.revoked = {"fam-a"}
        self.clock.advance(2.0)
        self.assertTrue(session.ended)

    def test_a_newer_grant_of_the_same_user_takes_over(self) -> None:
        """
        A client that signed in again uses its session with a token of a new
        grant: from then on, that grant's revocation ends the session, and
        the old one's does not.
        """
        session = self.open(1, "fam-old")
        self.assertIs(self.sessions.get(session.id, 1, "fam-new"), session)
        self.assertEqual(session.family_id, "fam-new")
        self.grants.revoked = {"fam-old"}
        self.clock.advance(2.0)
        self.assertFalse(session.ended)
        self.grants.revoked = {"fam-new"}
        self.clock.advance(2.0)
        self.assertTrue(session.ended)

    def test_sessions_without_a_known_grant_are_not_asked_about(self) -> None:
        session = self.sessions.create(1, "user1", "client", "2025-06-18", "tok")
        self.clock.advance(2.0)
        self.assertEqual(self.grants.asked, [])
        self.assertFalse(session.ended)


async def new_family(store: Store, user_id: int = 1) -> str:
    await store.replace_upstream_credential(
        UpstreamUser(user_id, f"u{user_id}", ""),
        b"sealed",
        None,
        reactor.seconds() + 3600,
        "",
    )
    if not await store.get_client("c"):
        await store.create_client(
            "c",
            "dcr",
            None,
            {
                "token_endpoint_auth_method": "none",
                "redirect_uris": [REDIRECT],
                "grant_types": ["authorization_code"],
                "response_types": ["code"],
            },
        )
    return await store.issue_authorization_code(
        b"code-%d-%f" % (user_id, reactor.seconds()),
        "c",
        user_id,
        REDIRECT,
        "x" * 43,
        "S256",
        "",
        "https://mcp.example.org/mcp",
        reactor.seconds() + 60,
    )


class StoreTests(TestCase):
    def setUp(self) -> None:
        config = make_config(self.mktemp(), **database_overrides(self))
        self.store = Store.open(migrated(config), reactor)
        self.addCleanup(self.store.close)

    async def family(self, user_id: int = 1) -> str:
        return await new_family(self.store, user_id)

    async def test_revoked_and_gone_families(self) -> None:
        live = await self.family(1)
        revoked = await self.family(2)
        await self.store.revoke_family(revoked, "test")
        answer = await self.store.revoked_families([live, revoked, "no-such-family"])
        self.assertEqual(answer, {revoked, "no-such-family"})
        self.assertEqual(await self.store.revoked_families([]), set())

    async def test_many_ids_in_one_query(self) -> None:
        live = await self.family(1)
        ids = [f"gone-{n}" for n in range(40_000)] + [live]
        answer = await self.store.revoked_families(ids)
        self.assertEqual(len(answer), 40_000)
        self.assertNotIn(live, answer)


class BearerCacheTests(TestCase):
    def test_forget_families_drops_only_theirs(self) -> None:
        clock = Clock()
        cache = BearerCache(clock)
        cache.put(b"old", AccessGrant(2, "c", "fam-old", ""), 1.0)
        clock.advance(1.0)
        cache.put(b"a", AccessGrant(1, "c", "fam-a", ""), 100.0)
        cache.put(b"b", AccessGrant(2, "c", "fam-b", ""), 100.0)
        # An expired entry is not trusted, nor asked about.
        self.assertEqual(cache.families(), {"fam-a", "fam-b"})
        self.assertIsNone(cache.get(b"old"))
        cache.forget_families({"fam-a"})
        self.assertIsNone(cache.get(b"a"))
        self.assertEqual(cache.get(b"b"), AccessGrant(2, "c", "fam-b", ""))
        cache.forget_token(b"b")
        self.assertEqual(cache.families(), set())

    def test_trusted_at_most_a_few_seconds(self) -> None:
        clock = Clock()
        cache = BearerCache(clock)
        cache.put(b"a", AccessGrant(1, "c", "fam-a", ""), 3600.0)
        clock.advance(BEARER_CACHE_SECONDS - 0.1)
        self.assertIsNotNone(cache.get(b"a"))
        clock.advance(0.2)
        self.assertIsNone(cache.get(b"a"))


class AfterCommitTests(TestCase):
    """
    The store announces a revocation once its transaction committed, and
    never one that rolled back.
    """

    def setUp(self) -> None:
        config = make_config(self.mktemp(), **database_overrides(self))
        self.store = Store.open(migrated(config), reactor)
        self.addCleanup(self.store.close)
        self.heard: list[tuple[str, str]] = []
        self.store.events.grant_revoked.connect(lambda f, why: self.heard.append((f, why)))

    async def test_announced_after_commit_once(self) -> None:
        family = await new_family(self.store)
        self.assertTrue(await self.store.revoke_family(family, "test"))
        self.assertEqual(self.heard, [(family, "test")])
        # Already revoked: nothing ended, nothing said.
        self.assertFalse(await self.store.revoke_family(family, "again"))
        self.assertEqual(self.heard, [(family, "test")])

    async def test_not_announced_after_rollback(self) -> None:
        family = await new_family(self.store)

        def revoke_then_fail(tx: Any) -> None:
            tx.revoke_family(family, "test")
            raise RuntimeError("something later in the transaction failed")

        with self.assertRaises(RuntimeError):
            await self.store.token_transaction("test", 1.0, revoke_then_fail)
        self.assertEqual(self.heard, [])
        self.assertEqual(await self.store.revoked_families([family]), set())


async def revoke_elsewhere(config: Config, user_id: int) -> int:
    """
    Revoke a user's grants the way another process (fjmcp-admin, another
    broker node) does: its own pool on the database, its own events, nothing
    of this broker involved.
    """
    store = Store.open(store_location(config), reactor)
    try:
        return await store.revoke_families("revoked by the admin", forgejo_user_id=user_id)
    finally:
        store.close()


class EndToEndTests(SessionTestCase):
    """
    A real broker, real children, HTTP in front.
    """

    def setUp(self) -> None:
        super().setUp()
        # A cache far longer than the test: a 401 below proves the check
        # forgot the revoked grant's bearer checks, not that they aged out.
        self.patch(fjmcp.oauth.grants, "BEARER_CACHE_SECONDS", 600.0)

    async def test_revocation_by_another_process_ends_sessions_within_seconds(self) -> None:
        self.use_broker(revocation_interval=0.5)
        alice = await self.token("alice")
        bob = await self.token("bob")
        first = await self.open_session(alice)
        second = await self.open_session(alice)
        bobs = await self.open_session(bob)
        children = [self.session_object(s).child for s in (first, second)]
        stream = await self.start("GET", alice, None, first)
        self.assertEqual(stream.code, 200)
        in_flight = self.start("POST", alice, tool(5, "slow", {"delay": 10}), second)
        # Alice's token is checked (and cached) just before the revocation.
        await self.rpc(alice, second, request(4, "tools/list"))

        self.assertEqual(await revoke_elsewhere(self.broker.config, 1), 1)

        await stream.finished(PROMPT)
        for child in children:
            await within(child.protocol.exited)
        reply = await (await within(in_flight)).finished()
        answer = reply.events[-1] if reply.is_sse else reply.json()
        self.assertEqual(answer["id"], 5)
        self.assertIn("error", answer)
        self.assertFalse(self.live(first) or self.live(second))

        refused = await self.post(alice, request(6, "tools/list"), second)
        self.assertEqual(refused.code, 401)
        challenge = (refused.headers.getRawHeaders(b"www-authenticate") or [b""])[0].decode()
        self.assertIn('error="invalid_token"', challenge)
        self.assertIn("resource_metadata=", challenge)
        # Bob noticed nothing.
        self.assertTrue(self.live(bobs))
        self.assertEqual((await self.whoami(bob, bobs))["url"], self.broker.forgejo_url)

    async def test_a_cached_token_without_a_session_is_refused_too(self) -> None:
        self.use_broker(revocation_interval=0.5)
        alice = await self.token("alice")
        # Authenticated (and cached), then refused for having no session.
        self.assertEqual((await self.post(alice, request(1, "tools/list"))).code, 400)
        await revoke_elsewhere(self.broker.config, 1)
        await wait_until(lambda: not self.broker.bearers.families())
        self.assertEqual((await self.post(alice, initialize())).code, 401)

    async def refresh(self, tokens: dict[str, Any]) -> dict[str, Any]:
        response = await self.browser.post(
            self.broker.url + "/oauth/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": tokens["refresh_token"],
                "client_id": tokens["client"]["client_id"],
            },
        )
        body: dict[str, Any] = await response.json()
        self.assertEqual(response.code, 200, body)
        return body

    async def test_revoking_the_refresh_token_ends_the_sessions_at_once(self) -> None:
        # No periodic check during the test: the token endpoint itself ends them.
        self.use_broker(revocation_interval=3600)
        tokens = await self.login_tokens("alice")
        session_id = await self.open_session(tokens["access_token"])
        child = self.session_object(session_id).child
        stream = await self.start("GET", tokens["access_token"], None, session_id)
        # A refresh keeps the grant: the session goes on with the new token.
        renewed = await self.refresh(tokens)
        self.assertNotEqual(renewed["access_token"], tokens["access_token"])
        await self.rpc(renewed["access_token"], session_id, request(2, "tools/list"))
        other = await self.token("bob")
        bobs = await self.open_session(other)

        await self.revoke_token(renewed | {"client": tokens["client"]})
        # Ended by the time the revocation was answered.
        self.assertFalse(self.live(session_id))
        await stream.finished(PROMPT)
        await within(child.protocol.exited)
        refused = await self.post(renewed["access_token"], request(3, "tools/list"), session_id)
        self.assertEqual(refused.code, 401)
        self.assertTrue(self.live(bobs))

    async def test_refresh_reuse_detection_ends_the_sessions(self) -> None:
        self.use_broker(revocation_interval=3600, refresh_grace_period=0.0)
        tokens = await self.login_tokens("alice")
        session_id = await self.open_session(tokens["access_token"])
        renewed = await self.refresh(tokens)
        await self.rpc(renewed["access_token"], session_id, request(2, "tools/list"))
        response = await self.browser.post(
            self.broker.url + "/oauth/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": tokens["refresh_token"],
                "client_id": tokens["client"]["client_id"],
            },
        )
        self.assertEqual((await response.json())["error"], "invalid_grant")
        self.assertFalse(self.live(session_id))

    async def test_a_new_grant_of_the_same_user_keeps_the_session(self) -> None:
        """
        The client signed in again (a new grant) and goes on using its
        session; revoking the old grant leaves it alone.
        """
        self.use_broker(revocation_interval=0.3)
        old = await self.login_tokens("alice")
        session_id = await self.open_session(old["access_token"])
        new = await self.login_tokens("alice")
        await self.rpc(new["access_token"], session_id, request(2, "tools/list"))
        old_grant = await self.broker.tokens.check_bearer("Bearer " + old["access_token"])
        new_grant = await self.broker.tokens.check_bearer("Bearer " + new["access_token"])
        self.assertNotEqual(old_grant.family_id, new_grant.family_id)
        self.assertEqual(self.session_object(session_id).family_id, new_grant.family_id)
        await self.broker.store.revoke_family(old_grant.family_id, "test")
        # A few rounds of the check.
        await deferLater(reactor, 1.0, lambda: None)
        self.assertTrue(self.live(session_id))
        await self.rpc(new["access_token"], session_id, request(3, "tools/list"))


# The same on PostgreSQL: there the other process is another broker node.


class StoreOnPostgreSQL(OnPostgreSQL, StoreTests):
    pass


class AfterCommitOnPostgreSQL(OnPostgreSQL, AfterCommitTests):
    pass


class EndToEndOnPostgreSQL(OnPostgreSQL, EndToEndTests):
    pass
