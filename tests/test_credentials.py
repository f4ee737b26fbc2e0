"""
Users' Forgejo credentials: sealed at rest, renewed before they expire, and
renewed once per user however many requests need them at the same moment.
"""

from __future__ import annotations

import os
from typing import TypeVar

from fjmcp_dev.standin.model import Forge, seed
from fjmcp_dev.standin.web import StandinForgejo
from hypothesis import given
from hypothesis import strategies as st
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, LoopingCall
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool

from fjmcp.forgejo.client import ForgejoClient, ForgejoUser, UpstreamTokens
from fjmcp.forgejo.credentials import (
    CLAIM_POLL,
    CLAIM_SECONDS,
    REFRESH_MARGIN,
    LoginRequiredError,
    UpstreamCredentials,
    refresh_margin,
)
from fjmcp.secrets.crypto import SecretBox
from fjmcp.store import Store, migrate_database
from tests.helpers import serve
from tests.store_engines import OnPostgreSQL, fresh_location
from tests.store_engines import dump as database_dump

T = TypeVar("T")


class CredentialTests(TestCase):
    def setUp(self) -> None:
        self.forge = Forge(reactor.seconds)
        seed(self.forge)
        self.app = self.forge.add_app(
            "fjmcp", ["http://127.0.0.1/cb"], confidential=True,
            client_id="broker", client_secret="gto_secret",
        )  # fmt: skip
        url = serve(self, StandinForgejo(self.forge, "http://placeholder").resource())
        self.location = fresh_location(self)
        migrate_database(self.location)
        self.store = Store.open(self.location, reactor)
        self.addCleanup(self.store.close)
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.upstream = ForgejoClient(
            HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))),
            self.clock,
            url,
            "broker",
            "gto_secret",
            "http://127.0.0.1/cb",
            ["read:user"],
        )
        self.refreshes = 0
        real_refresh = self.upstream.refresh

        async def counting_refresh(token: str) -> UpstreamTokens:
            self.refreshes += 1
            return await real_refresh(token)

        self.upstream.refresh = counting_refresh  # type: ignore[method-assign, assignment]
        self.key = os.urandom(32)
        self.credentials = UpstreamCredentials(
            self.store, SecretBox(self.key), self.upstream, self.clock
        )

    async def login(self, login: str = "alice", expires_in: float = 3600) -> UpstreamTokens:
        """
        What the callback does: a code exchange at Forgejo, then save.
        """
        user = self.forge.user_by_login(login)
        assert user is not None
        grant = self.forge.ensure_grant(user.id, "broker", "read:user")
        code = self.forge.issue_code(grant, "http://127.0.0.1/cb", "", "")
        issued = self.forge.exchange_code(self.app, code, "", "")
        tokens = UpstreamTokens(
            issued.access_token,
            issued.refresh_token,
            self.clock.seconds() + expires_in,
            "read:user",
        )
        await self.credentials.save(ForgejoUser(user.id, user.login, user.full_name), tokens)
        return tokens

    async def test_short_lifetime_is_renewed_near_its_end_only(self) -> None:
        """
        Forgejo handing out 120 s tokens (less than the 300 s margin): six
        requests within a second renew nothing (they used to renew on every
        request, 7 renewals for 6 requests, each replacing the child), one
        later on neither, and one in the token's last quarter does.
        """
        self.forge.access_token_lifetime = 120
        user = self.forge.user_by_login("alice")
        assert user is not None
        grant = self.forge.ensure_grant(user.id, "broker", "read:user")
        code = self.forge.issue_code(grant, "http://127.0.0.1/cb", "", "")
        # Through Forgejo's token endpoint, so its expires_in is what is stored.
        await self.credentials.sign_in(code, "")
        first = await self.credentials.access_token(1)
        for _ in range(6):
            self.clock.advance(1 / 6)
            self.assertEqual(await self.credentials.access_token(1), first)
        # Past the in-memory cache: the stored row decides.
        self.clock.advance(60)
        self.assertEqual(await self.credentials.access_token(1), first)
        self.assertEqual(self.refreshes, 0)
        # 120 s after it was asked for, less a quarter: time to renew.
        self.clock.advance(120 - 30 - 61 + 0.5)
        renewed = await self.credentials.access_token(1)
        self.assertNotEqual(renewed, first)
        self.assertEqual(self.refreshes, 1)
        self.assertEqual(self.forge.user_for_access_token(renewed)[0].login, "alice")  # type: ignore[index]
        # The renewed token has the same 120 s, so it is not renewed at once.
        self.clock.advance(1)
        self.assertEqual(await self.credentials.access_token(1), renewed)
        self.assertEqual(self.refreshes, 1)

    async def test_fresh_token_is_used_as_is(self) -> None:
        tokens = await self.login()
        self.assertEqual(await self.credentials.access_token(1), tokens.access_token)
        self.assertEqual(self.refreshes, 0)

    async def test_sealed_at_rest(self) -> None:
        tokens = await self.login()
        dump = database_dump(self.location)
        self.assertNotIn(tokens.access_token.encode(), dump)
        assert tokens.refresh_token is not None
        self.assertNotIn(tokens.refresh_token.encode(), dump)

    async def test_near_expiry_is_renewed_and_stored(self) -> None:
        old = await self.login(expires_in=100)
        token = await self.credentials.access_token(1)
        self.assertNotEqual(token, old.access_token)
        self.assertEqual(self.refreshes, 1)
        # Forgejo accepts the new one, and the stored row moved on.
        self.assertEqual(self.forge.user_for_access_token(token)[0].login, "alice")  # type: ignore[index]
        cred = await self.store.get_upstream_credential(1)
        assert cred is not None
        self.assertEqual(cred.generation, 2)
        self.assertEqual(await self.credentials.access_token(1), token)
        self.assertEqual(self.refreshes, 1)

    async def test_concurrent_callers_share_one_refresh(self) -> None:
        """
        Twenty requests for the same user at once: one refresh at Forgejo
        (a second would be refused there as a replayed refresh token), and
        every caller gets the same, working token.
        """
        await self.login(expires_in=10)
        tokens = await gatherResults(
            [Deferred.fromCoroutine(self.credentials.access_token(1)) for _ in range(20)]
        )
        self.assertEqual(self.refreshes, 1)
        self.assertEqual(len(set(tokens)), 1)
        self.assertIsNotNone(self.forge.user_for_access_token(tokens[0]))

    def node(self) -> UpstreamCredentials:
        """
        Another broker node on the same database: its own pool, its own
        in-process single flight, the same Forgejo.
        """
        store = Store.open(self.location, reactor)
        self.addCleanup(store.close)
        return UpstreamCredentials(store, SecretBox(self.key), self.upstream, self.clock)

    async def ticking(self, work: Deferred[T]) -> T:
        """
        C{work}'s result, the fake clock moving on meanwhile as a real one
        would (processes waiting on another's renewal look again on a timer).
        """
        tick = LoopingCall(self.clock.advance, CLAIM_POLL)
        tick.clock = reactor
        tick.start(0.005, now=False)
        try:
            return await work
        finally:
            tick.stop()

    async def test_one_renewal_across_nodes(self) -> None:
        """
        Ten requests needing a renewal at once, spread over three nodes:
        exactly one renewal reaches Forgejo (the store's claim), and every
        node hands out the token it brought.
        """
        await self.login(expires_in=10)
        nodes = [self.credentials, self.node(), self.node()]
        tokens = await self.ticking(
            gatherResults([Deferred.fromCoroutine(nodes[i % 3].access_token(1)) for i in range(10)])
        )
        self.assertEqual(self.refreshes, 1)
        self.assertEqual(len(set(tokens)), 1)
        self.assertIsNotNone(self.forge.user_for_access_token(tokens[0]))
        cred = await self.store.get_upstream_credential(1)
        assert cred is not None
        self.assertEqual(cred.generation, 2)

    async def test_claim_of_a_dead_node_lapses(self) -> None:
        """
        A node that claimed the renewal and died: the others wait for its
        claim to lapse, then one of them renews.
        """
        await self.login(expires_in=10)
        cred = await self.store.get_upstream_credential(1)
        assert cred is not None
        claimed = await self.store.claim_upstream_refresh(
            1, cred.generation, self.clock.seconds(), self.clock.seconds() + CLAIM_SECONDS
        )
        self.assertTrue(claimed)
        start = self.clock.seconds()
        token = await self.ticking(Deferred.fromCoroutine(self.node().access_token(1)))
        self.assertGreaterEqual(self.clock.seconds() - start, CLAIM_SECONDS)
        self.assertEqual(self.refreshes, 1)
        self.assertIsNotNone(self.forge.user_for_access_token(token))

    async def test_users_are_independent(self) -> None:
        await self.login("alice", expires_in=10)
        await self.login("bob", expires_in=10)
        a, b = await gatherResults(
            [
                Deferred.fromCoroutine(self.credentials.access_token(1)),
                Deferred.fromCoroutine(self.credentials.access_token(2)),
            ]
        )
        self.assertEqual(self.refreshes, 2)
        self.assertEqual(self.forge.user_for_access_token(a)[0].login, "alice")  # type: ignore[index]
        self.assertEqual(self.forge.user_for_access_token(b)[0].login, "bob")  # type: ignore[index]

    async def test_refused_refresh_means_login_again(self) -> None:
        await self.login(expires_in=10)
        self.forge.revoke_grant(1, "broker")
        with self.assertRaises(LoginRequiredError):
            await self.credentials.access_token(1)
        # The failure is not remembered as "in flight".
        with self.assertRaises(LoginRequiredError):
            await self.credentials.access_token(1)
        self.assertEqual(self.refreshes, 2)

    async def test_no_credential(self) -> None:
        with self.assertRaises(LoginRequiredError):
            await self.credentials.access_token(42)

    async def test_wrong_key(self) -> None:
        await self.login()
        other = UpstreamCredentials(
            self.store, SecretBox(os.urandom(32)), self.upstream, self.clock
        )
        with self.assertRaises(LoginRequiredError):
            await other.access_token(1)


class RefreshMarginTests(SynchronousTestCase):
    @given(st.one_of(st.integers(1, 10**9), st.floats(min_value=1e-6, max_value=1e12)))
    def test_margin_bounds(self, lifetime: float) -> None:
        """
        For any positive lifetime: never negative, never more than 300 s,
        and more than zero but less than the lifetime, so a token is renewed
        strictly before it expires and not as soon as it arrives.
        """
        margin = refresh_margin(lifetime)
        self.assertGreater(margin, 0)
        self.assertLessEqual(margin, REFRESH_MARGIN)
        self.assertLess(margin, lifetime)

    def test_long_and_unknown_lifetimes_keep_the_full_margin(self) -> None:
        self.assertEqual(refresh_margin(3600), REFRESH_MARGIN)
        # A credential stored before lifetimes were (schema 1): as before.
        self.assertEqual(refresh_margin(None), REFRESH_MARGIN)
        self.assertEqual(refresh_margin(120), 30)


class CredentialsOnPostgreSQL(OnPostgreSQL, CredentialTests):
    pass
