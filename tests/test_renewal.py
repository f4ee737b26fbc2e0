"""
Renewing a user's Forgejo token in the middle of an MCP session: the
broker moves the session to a child holding the new token, and the client
notices nothing.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.http_headers import Headers

from fjmcp.forgejo.client import ForgejoUser, UpstreamTokens
from tests.broker_support import BrokerTestCase
from tests.helpers import process_gone, wait_until


class RenewalTests(BrokerTestCase):
    async def rpc(self, body: dict[str, Any]) -> tuple[int, dict[str, Any], Headers]:
        return await self.mcp_rpc(self.token, body, getattr(self, "session_id", None))

    async def call(self, tool: str, args: dict[str, Any] | None = None, id: int = 9) -> Any:
        code, body, _ = await self.rpc(
            {
                "jsonrpc": "2.0",
                "id": id,
                "method": "tools/call",
                "params": {"name": tool, "arguments": args or {}},
            }
        )
        self.assertEqual(code, 200, body)
        text = body["result"]["content"][0]["text"]
        return json.loads(text) if text.startswith("{") else text

    async def expire_upstream(self) -> None:
        """
        Make alice's stored Forgejo token look as if it expires in a minute,
        so the next /mcp request renews it.
        """
        store, credentials = self.broker.store, self.broker.credentials
        cred = await store.get_upstream_credential(1)
        assert cred is not None
        token = await credentials.access_token(1)
        refresh = credentials._box.open(cred.refresh_token_enc or b"", "forgejo-user:1:refresh")
        await credentials.save(
            ForgejoUser(1, "alice", "Alice"),
            UpstreamTokens(token, refresh, reactor.seconds() + 60, cred.scope),
        )

    async def test_renewal_is_invisible(self) -> None:
        self.token, self.session_id = await self.mcp_session()
        before = await self.call("whoami")

        # A long call is in flight on the old child when the token changes.
        slow: Deferred[Any] = Deferred.fromCoroutine(self.call("slow", {"delay": 0.5}, id=10))
        await deferLater(reactor, 0.2, lambda: None)
        await self.expire_upstream()
        after = await self.call("whoami", id=11)

        # Same session, a new child with the renewed token ...
        self.assertNotEqual(after["pid"], before["pid"])
        self.assertNotEqual(after["token"], before["token"])
        self.assertEqual(after["token"], await self.broker.credentials.access_token(1))
        self.assertEqual(self.broker.forge.user_for_access_token(after["token"])[0].login, "alice")  # type: ignore[index]
        # ... the old child's call still completes ...
        self.assertEqual(await slow, "done")
        # ... and then the old child is gone.
        await wait_until(lambda: process_gone(before["pid"]), what="the retired child's end")
        self.assertEqual((await self.call("whoami", id=12))["pid"], after["pid"])
        self.assertEqual(len(self.broker.sessions), 1)

    async def test_short_lifetime_does_not_renew_every_request(self) -> None:
        """
        The issue's reproduction: Forgejo handing out 120 s tokens, less
        than the 300 s refresh margin.  Six tool calls within a second used
        to renew the token six times and start a new child for each; now
        they share one token and one child.
        """
        self.broker.forge.access_token_lifetime = 120
        credentials = self.broker.credentials
        renewals = []
        real_refresh = credentials._upstream.refresh

        async def counting_refresh(token: str) -> UpstreamTokens:
            renewals.append(token)
            return await real_refresh(token)

        credentials._upstream.refresh = counting_refresh  # type: ignore[method-assign, assignment]
        self.token, self.session_id = await self.mcp_session()
        seen = [await self.call("whoami", id=20 + i) for i in range(6)]
        self.assertEqual(renewals, [])
        self.assertEqual(len({(s["pid"], s["token"]) for s in seen}), 1, seen)
