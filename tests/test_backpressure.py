"""
Backpressure: a client that reads slowly holds its session's child back
instead of making the broker buffer without bound.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol

from tests.broker_support import BrokerTestCase
from tests.helpers import wait_until


class SlowReader(Protocol):
    """
    Sends one raw HTTP request, then reads only when told to.
    """

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.received = bytearray()
        self.done: Deferred[bytes] = Deferred()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.request)
        self.transport.pauseProducing()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.done.callback(bytes(self.received))


class BackpressureTests(BrokerTestCase):
    async def test_slow_reader_pauses_the_child(self) -> None:
        token, session_id = await self.mcp_session()
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 5,
                "method": "tools/call",
                "params": {
                    "name": "flood",
                    "arguments": {"count": 3000},
                    "_meta": {"progressToken": "p"},
                },
            }
        ).encode()
        port = int(self.broker.url.rsplit(":", 1)[1])
        raw = (
            b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\nAccept: application/json, text/event-stream\r\n"
            b"Authorization: Bearer " + token.encode() + b"\r\n"
            b"Mcp-Session-Id: " + session_id.encode() + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        reader = SlowReader(raw)
        factory = ClientFactory.forProtocol(lambda: reader)
        reactor.connectTCP("127.0.0.1", port, factory)  # type: ignore[arg-type]
        session = self.broker.sessions.get(session_id, 1)
        assert session is not None
        # ~12 MB of notifications against a reader that reads nothing: the
        # broker stops reading the child instead of buffering it all.
        await wait_until(lambda: session.child.reading_paused)
        assert reader.transport is not None
        reader.transport.resumeProducing()
        received = await reader.done
        events = [
            json.loads(line[len(b"data: ") :])
            for line in received.split(b"\r\n\r\n", 1)[1].splitlines()
            if line.startswith(b"data: ")
        ]
        progress = [e for e in events if e.get("method") == "notifications/progress"]
        self.assertEqual(len(progress), 3000)
        self.assertEqual(events[-1]["result"]["content"][0]["text"], "flooded")
        self.assertFalse(session.child.reading_paused)
