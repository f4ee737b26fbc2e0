"""
The whole path, end to end: the official MCP SDK client
(L{tests.sdk_oauth_client}, in its own process) authorizes through the real
OAuth flow, and each of its MCP sessions on the broker runs the real
forgejo-mcp against the Forgejo stand-in.

The binary is found, or these tests skip, exactly as in
L{tests.test_forgejo_mcp} (C{FJMCP_TEST_FORGEJO_MCP}, C{bin/forgejo-mcp},
C{PATH}; in CI a missing binary fails unless the Go module proxy refused the
module).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
from fjmcp_dev.standin.model import Forge, TokenResponse
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from fjmcp import metrics
from fjmcp.http.streamable import SUPPORTED_VERSIONS
from tests.broker_support import REDIRECT, Broker, run_sdk_client
from tests.helpers import wait_until
from tests.test_forgejo_mcp import NEWEST, find_forgejo_mcp
from tests.test_forgejo_mcp import PINNED as PINNED_VERSION
from tests.test_sdk_oauth import SCRIPT, SDK_MISSING

SCRIPT_TIMEOUT = 90
ALICE_REPOS = ["alice/hello-world", "alice/secret-plans"]
BOB_REPOS = ["bob/widgets"]
ME = ("get_my_user_info", "{}")
REPOS = ("list_my_repos", '{"page": 1, "limit": 10}')

log = Logger()


@attrs.frozen
class APIRequest:
    at: float
    method: str
    path: str
    token: str | None
    # Whose token it was, by the stand-in's own records (None: not a live token).
    login: str | None
    refused: bool


class APIWatch(Resource):
    """
    Wrapped around the stand-in: notes every API request with the token it
    carried and whose it was.

    When C{strict}, a user's access token stops working at the API as soon
    as a newer one is issued for the same grant (a code exchange or a
    refresh).  Forgejo itself keeps an access token valid until it expires;
    this is stricter on purpose, so that a request still made with an older
    token (by a child that was not replaced) fails at once, in the test,
    instead of an hour later in production.
    """

    isLeaf = True

    def __init__(self, inner: Any, forge: Forge, test: TestCase) -> None:
        super().__init__()
        self.inner = inner
        self.forge = forge
        self.strict = False
        self.seen: list[APIRequest] = []
        self.refreshes = 0
        self.newest: dict[int, str] = {}
        test.patch(forge, "exchange_code", self._noting(forge.exchange_code))
        test.patch(forge, "refresh", self._noting(forge.refresh, refresh=True))

    def _noting(
        self, issue: Callable[..., TokenResponse], refresh: bool = False
    ) -> Callable[..., TokenResponse]:
        def issued(*args: Any, **kwargs: Any) -> TokenResponse:
            response = issue(*args, **kwargs)
            grant = self.forge.grant_for_token(response.access_token)
            assert grant is not None
            self.newest[grant.id] = response.access_token
            self.refreshes += refresh
            return response

        return issued

    def render(self, request: Request) -> Any:
        if not request.path.startswith(b"/api/v1/"):
            return self.inner.render(request)
        parts = (request.getHeader(b"authorization") or b"").decode("latin-1").split()
        token = parts[1] if len(parts) == 2 and parts[0].lower() in ("token", "bearer") else None
        grant = self.forge.grant_for_token(token) if token else None
        refused = self.strict and grant is not None and self.newest.get(grant.id, token) != token
        self.seen.append(
            APIRequest(
                reactor.seconds(),
                request.method.decode(),
                request.path.decode(),
                token,
                self.forge.users[grant.user_id].login if grant is not None else None,
                refused,
            )
        )
        if refused:
            # What Forgejo answers for a token that is no longer good.
            request.setResponseCode(401)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"message": "user does not exist [uid: 0, name: ]"}).encode()
        return self.inner.render(request)

    def of(self, login: str) -> list[APIRequest]:
        return [r for r in self.seen if r.login == login]


def calls(*pairs: tuple[str, str]) -> list[str]:
    return [arg for tool, arguments in pairs for arg in ("--call", tool, arguments)]


class SDKOnForgejoMCP(TestCase):
    """
    A broker whose children are the real forgejo-mcp, and the SDK client.
    """

    timeout = SCRIPT_TIMEOUT + 30

    version = PINNED_VERSION
    config: dict[str, Any] = {}

    def setUp(self) -> None:
        if SDK_MISSING:
            raise SkipTest(SDK_MISSING)
        self.binary = find_forgejo_mcp(self.version)
        self.broker = Broker(self, executable=[self.binary], **self.config)
        self.watch = APIWatch(self.broker.forgejo_site.resource, self.broker.forge, self)
        self.broker.forgejo_site.resource = self.watch

    async def run_client(self, login: str, *args: str) -> dict[str, Any]:
        """
        The SDK client signs in as C{login} and runs its session; its summary.
        """
        argv = [
            SCRIPT,
            self.broker.url + "/mcp",
            "--redirect-uri",
            REDIRECT,
            "--timeout",
            str(SCRIPT_TIMEOUT),
            "--login",
            login,
            *args,
        ]
        summary, stderr = await run_sdk_client(self, argv)
        described = f"summary: {json.dumps(summary, indent=1)}\nstderr:\n{stderr}"
        self.assertTrue(summary["initialize"]["ok"], described)
        # Past the first challenge, the broker never refused or lost the session.
        mcp = [r["status"] for r in summary["requests"] if r["path"] == "/mcp"]
        self.assertEqual(mcp[0], 401)
        self.assertFalse({401, 404, 500, 503} & set(mcp[1:]), described)
        return summary

    def results(self, summary: dict[str, Any], tool: str) -> list[Any]:
        """
        What each call of C{tool} returned (forgejo-mcp wraps it in C{Result}).
        """
        found = []
        for call in summary["initialize"]["calls"]:
            if call["tool"] == tool:
                self.assertFalse(call["is_error"], call)
                (text,) = call["text"]
                found.append(json.loads(text)["Result"])
        return found

    def check_user(self, summary: dict[str, Any], login: str, repos: list[str]) -> None:
        self.assertIn(summary["initialize"]["protocol_version"], SUPPORTED_VERSIONS)
        tools = summary["initialize"]["tools"]
        self.assertIn("get_my_user_info", tools)
        self.assertIn("list_my_repos", tools)
        me = self.results(summary, "get_my_user_info")
        self.assertTrue(me)
        user = self.broker.forge.user_by_login(login)
        assert user is not None
        self.assertEqual({(m["login"], m["id"]) for m in me}, {(login, user.id)})
        listed = self.results(summary, "list_my_repos")
        self.assertTrue(listed)
        for page in listed:
            self.assertEqual(sorted(r["full_name"] for r in page), repos)


class ForgejoMCPSessionTests(SDKOnForgejoMCP):
    async def test_sdk_client_on_forgejo_mcp(self) -> None:
        """
        Discovery, registration, consent, Forgejo's login, then initialize,
        tools/list and two tools on forgejo-mcp, as alice.
        """
        summary = await self.run_client("alice", *calls(ME, REPOS))
        self.check_user(summary, "alice", ALICE_REPOS)
        # Every API request reached the stand-in with a live token of alice's.
        self.assertTrue(self.watch.seen)
        self.assertEqual({r.login for r in self.watch.seen}, {"alice"})
        self.assertIn("/api/v1/user/repos", {r.path for r in self.watch.seen})

    async def test_two_users_at_once(self) -> None:
        """
        alice and bob, each with their own SDK client, at the same time on
        one broker: each session's forgejo-mcp holds its own user's token.
        """
        steps = calls(ME, REPOS, ME, REPOS)
        alice, bob = await gatherResults(
            [
                Deferred.fromCoroutine(self.run_client("alice", *steps, "--call-interval", "0.5")),
                Deferred.fromCoroutine(self.run_client("bob", *steps, "--call-interval", "0.5")),
            ]
        )
        self.check_user(alice, "alice", ALICE_REPOS)
        self.check_user(bob, "bob", BOB_REPOS)
        for call in bob["initialize"]["calls"]:
            self.assertNotIn("alice", json.dumps(call), call)
        for call in alice["initialize"]["calls"]:
            self.assertNotIn("bob", json.dumps(call), call)
        # The two sessions were at the stand-in's API at the same time.
        a, b = self.watch.of("alice"), self.watch.of("bob")
        self.assertTrue(a and b)
        self.assertLess(max(a[0].at, b[0].at), min(a[-1].at, b[-1].at), self.watch.seen)
        self.assertEqual({r.login for r in self.watch.seen}, {"alice", "bob"})

    async def test_renewal_mid_session(self) -> None:
        """
        Forgejo access tokens that the broker renews every three seconds or
        so (it renews one in the last quarter of its lifetime; these are
        issued for 4 s): the client keeps calling a tool across several
        renewals and notices nothing.  The stand-in is strict (L{APIWatch}):
        each renewal kills the previous token at once, so a call that still
        reached a child holding it would fail; and the API sees a new token
        after each renewal, which proves the session moved to a child
        holding it.
        (With renewal switched off, both checks fail: the strict stand-in's
        401 comes back to the SDK as an MCP error, and without strictness
        the API sees only the first token.)
        """
        # Not shorter: the stand-in counts expiry in whole seconds, so a 4 s
        # token lives more than the 3 s after which the broker renews it.
        self.broker.forge.access_token_lifetime = 4
        self.watch.strict = True
        summary = await self.run_client("alice", *calls(*[ME] * 14), "--call-interval", "0.6")
        me = self.results(summary, "get_my_user_info")
        self.assertEqual([m["login"] for m in me], ["alice"] * 14)
        self.assertGreaterEqual(self.watch.refreshes, 2)
        self.assertEqual([r for r in self.watch.seen if r.refused], [])
        tokens = {r.token for r in self.watch.seen}
        self.assertGreaterEqual(len(tokens), 3)
        self.assertEqual({r.login for r in self.watch.seen}, {"alice"})


class HibernationTests(SDKOnForgejoMCP):
    """
    Idle sessions cost no process: between the SDK client's calls the
    session's forgejo-mcp is stopped, and each call starts one again with
    the session's handshake replayed; the client notices nothing.
    """

    config = {"session_hibernate_after": 1.0}

    async def test_hibernating_between_calls(self) -> None:
        sessions = self.broker.sessions
        seen: list[tuple[int, int]] = []
        sampler = LoopingCall(lambda: seen.append((len(sessions), sessions.children_running())))
        sampler.start(0.1)
        hibernated = metrics.SESSIONS_HIBERNATED._value.get()
        woken = metrics.SESSIONS_WOKEN._value.get()
        try:
            summary = await self.run_client(
                "alice", *calls(ME, REPOS, ME), "--call-interval", "2.5"
            )
        finally:
            sampler.stop()
        self.check_user(summary, "alice", ALICE_REPOS)
        # One session throughout, whose child came and went: none while it
        # hibernated, one again for each call.
        self.assertIn((1, 0), seen)
        self.assertIn((1, 1), seen)
        self.assertGreaterEqual(metrics.SESSIONS_HIBERNATED._value.get() - hibernated, 2)
        self.assertGreaterEqual(metrics.SESSIONS_WOKEN._value.get() - woken, 2)


class ResumeTests(SDKOnForgejoMCP):
    """
    The broker restarts between two of the SDK client's calls: the client
    goes on with the same session id (kept in the store), served by a new
    forgejo-mcp with the session's handshake replayed.
    """

    async def test_resumed_after_a_restart(self) -> None:
        client = Deferred.fromCoroutine(
            self.run_client("alice", *calls(REPOS, ME, REPOS), "--call-interval", "3")
        )

        # Between two calls (one in flight when the broker stops fails with
        # an error, as it may): once the first call (the only one that lists
        # repositories) reached the API and was answered.
        def between_calls() -> bool:
            sessions = list(self.broker.sessions._sessions.values())
            return (
                "/api/v1/user/repos" in {r.path for r in self.watch.seen}
                and len(sessions) == 1
                and sessions[0].router.in_flight == 0
            )

        await wait_until(between_calls, timeout=60, what="the first call's answer")
        resumed = metrics.SESSIONS_WOKEN._value.get()
        await self.broker.restart()
        self.assertEqual(len(self.broker.sessions), 0)
        summary = await client
        # Every call answered, none refused or lost (run_client checks that
        # no request met 404), the session resumed once in the new broker.
        self.check_user(summary, "alice", ALICE_REPOS)
        self.assertEqual(len(self.results(summary, "list_my_repos")), 2)
        self.assertEqual(metrics.SESSIONS_WOKEN._value.get() - resumed, 1)


class NewestForgejoMCPSessionTests(ForgejoMCPSessionTests):
    """
    The same through the broker with the newest forgejo-mcp release as child.
    """

    version = NEWEST


class NewestHibernationTests(HibernationTests):
    version = NEWEST


class NewestResumeTests(ResumeTests):
    version = NEWEST
