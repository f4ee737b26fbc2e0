"""
The MCP Python SDK's client on the stateless revision (2026-07-28), pinned
and in auto mode, through the broker's real OAuth flow to the real
forgejo-mcp: it discovers (or is pinned), calls tools as its user, refreshes
its token, and two users' requests stay apart.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, gatherResults

from tests.test_forgejo_mcp import NEWEST
from tests.test_forgejo_mcp_sessions import (
    ALICE_REPOS,
    BOB_REPOS,
    ME,
    REPOS,
    SDKOnForgejoMCP,
    calls,
)

STATELESS = "2026-07-28"


class StatelessSDKTests(SDKOnForgejoMCP):
    def check_stateless(self, summary: dict[str, Any], login: str, repos: list[str]) -> None:
        """
        The whole conversation was of the stateless revision: every /mcp
        request named its method and version in headers (the handshake's
        initialize names neither), and the tools answered as C{login}.
        """
        self.assertEqual(summary["initialize"]["protocol_version"], STATELESS)
        mcp = [r for r in summary["requests"] if r["path"] == "/mcp"]
        self.assertTrue(mcp)
        for request in mcp:
            self.assertEqual(request["mcp_protocol_version"], STATELESS, request)
            self.assertNotEqual(request["mcp_method"], "initialize", request)
        self.assertEqual({r["method"] for r in mcp}, {"POST"})
        me = self.results(summary, "get_my_user_info")
        user = self.broker.forge.user_by_login(login)
        assert user is not None
        self.assertEqual({(m["login"], m["id"]) for m in me}, {(login, user.id)})
        for page in self.results(summary, "list_my_repos"):
            self.assertEqual(sorted(r["full_name"] for r in page), repos)

    async def test_pinned(self) -> None:
        summary = await self.run_client("alice", "--mode", STATELESS, *calls(ME, REPOS))
        self.check_stateless(summary, "alice", ALICE_REPOS)
        self.assertIn("get_my_user_info", summary["initialize"]["tools"])
        self.assertEqual({r.login for r in self.watch.seen}, {"alice"})

    async def test_auto_mode_takes_the_stateless_path_at_once(self) -> None:
        """
        In auto mode the client probes server/discover first; the broker's
        answer lets it stay on the stateless revision: no initialize, no
        fallback round trip.
        """
        summary = await self.run_client("alice", "--mode", "auto", *calls(ME))
        self.check_stateless(summary, "alice", ALICE_REPOS)
        methods = [r["mcp_method"] for r in summary["requests"] if r["path"] == "/mcp"]
        # The first one is the probe the 401 answered; the client repeats it
        # once authorized.
        self.assertEqual(methods[:2], ["server/discover", "server/discover"])
        self.assertEqual(methods.count("server/discover"), 2)

    async def test_two_users_at_once(self) -> None:
        steps = [*calls(ME, REPOS, ME, REPOS), "--call-interval", "0.3", "--mode", STATELESS]
        alice, bob = await gatherResults(
            [
                Deferred.fromCoroutine(self.run_client("alice", *steps)),
                Deferred.fromCoroutine(self.run_client("bob", *steps)),
            ]
        )
        self.check_stateless(alice, "alice", ALICE_REPOS)
        self.check_stateless(bob, "bob", BOB_REPOS)
        for call in bob["initialize"]["calls"]:
            self.assertNotIn("alice", json.dumps(call), call)
        for call in alice["initialize"]["calls"]:
            self.assertNotIn("bob", json.dumps(call), call)
        # Each user's requests reached the API with that user's token only.
        self.assertEqual({r.login for r in self.watch.seen}, {"alice", "bob"})


class StatelessRefreshTests(SDKOnForgejoMCP):
    config = {"access_token_lifetime": 1.0}

    async def test_refreshed_token_goes_on(self) -> None:
        summary = await self.run_client(
            "alice", "--mode", STATELESS, "--again-after", "1.5", *calls(ME)
        )
        self.check_again(summary)

    def check_again(self, summary: dict[str, Any]) -> None:
        self.assertTrue(summary["initialize_again"]["ok"], summary["initialize_again"])
        self.assertEqual(summary["tokens_changed"], {"access_token": True, "refresh_token": True})
        self.assertEqual(
            [c["tool"] for c in summary["initialize_again"]["calls"]], ["get_my_user_info"]
        )


class NewestStatelessSDKTests(StatelessSDKTests):
    version = NEWEST
