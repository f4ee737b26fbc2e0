"""
A whole broker for tests: real store, real routes, a stand-in Forgejo on
loopback, and a browser-like client that shows every redirect.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from fjmcp_dev.standin.model import Forge, seed
from fjmcp_dev.standin.web import StandinForgejo
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from fjmcp.app.tap import Broker as Broker_
from fjmcp.app.tap import Seams, build_broker, store_location
from fjmcp.oauth.grants import REVOCATION_INTERVAL
from fjmcp.secrets.crypto import new_pkce_pair
from fjmcp.store import migrate_database
from tests.helpers import listen, make_config
from tests.store_engines import database_overrides

_log = Logger()
SCRIPTED_CHILD = str(Path(__file__).resolve().parent / "scripted_child.py")
REDIRECT = "http://127.0.0.1:9/callback"


class browser:
    """
    A client that keeps cookies like a browser and does not follow
    redirects on its own, so each hop can be checked.
    """

    def __init__(self) -> None:
        self._http = HTTPClient(
            Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)),
            cookiejar=CookieJar(),  # type: ignore[arg-type]
        )

    def get(self, url: str, **kwargs: Any) -> Any:
        return self._http.get(url, allow_redirects=False, **kwargs)

    def post(self, url: str, **kwargs: Any) -> Any:
        return self._http.post(url, allow_redirects=False, **kwargs)


class _LateSite(WrappingFactory):
    """
    Accepts connections for a site built after the port was taken: the
    broker's configuration needs its own URL, so the address comes first.
    A restart points it at the new broker's site.
    """

    def __init__(self) -> None:
        super().__init__(None)

    def doStart(self) -> None:
        # The site is not there yet when the port opens (and the broker's
        # own listeners, not this factory, would start it).
        pass

    def doStop(self) -> None:
        pass

    def drop_connections(self) -> None:
        """
        Close every open connection, as the exit of a broker process would
        (keep-alive connections included: requests on them would otherwise
        reach the stopped broker and wait for its closed database forever).
        """
        for wrapper in list(self.protocols):
            wrapper.transport.abortConnection()


class Broker:
    """
    The broker's routes over a real store, pointed at a stand-in Forgejo.
    """

    def __init__(
        self,
        test: TestCase,
        data: Path | None = None,
        tls_trust_root: Any = None,
        child: Sequence[str] = (),
        executable: Sequence[str] | None = None,
        max_line: int | None = None,
        public_url: str | None = None,
        revocation_interval: float = REVOCATION_INTERVAL,
        metrics: bool = False,
        **config: Any,
    ) -> None:
        """
        @param tls_trust_root: what the client metadata document fetcher
            trusts for https (the platform's trust store by default), so a
            test can serve documents with its own certificate.
        @param child: behaviours of the scripted child
            (C{tests/scripted_child.py}) each MCP session runs.
        @param executable: run this command line (program and leading
            arguments) as the child instead, e.g. the real forgejo-mcp.
        @param max_line: the longest stdout line a child may write (the
            session manager's default when None).
        @param public_url: the broker's public base URL when it is not the
            address it listens on (e.g. behind a reverse proxy); its
            metadata and the redirect URI registered at the stand-in use it.
        @param revocation_interval: how often the grants held in memory
            are checked for revocation by another process (as in the daemon).
        @param metrics: measure the site's requests and serve C{/metrics}
            on a separate loopback listener at C{metrics_url}, as the
            daemon does with C{--metrics-listen}.
        @param config: L{fjmcp.config.Config} fields to set (e.g.
            C{access_token_lifetime}).
        """
        self.test = test
        self.child = list(child)
        self.command = (
            list(executable)
            if executable is not None
            # -S: the scripted child needs only the standard library, and the
            # venv's start-up hooks were most of each child's start.
            else [sys.executable, "-S", SCRIPTED_CHILD, *child]
        )
        self.tls_trust_root = tls_trust_root
        self.max_line = max_line
        self.revocation_interval = revocation_interval
        self.forgejo_site, self.forgejo_url = listen(test)
        self.forge = Forge(reactor.seconds)
        seed(self.forge)
        self._late = _LateSite()
        # A deep accept queue, as a production listener behind Caddy would
        # want: tests that open many connections at once are not each a
        # SYN retransmission (1 s) late.
        self._port = reactor.listenTCP(
            0,
            self._late,  # type: ignore[arg-type]  # Twisted types WrappingFactory a ClientFactory
            backlog=1024,
            interface="127.0.0.1",
        )
        test.addCleanup(self._port.stopListening)
        self.url = f"http://127.0.0.1:{self._port.getHost().port}"
        self.metrics_url = ""
        if metrics:
            config["metrics_listen"] = "tcp:0:interface=127.0.0.1"
        self.public_url = public_url or self.url
        self.data = data or Path(test.mktemp()).resolve()
        self.config = make_config(
            str(self.data),
            public_url=self.public_url,
            forgejo_url=self.forgejo_url,
            forgejo_client_id="fjmcp-broker",
            forgejo_client_secret="gto_brokersecret",
            cimd_allow_loopback=True,
            **{"listen": (), **database_overrides(test), **config},
        )
        self.forge.add_app(
            "fjmcp",
            [self.public_url + "/oauth/callback"],
            confidential=True,
            client_id="fjmcp-broker",
            client_secret="gto_brokersecret",
        )
        standin = StandinForgejo(self.forge, self.forgejo_url, test_login=True)
        self.forgejo_site.resource = standin.resource()
        self.start()

    def start(self) -> None:
        """
        Build the broker with the daemon's own composition root
        (L{fjmcp.app.tap.build_broker}) and start it.  Only the seams differ:
        the child's command, shorter grace periods, and the address, which
        was taken before the broker existed because its URL is part of the
        configuration.
        """
        migrate_database(store_location(self.config))
        self.parts = build_broker(
            self.config,
            reactor,
            Seams(
                child_command=tuple(self.command),
                child_grace=(0.5, 0.5),
                max_line=self.max_line,
                revocation_interval=self.revocation_interval,
                sse_keepalive=1.0,
                cimd_trust_root=self.tls_trust_root,
            ),
        )
        parts = self.parts
        self.store = parts.store
        self.sessions = parts.sessions
        self.clients = parts.clients
        self.credentials = parts.credentials
        self.tokens = parts.tokens
        self.bearers = parts.bearers
        self.mcp = parts.mcp
        self.site = parts.site
        # For tests that take the broker's port down or ask where it is.
        self.site.port = self._port
        self._late.wrappedFactory = parts.site
        parts.service.privilegedStartService()
        parts.service.startService()
        self.test.addCleanup(self._stop, parts)
        if parts.metrics_listener is not None:
            assert parts.metrics_listener.port is not None
            address: Any = parts.metrics_listener.port.getHost()
            self.metrics_url = f"http://127.0.0.1:{address.port}"

    def _stop(self, parts: Broker_) -> Any:
        if parts.service.running:
            return parts.service.stopService()
        return None

    async def restart(self) -> None:
        """
        Stop the broker (its sessions end, its database closes) and start a
        new one on the same data, as a restarted daemon would; connections
        to the old one are closed, as its process's exit would close them.
        """
        began = reactor.seconds()
        await self._stop(self.parts)
        _log.info("test broker stopped in {t:.2f} s", t=reactor.seconds() - began)
        self._late.drop_connections()
        self.start()

    async def register(self, **metadata: Any) -> dict[str, Any]:
        body = {"redirect_uris": [REDIRECT], "token_endpoint_auth_method": "none"}
        body.update(metadata)
        return await self.clients.register(body)


def location(response: Any) -> str:
    return response.headers.getRawHeaders(b"location")[0].decode()


def query(url: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(url).query).items()}


class BrokerTestCase(TestCase):
    """
    A broker, a browser and a PKCE pair per test, with the steps of a login.
    """

    def setUp(self) -> None:
        self.broker = Broker(self)
        self.browser = browser()
        self.verifier, self.challenge = new_pkce_pair()

    def authorize_url(self, client_id: str, **extra: str) -> str:
        params = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT,
            "code_challenge": self.challenge,
            "code_challenge_method": "S256",
            "state": "client-state-1",
            "scope": "claudeai offline_access",
            "resource": self.broker.url + "/mcp",
        }
        params.update(extra)
        return self.broker.url + "/oauth/authorize?" + urlencode(params)

    async def consent(self, client_id: str, **extra: str) -> tuple[Any, str]:
        response = await self.browser.get(self.authorize_url(client_id, **extra))
        body = (await response.content()).decode()
        return response, body

    async def approve(self, body: str, decision: str = "approve") -> Any:
        token = body.split('name="consent" value="')[1].split('"')[0]
        return await self.browser.post(
            self.broker.url + "/oauth/authorize",
            data={"consent": token, "decision": decision},
        )

    async def through_forgejo(self, upstream_url: str, login: str = "alice") -> str:
        """
        The stand-in signs the user in (test switch) and sends them back.
        """
        response = await self.browser.get(
            upstream_url, headers=Headers({b"X-Standin-Login": [login.encode()]})
        )
        await response.content()
        self.assertEqual(response.code, 303)
        back = location(response)
        self.assertTrue(back.startswith(self.broker.url + "/oauth/callback?"), back)
        response = await self.browser.get(back)
        await response.content()
        self.assertEqual(response.code, 303)
        return location(response)

    async def login_tokens(self, login: str = "alice", **register: Any) -> dict[str, Any]:
        """
        Register a client, log in as C{login} through consent and Forgejo,
        and redeem the code at the token endpoint: what an MCP client ends
        up holding.
        """
        client = await self.broker.register(**register)
        _, body = await self.consent(client["client_id"])
        final = await self.through_forgejo(location(await self.approve(body)), login)
        form = {
            "grant_type": "authorization_code",
            "code": query(final)["code"],
            "redirect_uri": REDIRECT,
            "code_verifier": self.verifier,
            "client_id": client["client_id"],
        }
        if "client_secret" in client:
            form["client_secret"] = client["client_secret"]
        response = await self.browser.post(self.broker.url + "/oauth/token", data=form)
        tokens: dict[str, Any] = await response.json()
        self.assertEqual(response.code, 200, tokens)
        tokens["client"] = client
        return tokens

    async def revoke_token(self, tokens: dict[str, Any], which: str = "refresh_token") -> None:
        """
        The client revokes one of the tokens it holds (from L{login_tokens}) at
        the broker's revocation endpoint (RFC 7009), which answers 200.
        """
        data = {"token": tokens[which], "client_id": tokens["client"]["client_id"]}
        if which == "refresh_token":
            data["token_type_hint"] = which
        response = await self.browser.post(self.broker.url + "/oauth/revoke", data=data)
        await response.content()
        self.assertEqual(response.code, 200)

    async def mcp_rpc(
        self, token: str, body: dict[str, Any], session_id: str | None = None
    ) -> tuple[int, dict[str, Any], Headers]:
        """
        One JSON-RPC POST to /mcp; for an SSE answer, its last message.
        """
        headers = {
            b"Content-Type": [b"application/json"],
            b"Accept": [b"application/json, text/event-stream"],
            b"Authorization": [b"Bearer " + token.encode()],
        }
        if session_id:
            headers[b"Mcp-Session-Id"] = [session_id.encode()]
        response = await self.browser.post(
            self.broker.url + "/mcp", data=json.dumps(body).encode(), headers=Headers(headers)
        )
        raw = await response.content()
        if response.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]:
            events = [
                json.loads(line[len(b"data: ") :])
                for line in raw.splitlines()
                if line.startswith(b"data: ")
            ]
            return response.code, events[-1], response.headers
        return response.code, json.loads(raw) if raw else {}, response.headers

    async def mcp_session(self, login: str = "alice") -> tuple[str, str]:
        """
        Log in as C{login} and open an MCP session: (access token, session id).
        """
        token = (await self.login_tokens(login))["access_token"]
        code, _, headers = await self.mcp_rpc(
            token,
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {}},
            },
        )
        self.assertEqual(code, 200)
        session_id = (headers.getRawHeaders(b"mcp-session-id") or [b""])[0].decode()
        await self.mcp_rpc(
            token, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session_id
        )
        return token, session_id


ROOT = Path(__file__).resolve().parent.parent


async def run_sdk_client(test: TestCase, argv: Sequence[str]) -> tuple[dict[str, Any], str]:
    """
    Run one of the SDK client scripts (C{python ARGV...} from the project
    root) while the broker goes on serving in this reactor; return its JSON
    summary (its last stdout line) and its stderr.  A script that could not
    run, or ended in an error, fails the test; exit status 3 means the
    installed SDK lacks an API, and the test is skipped.
    """
    out, err, code = await getProcessOutputAndValue(
        sys.executable, list(argv), env=dict(os.environ, PYTHONUNBUFFERED="1"), path=str(ROOT)
    )
    lines = out.decode("utf-8", "replace").strip().splitlines()
    stderr = err.decode("utf-8", "replace")
    if not lines:
        test.fail(f"the SDK client printed nothing (exit {code}); stderr:\n{stderr}")
    try:
        summary: dict[str, Any] = json.loads(lines[-1])
    except ValueError:
        test.fail(f"the SDK client ended without a summary (exit {code}):\n{out!r}\n{stderr}")
    if code == 3:
        raise SkipTest(f"the installed mcp SDK lacks an API: {summary.get('unsupported')}")
    described = f"summary: {json.dumps(summary, indent=1)}\nstderr:\n{stderr}"
    test.assertEqual((code, summary["error"]), (0, None), described)
    # Kept in the test log (_trial_temp/test.log) for whoever debugs a failure.
    _log.info("SDK client summary: {summary}", summary=described)
    return summary, stderr
