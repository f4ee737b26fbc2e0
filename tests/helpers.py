"""
Shared test plumbing: real loopback HTTP without leaving the reactor dirty.
"""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site


def http_client() -> HTTPClient:
    """
    A treq client that closes every connection after its response, so a
    test ends with no sockets left open.
    """
    pool = HTTPConnectionPool(reactor, persistent=False)
    return HTTPClient(Agent(reactor, pool=pool))


def serve(test: TestCase, resource: Any) -> str:
    """
    Serve C{resource} on a loopback port for the length of C{test}; returns
    its base URL.
    """
    site = Site(resource)
    site.timeOut = None
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[arg-type]
    test.addCleanup(port.stopListening)
    address: Any = port.getHost()
    return f"http://127.0.0.1:{address.port}"
