"""
The MCP reference server C{@modelcontextprotocol/server-everything} as the
session child, and the official Python SDK as the client, through the whole
broker (OAuth included): everything a server sends a client besides plain
responses.  Progress notifications, a sampling request and an elicitation
request must reach the client on the stream of the tool call that caused
them and the client's answers must reach the server; list_changed
notifications must come on the session's GET stream; and a request the
server makes while no client request is in flight (roots/list) must come on
the GET stream too, with the client's answer routed back.

The server is a Node package pinned in C{tests/node/package-lock.json} and
installed by C{make node-deps} (part of C{make test}).  Without Node or the
installed package these tests skip with the reason; under CI=true they fail.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, NoReturn

from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase

from fjmcp.http import streamable as mcp_http
from fjmcp.mcp.router import SessionRouter
from tests.broker_support import REDIRECT, Broker, run_sdk_client

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = ROOT / "tests" / "node"
PACKAGE = "@modelcontextprotocol/server-everything"
PACKAGE_DIR = NODE_DIR / "node_modules" / PACKAGE
SCRIPT_TIMEOUT = 90
CHILD_ID_OFFSET = 1001

log = Logger()

try:
    import mcp.client.session  # noqa: F401
except ImportError:
    SDK_MISSING: str | None = "the mcp SDK is not installed"
else:
    SDK_MISSING = None


def _pinned() -> str:
    try:
        return str(json.loads((NODE_DIR / "package.json").read_text())["dependencies"][PACKAGE])
    except (OSError, ValueError, KeyError):
        return "?"


def _unavailable(reason: str) -> NoReturn:
    """
    Skip; under CI fail, since `make test` installs the package first.
    """
    if os.environ.get("CI"):
        raise AssertionError(f"{reason} (in CI `make node-deps` must provide it)")
    raise SkipTest(f"{reason}: run `make node-deps`")


def find_everything() -> list[str]:
    """
    The command line that runs the pinned server-everything over stdio.
    The child gets an empty environment (PATH=/usr/local/bin:/usr/bin:/bin),
    so node is named by its absolute path.  The server's launcher takes the
    transport as its first argument and ignores the rest, so the
    C{--transport stdio} the session manager appends does no harm.
    """
    node = shutil.which("node")
    if node is None:
        _unavailable(f"node is not installed, so {PACKAGE} cannot run")
    try:
        manifest = json.loads((PACKAGE_DIR / "package.json").read_text())
    except (OSError, ValueError):
        _unavailable(f"{PACKAGE} {_pinned()} is not installed in {NODE_DIR}")
    if manifest.get("version") != _pinned():
        _unavailable(
            f"{PACKAGE} {manifest.get('version')} is installed in {NODE_DIR}, "
            f"not the pinned {_pinned()}"
        )
    entry = PACKAGE_DIR / manifest["bin"]["mcp-server-everything"]
    return [os.path.realpath(node), str(entry), "stdio"]


class EverythingServerTests(TestCase):
    timeout = SCRIPT_TIMEOUT + 30

    def setUp(self) -> None:
        if SDK_MISSING:
            raise SkipTest(SDK_MISSING)
        self.command = find_everything()
        # What the broker wrote on SSE streams: the HTTP method of the
        # stream (GET: the session's stream; POST: a request's response)
        # and what each message was.
        self.written: list[tuple[str, dict[str, Any]]] = []
        original = mcp_http._SSE.send

        def send(sse: Any, message: dict[str, Any]) -> None:
            if sse.open:
                method = sse.request.method.decode()
                self.written.append((method, message))
            original(sse, message)

        self.patch(mcp_http._SSE, "send", send)
        # The SDK numbers its requests from 1 as the router numbers them
        # towards the child, so a single client's ids (and the progress
        # tokens made from them) would pass through unchanged even if the
        # router forgot to map them back.  Start the child-side ids
        # elsewhere, so every mapping shows.
        init = SessionRouter.__init__

        def offset_ids(router: SessionRouter, *args: Any, **kwargs: Any) -> None:
            init(router, *args, **kwargs)
            router._next_child_id = CHILD_ID_OFFSET

        self.patch(SessionRouter, "__init__", offset_ids)

    async def run_client(self, broker: Broker) -> dict[str, Any]:
        argv = [
            "-m",
            "tests.everything_client",
            broker.url + "/mcp",
            "--redirect-uri",
            REDIRECT,
            "--timeout",
            str(SCRIPT_TIMEOUT),
        ]
        summary, _ = await run_sdk_client(self, argv)
        return summary

    async def test_server_to_client_traffic(self) -> None:
        broker = Broker(self, executable=self.command)
        summary = await self.run_client(broker)
        session = summary["session"]
        self.assertEqual(session["server"], "mcp-servers/everything")
        self.assertIn(session["protocol_version"], mcp_http.SUPPORTED_VERSIONS)
        # The tools that exist only for clients offering sampling and
        # elicitation: the child saw the client's capabilities.
        for tool in ("trigger-sampling-request", "trigger-elicitation-request"):
            self.assertIn(tool, session["tools"])

        exchanges = summary["exchanges"]
        gets = [e for e in exchanges if e["http"] == "GET"]
        self.assertTrue(gets, exchanges)
        self.assertTrue(all(e["status"] == 200 for e in gets), gets)
        on_get = [m for e in gets for m in e["messages"]]
        posts = [e for e in exchanges if e["http"] == "POST"]
        on_post = [m for e in posts for m in e["messages"]]

        # Which POST carried which tool call: the tools/call POSTs in order.
        tool_posts = [e for e in posts if (e["sent"] or {}).get("method") == "tools/call"]
        self.assertEqual(len(tool_posts), 4, tool_posts)
        long_post, sampling_post, elicitation_post, gzip_post = tool_posts
        for post in tool_posts:
            self.assertEqual(post["status"], 200, post)
            # Exactly one response, the last message, with the POST's id.
            responses = [m for m in post["messages"] if m.get("response") or "error" in m]
            self.assertEqual(responses, [{"id": post["sent"]["id"], "response": True}], post)
            self.assertEqual(post["messages"][-1], responses[0])

        # Progress: on the tool call's own stream, in order, to the callback.
        progress = summary["progress"]
        self.assertGreaterEqual(len(progress), 2, progress)
        values = [p["progress"] for p in progress]
        self.assertEqual(values, sorted(set(values)), progress)
        self.assertEqual(values[-1], 4)
        self.assertTrue(all(p["total"] == 4 for p in progress), progress)
        self.assertTrue(all(p["in_flight"] == 1 for p in progress), progress)
        self.assertEqual(
            [m["method"] for m in long_post["messages"][:-1]],
            ["notifications/progress"] * len(progress),
        )
        self.assertEqual(
            session["long_running"],
            {
                "error": False,
                "texts": ["Long running operation completed. Duration: 1 seconds, Steps: 4."],
            },
        )

        # Sampling: the request came on the tool call's stream with a
        # broker-side id; the fixed answer went back and into the result.
        (sampling,) = summary["sampling"]
        self.assertEqual(sampling["max_tokens"], 16)
        self.assertEqual(
            sampling["messages"], ["Resource trigger-sampling-request context: say hi"]
        )
        self.assertTrue(str(sampling["request_id"]).startswith("fjmcp-"), sampling)
        self.assertIn(
            {"method": "sampling/createMessage", "id": sampling["request_id"]},
            sampling_post["messages"],
        )
        self.assertFalse(session["sampling_tool"]["error"], session)
        (text,) = session["sampling_tool"]["texts"]
        result = json.loads(text.split("\n", 1)[1])
        self.assertEqual(result["content"], {"type": "text", "text": "fjmcp sampled answer 7c1d"})
        self.assertEqual(result["model"], "fjmcp-test-model")
        answers = [
            e for e in posts if e["sent"] == {"id": sampling["request_id"], "response": True}
        ]
        self.assertEqual([a["status"] for a in answers], [202], posts)

        # Elicitation, likewise.
        (elicitation,) = summary["elicitation"]
        self.assertIn("name", elicitation["fields"])
        self.assertTrue(str(elicitation["request_id"]).startswith("fjmcp-"), elicitation)
        self.assertIn(
            {"method": "elicitation/create", "id": elicitation["request_id"]},
            elicitation_post["messages"],
        )
        texts = session["elicitation_tool"]["texts"]
        self.assertFalse(session["elicitation_tool"]["error"], session)
        self.assertIn("User provided the requested information", texts[0])
        self.assertIn("- Name: Ada Lovelace", texts[1])
        self.assertIn("- Agreed to terms: true", texts[1])
        self.assertIn("- Favorite Integer: 7", texts[1])
        answers = [
            e for e in posts if e["sent"] == {"id": elicitation["request_id"], "response": True}
        ]
        self.assertEqual([a["status"] for a in answers], [202], posts)

        # list_changed: tools (while nothing was in flight) and resources
        # (while the gzip tool call was), both on the GET stream only.
        for method in ("notifications/tools/list_changed", "notifications/resources/list_changed"):
            self.assertIn({"method": method}, on_get, gets)
            self.assertNotIn({"method": method}, on_post, posts)
            self.assertIn(method, [m["method"] for g, m in self.written if g == "GET"])
            self.assertNotIn(method, [m.get("method") for g, m in self.written if g == "POST"])
        events = summary["events"]
        tools_changed = [e for e in events if e.get("method") == "notifications/tools/list_changed"]
        self.assertTrue(tools_changed, events)
        self.assertEqual(tools_changed[0]["in_flight"], 0, events)
        self.assertEqual(gzip_post["messages"], [{"id": gzip_post["sent"]["id"], "response": True}])
        link = "demo://resource/session/fjmcp-test.txt.gz"
        self.assertEqual(session["gzip_tool"], {"error": False, "links": [link]})
        self.assertIn(link, session["resources"])

        # roots/list: asked while no client request was in flight, so on
        # the GET stream; the answer reached the server, which said so.
        (roots,) = summary["roots"]
        self.assertTrue(str(roots["request_id"]).startswith("fjmcp-"), roots)
        self.assertIn({"method": "roots/list", "id": roots["request_id"]}, on_get)
        self.assertNotIn({"method": "roots/list", "id": roots["request_id"]}, on_post)
        answers = [e for e in posts if e["sent"] == {"id": roots["request_id"], "response": True}]
        self.assertEqual([a["status"] for a in answers], [202], posts)
        self.assertIn("Roots updated: 1 root(s) received from client", summary["logs"])
        self.assertIn({"method": "notifications/message"}, on_get)

        # No POST or GET the broker refused, and nothing it did not route.
        self.assertNotIn(500, [e["status"] for e in exchanges])
        self.assertFalse([e for e in events if e["kind"] == "exception"], events)
