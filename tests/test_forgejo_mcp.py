"""
The real forgejo-mcp binary, at the pinned version, against the Forgejo
stand-in over stdio: what every MCP session will run.

The binary comes from `make forgejo-mcp` (built from forgejo-mcp's sources
at the pinned tag).  Without it these tests skip with the reason; in CI
(CI=true) a missing binary fails the run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from fjmcp_dev.standin.model import Forge, seed
from fjmcp_dev.standin.web import StandinForgejo
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SkipTest, TestCase

from fjmcp.mcp.children import ChildExit, ChildSupervisor, JSONRPCChildProtocol, child_environment
from tests.helpers import serve

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / "bin"
PINNED = (ROOT / "deploy" / "forgejo-mcp.version").read_text().strip()


# The newest forgejo-mcp release, tested beside the pin so an upgrade of the
# pin is known to work (`make forgejo-mcp` builds both).
NEWEST = (ROOT / "tests" / "forgejo-mcp-newest.version").read_text().strip()


def find_forgejo_mcp(version: str = PINNED) -> str:
    """
    The binary to test (the pinned version unless C{version} names the
    newest), or SkipTest / failure with an operator-readable reason.
    """
    explicit = os.environ.get("FJMCP_TEST_FORGEJO_MCP") if version == PINNED else None
    candidates: list[str | None]
    if version != PINNED:
        candidates = [str(BIN / f"forgejo-mcp-{version}")]
    elif explicit:
        candidates = [explicit]
    else:
        candidates = [str(BIN / "forgejo-mcp"), shutil.which("forgejo-mcp")]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    if os.environ.get("CI"):
        raise AssertionError(
            f"forgejo-mcp {version} is missing in CI: `make forgejo-mcp` should have built "
            f"it into {BIN}"
        )
    raise SkipTest(f"forgejo-mcp {version} not built: run `make forgejo-mcp`")


class StdioClient:
    """
    Just enough of an MCP client to talk to a child over newline-delimited
    JSON-RPC.
    """

    def __init__(self, test: TestCase, binary: str, forgejo_url: str, token: str) -> None:
        self.pending: dict[int, Deferred[Any]] = {}
        self.stderr: list[str] = []
        self.next_id = 0
        supervisor = ChildSupervisor(reactor, stdin_grace=2.0, term_grace=2.0)
        supervisor.startService()
        test.addCleanup(supervisor.stopService)
        self.protocol = JSONRPCChildProtocol(self.on_message, on_stderr=self.stderr.append)
        self.child = supervisor.spawn(
            binary,
            ["--transport", "stdio"],
            child_environment(forgejo_url, token),
            self.protocol,
            "forgejo-mcp-test",
        )
        self.protocol.exited.addCallback(self.on_exit)

    def on_message(self, message: Any) -> None:
        key = message.get("id") if isinstance(message, dict) else None
        d = self.pending.pop(key, None) if isinstance(key, int) else None
        if d is not None:
            d.callback(message)

    def on_exit(self, exit: ChildExit) -> ChildExit:
        for d in self.pending.values():
            d.errback(AssertionError(f"forgejo-mcp {exit.reason}:\n" + "\n".join(self.stderr)))
        self.pending.clear()
        return exit

    def request(self, method: str, params: dict[str, Any] | None = None) -> Deferred[Any]:
        self.next_id += 1
        d: Deferred[Any] = Deferred()
        self.pending[self.next_id] = d
        self.protocol.send(
            {"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params or {}}
        )
        return d.addTimeout(30, reactor)

    def notify(self, method: str) -> None:
        self.protocol.send({"jsonrpc": "2.0", "method": method})

    async def initialize(self) -> dict[str, Any]:
        response = await self.request(
            "initialize",
            {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "fjmcp-tests", "version": "0"},
            },
        )
        self.notify("notifications/initialized")
        return response

    async def call(self, tool: str, arguments: dict[str, Any] | None = None) -> Any:
        response = await self.request("tools/call", {"name": tool, "arguments": arguments or {}})
        if "error" in response:
            raise AssertionError(f"{tool}: {response['error']}")
        text = response["result"]["content"][0]["text"]
        return json.loads(text)["Result"]


class ForgejoMCPTests(TestCase):
    def setUp(self) -> None:
        self.binary = find_forgejo_mcp()
        self.forge = Forge(reactor.seconds)
        seed(self.forge)
        self.app = self.forge.add_app("fjmcp", ["http://127.0.0.1/cb"], confidential=True)
        self.url = serve(self, StandinForgejo(self.forge, "http://placeholder").resource())

    def token_for(self, login: str, scope: str) -> str:
        user = self.forge.user_by_login(login)
        assert user is not None
        grant = self.forge.ensure_grant(user.id, self.app.client_id, scope)
        code = self.forge.issue_code(grant, "http://127.0.0.1/cb", "", "")
        return self.forge.exchange_code(self.app, code, "", "").access_token

    async def test_initialize_list_and_call(self) -> None:
        token = self.token_for("alice", "read:user read:repository read:issue")
        client = StdioClient(self, self.binary, self.url, token)
        init = await client.initialize()
        self.assertIn("tools", init["result"]["capabilities"])
        tools = await client.request("tools/list")
        names = {t["name"] for t in tools["result"]["tools"]}
        for expected in ("get_my_user_info", "list_my_repos", "get_issue_by_index"):
            self.assertIn(expected, names)
        me = await client.call("get_my_user_info")
        self.assertEqual((me["login"], me["id"]), ("alice", 1))
        repos = await client.call("list_my_repos", {"page": 1, "limit": 10})
        self.assertEqual(
            sorted(r["full_name"] for r in repos), ["alice/hello-world", "alice/secret-plans"]
        )
        issue = await client.call(
            "get_issue_by_index", {"owner": "alice", "repo": "hello-world", "index": 1}
        )
        self.assertEqual(issue["title"], "Say hello in French")
        exit = await client.child.stop()
        self.assertEqual(exit.code, 0)

    async def test_each_user_sees_their_own(self) -> None:
        bob = StdioClient(
            self, self.binary, self.url, self.token_for("bob", "read:user read:repository")
        )
        await bob.initialize()
        self.assertEqual((await bob.call("get_my_user_info"))["login"], "bob")
        repos = await bob.call("list_my_repos", {"page": 1, "limit": 10})
        self.assertEqual([r["full_name"] for r in repos], ["bob/widgets"])

    async def test_token_without_read_user_exits(self) -> None:
        """
        forgejo-mcp checks GET /api/v1/user at start; the stand-in's 403 for
        a token without read:user makes it exit instead of serving.
        """
        client = StdioClient(
            self, self.binary, self.url, self.token_for("alice", "read:repository")
        )
        with self.assertRaises(AssertionError):
            await client.initialize()
        exit = await client.protocol.exited
        self.assertNotEqual(exit.code, 0)


class NewestForgejoMCPTests(ForgejoMCPTests):
    """
    The same against the newest release (141 tools instead of 80).
    """

    def setUp(self) -> None:
        super().setUp()
        self.binary = find_forgejo_mcp(NEWEST)

    async def test_token_without_read_user_exits(self) -> None:
        """
        Unlike the pin, the newest release no longer checks the token at
        start: it serves, and a call that needs read:user gets Forgejo's
        refusal as its result.  (The broker checks the user itself at login,
        so nothing of the broker depends on the child's start-up check.)
        """
        client = StdioClient(
            self, self.binary, self.url, self.token_for("alice", "read:repository")
        )
        await client.initialize()
        response = await client.request("tools/call", {"name": "get_my_user_info", "arguments": {}})
        failed = "error" in response or response["result"].get("isError")
        self.assertTrue(failed, response)
        self.assertIn("read:user", json.dumps(response))
