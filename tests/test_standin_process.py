"""
The Forgejo stand-in as its own process (C{python -m fjmcp_dev.standin}), the
way the demo and the end-to-end tests start it: it announces its URL on the
first stdout line and then answers real HTTP.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from fjmcp_dev.standin.model import VERSION
from treq.client import HTTPClient
from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

ANNOUNCEMENT = b"forgejo-standin listening on "
STARTUP_TIMEOUT = 30.0


class StandinProcess(ProcessProtocol):
    """
    Collects output; C{announced} fires with the URL from the first stdout
    line, C{ended} when the process is gone.
    """

    def __init__(self) -> None:
        self.announced: Deferred[str] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self.stdout = b""
        self.stderr = b""
        self.running = True
        self.reason: Failure | None = None

    def outReceived(self, data: bytes) -> None:
        self.stdout += data
        if not self.announced.called and b"\n" in self.stdout:
            line = self.stdout.split(b"\n", 1)[0].strip()
            if line.startswith(ANNOUNCEMENT):
                self.announced.callback(line[len(ANNOUNCEMENT) :].decode())
            else:
                self.announced.errback(ValueError(f"unexpected first line: {line!r}"))

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Failure) -> None:
        self.running = False
        self.reason = reason
        if not self.announced.called:
            self.announced.errback(
                RuntimeError(f"the stand-in exited before announcing: {self.stderr!r}")
            )
        self.ended.callback(None)


class ProcessTests(TestCase):
    timeout = 60

    def spawn(self, *args: str) -> StandinProcess:
        protocol = StandinProcess()
        reactor: Any = _reactor
        assert IReactorProcess.providedBy(reactor) and IReactorTime.providedBy(reactor)
        transport = reactor.spawnProcess(
            protocol,
            sys.executable,
            [sys.executable, "-m", "fjmcp_dev.standin", *args],
            env=dict(os.environ),
        )

        async def stop() -> None:
            if protocol.running:
                transport.signalProcess("KILL")
            await protocol.ended

        # Always killed and reaped, whatever the test did.
        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        protocol.announced.addTimeout(STARTUP_TIMEOUT, reactor)
        return protocol

    async def test_serves_real_http(self):
        process = self.spawn(
            "--listen",
            "tcp:0:interface=127.0.0.1",
            "--client",
            "id:secret:http://127.0.0.1:9/cb",
            "--test-login",
        )
        url = await process.announced
        self.assertTrue(url.startswith("http://127.0.0.1:"), url)
        self.assertNotEqual(url, "http://127.0.0.1:0")

        pool = HTTPConnectionPool(_reactor)
        self.addCleanup(pool.closeCachedConnections)
        client = HTTPClient(Agent(_reactor, pool=pool))

        response = await client.get(url + "/api/v1/version")
        self.assertEqual(response.code, 200)
        self.assertEqual(await response.json(), {"version": VERSION})

        # The registered client and the test switch are live too.
        response = await client.get(
            url + "/login/oauth/authorize",
            params={
                "client_id": "id",
                "redirect_uri": "http://127.0.0.1:9/cb",
                "response_type": "code",
                "state": "s",
            },
            headers=Headers({"X-Standin-Login": ["alice"]}),
            allow_redirects=False,
        )
        await response.content()
        self.assertEqual(response.code, 303)
        (location,) = response.headers.getRawHeaders("location")
        self.assertTrue(location.startswith("http://127.0.0.1:9/cb?code=gta_"), location)

        # Its discovery document names the port it really listens on.
        response = await client.get(url + "/.well-known/openid-configuration")
        self.assertEqual((await response.json())["issuer"], url)

    async def test_bad_arguments(self):
        """
        A malformed --client is a usage error: exit status 2, no listening.
        """
        process = self.spawn("--listen", "tcp:0:interface=127.0.0.1", "--client", "nocolons")
        process.announced.addErrback(lambda _: None)
        await process.ended
        assert process.reason is not None
        ended = process.reason.value
        assert isinstance(ended, ProcessTerminated), ended
        self.assertEqual(ended.exitCode, 2)
        self.assertEqual(process.stdout, b"")
        self.assertIn(b"--client needs CLIENT_ID:SECRET:REDIRECT_URI", process.stderr)
