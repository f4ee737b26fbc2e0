"""
An MCP client built on the official Python SDK (C{mcp}), run as a separate
process by L{tests.test_everything} against a broker whose sessions run the
reference server C{@modelcontextprotocol/server-everything}: what goes from
the server to the client besides plain responses, through the broker.

It logs in through OAuth exactly as L{tests.sdk_oauth_client} does (whose
browser and token storage it borrows), initializes a session that offers
sampling, elicitation and roots, and then:

  1. waits for the C{notifications/tools/list_changed} the server sends
     when it registers its capability-dependent tools, right after
     C{notifications/initialized};
  2. answers the C{roots/list} request the server makes shortly after, and
     waits for the log message in which the server confirms the roots it
     received (so the answer reached it through the broker);
  3. calls C{trigger-long-running-operation} with a progress callback;
  4. calls C{trigger-sampling-request}; the sampling callback answers with a
     fixed text, which the tool puts in its result;
  5. calls C{trigger-elicitation-request}; the elicitation callback accepts
     with fixed content, which the tool puts in its result;
  6. calls C{gzip-file-as-resource} on a C{data:} URL, which registers a
     session resource, so the server sends
     C{notifications/resources/list_changed}; waits for it and lists the
     resources.

Every notification and server request the session sees is recorded with
the number of the client's requests in flight when it arrived.  An httpx
transport underneath the SDK also records, per HTTP exchange with /mcp,
which JSON-RPC messages arrived on it (a POST's response stream or the GET
stream), so the test can tell which stream delivered what.

The last line on stdout is a JSON summary.  Exit status: 0 when the run
went to the end, 1 on an error (the summary says which), 3 when the
installed SDK lacks an API this script needs.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

try:
    import anyio
    import httpx2 as httpx
    import mcp_types as types
    from mcp.client.session import ClientRequestContext, ClientSession, IncomingMessage
    from mcp.client.streamable_http import streamable_http_client

    from tests.sdk_oauth_client import Browser, MemoryStorage, public_client, run_script
except ImportError as e:  # an SDK older than this script expects
    print(json.dumps({"unsupported": f"{type(e).__name__}: {e}"}))
    sys.exit(3)

SAMPLED_TEXT = "fjmcp sampled answer 7c1d"
SAMPLING_MODEL = "fjmcp-test-model"
ELICITED: dict[str, str | int | float | bool | list[str] | None] = {
    "name": "Ada Lovelace",
    "check": True,
    "integer": 7,
}
ROOT_URI = "file:///srv/fjmcp-test-root"
RESOURCE_NAME = "fjmcp-test.txt.gz"
RESOURCE_DATA = "data:text/plain;base64," + base64.b64encode(b"hello through fjmcp\n").decode()

T = TypeVar("T")


def _summarize(message: Any) -> dict[str, Any]:
    """
    What a JSON-RPC message is, without its payload.
    """
    if not isinstance(message, dict):
        return {"invalid": True}
    out: dict[str, Any] = {}
    if "method" in message:
        out["method"] = message["method"]
    if "id" in message:
        out["id"] = message["id"]
    if "result" in message:
        out["response"] = True
    if "error" in message:
        out["error"] = message["error"].get("code") if isinstance(message["error"], dict) else True
    return out


class _SSETap:
    """
    Splits a byte stream into server-sent events and notes the JSON-RPC
    message each carries.
    """

    def __init__(self, messages: list[dict[str, Any]]) -> None:
        self._messages = messages
        self._buffer = b""
        self._data: list[bytes] = []

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            line = line.rstrip(b"\r")
            if not line:
                self._dispatch()
            elif line.startswith(b"data:"):
                self._data.append(line[5:].removeprefix(b" "))

    def _dispatch(self) -> None:
        if not self._data:
            return
        raw, self._data = b"\n".join(self._data), []
        try:
            self._messages.append(_summarize(json.loads(raw)))
        except ValueError:
            self._messages.append({"unparsable": raw[:200].decode("utf-8", "replace")})


class _TappedStream(httpx.AsyncByteStream):
    def __init__(self, inner: Any, exchange: dict[str, Any]) -> None:
        self._inner = inner
        self._exchange = exchange
        self._sse = exchange["content_type"].startswith("text/event-stream")
        self._tap = _SSETap(exchange["messages"])
        self._body = b""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            if self._sse:
                self._tap.feed(chunk)
            else:
                self._body += chunk
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            if not self._sse and self._body and not self._exchange["messages"]:
                try:
                    self._exchange["messages"].append(_summarize(json.loads(self._body)))
                except ValueError:
                    pass


class StreamRecorder(httpx.AsyncBaseTransport):
    """
    An httpx transport that notes, per exchange with the MCP endpoint, the
    JSON-RPC message sent (for a POST) and every message that came back on
    that HTTP response, in order.
    """

    def __init__(self, mcp_path: str) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._mcp_path = mcp_path
        self.exchanges: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if request.url.path.rstrip("/") != self._mcp_path.rstrip("/"):
            return response
        sent = None
        if request.method == "POST":
            try:
                sent = _summarize(json.loads(request.content))
            except (ValueError, httpx.RequestNotRead):
                sent = {"unreadable": True}
        exchange: dict[str, Any] = {
            "http": request.method,
            "sent": sent,
            "status": response.status_code,
            "content_type": response.headers.get("content-type", ""),
            "messages": [],
        }
        self.exchanges.append(exchange)
        response.stream = _TappedStream(response.stream, exchange)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class Observer:
    """
    The client side of the session: its callbacks, and what each saw.
    """

    def __init__(self) -> None:
        self.in_flight = 0
        self.events: list[dict[str, Any]] = []
        self.progress: list[dict[str, Any]] = []
        self.sampling: list[dict[str, Any]] = []
        self.elicitation: list[dict[str, Any]] = []
        self.roots: list[dict[str, Any]] = []
        self.logs: list[str] = []
        self.tools_changed = anyio.Event()
        self.resources_changed = anyio.Event()
        self.roots_confirmed = anyio.Event()

    def _event(self, kind: str, **extra: Any) -> None:
        self.events.append({"kind": kind, "in_flight": self.in_flight, **extra})

    async def request(self, call: Awaitable[T]) -> T:
        """
        Await one client request, counting it as in flight meanwhile.
        """
        self.in_flight += 1
        try:
            return await call
        finally:
            self.in_flight -= 1

    async def on_message(self, message: IncomingMessage) -> None:
        if isinstance(message, Exception):
            self._event("exception", error=f"{type(message).__name__}: {message}"[:300])
            return
        method = getattr(message, "method", type(message).__name__)
        self._event("notification", method=method)
        if method == "notifications/tools/list_changed":
            self.tools_changed.set()
        elif method == "notifications/resources/list_changed":
            self.resources_changed.set()

    async def on_log(self, params: types.LoggingMessageNotificationParams) -> None:
        text = params.data if isinstance(params.data, str) else json.dumps(params.data)
        self.logs.append(text)
        if text.startswith("Roots updated: 1 root(s)"):
            self.roots_confirmed.set()

    async def on_progress(self, progress: float, total: float | None, message: str | None) -> None:
        self.progress.append(
            {"progress": progress, "total": total, "message": message, "in_flight": self.in_flight}
        )

    async def on_sampling(
        self, context: ClientRequestContext, params: types.CreateMessageRequestParams
    ) -> types.CreateMessageResult:
        self._event("request", method="sampling/createMessage", id=context.request_id)
        self.sampling.append(
            {
                "request_id": context.request_id,
                "max_tokens": params.max_tokens,
                "system_prompt": params.system_prompt,
                "messages": [
                    getattr(m.content, "text", None) for m in params.messages if m.role == "user"
                ],
            }
        )
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text=SAMPLED_TEXT),
            model=SAMPLING_MODEL,
            stop_reason="endTurn",
        )

    async def on_elicitation(
        self, context: ClientRequestContext, params: types.ElicitRequestParams
    ) -> types.ElicitResult:
        self._event("request", method="elicitation/create", id=context.request_id)
        schema = getattr(params, "requested_schema", None)
        properties = schema.get("properties", {}) if isinstance(schema, dict) else {}
        self.elicitation.append(
            {
                "request_id": context.request_id,
                "message": getattr(params, "message", None),
                "fields": sorted(properties),
            }
        )
        return types.ElicitResult(action="accept", content=dict(ELICITED))

    async def on_list_roots(self, context: ClientRequestContext) -> types.ListRootsResult:
        self._event("request", method="roots/list", id=context.request_id)
        self.roots.append({"request_id": context.request_id})
        return types.ListRootsResult(
            roots=[types.Root.model_validate({"uri": ROOT_URI, "name": "fjmcp test root"})]
        )


def _texts(result: Any) -> list[str]:
    return [c.text for c in getattr(result, "content", []) if getattr(c, "type", None) == "text"]


async def _wait(event: anyio.Event, seconds: float, what: str) -> None:
    try:
        with anyio.fail_after(seconds):
            await event.wait()
    except TimeoutError:
        raise TimeoutError(f"no {what} within {seconds} seconds") from None


async def exercise(session: ClientSession, seen: Observer, wait: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    init = await seen.request(session.initialize())
    out["protocol_version"] = init.protocol_version
    out["server"] = init.server_info.name

    # 1. The list_changed the server sends once it knows our capabilities.
    await _wait(seen.tools_changed, wait, "notifications/tools/list_changed")
    # 2. roots/list comes from the server by itself; the log message says
    # it got our answer.
    await _wait(seen.roots_confirmed, wait, "confirmation of the roots answer")
    tools = await seen.request(session.list_tools())
    out["tools"] = sorted(t.name for t in tools.tools)

    # 3. Progress.
    result = await seen.request(
        session.call_tool(
            "trigger-long-running-operation",
            {"duration": 1, "steps": 4},
            progress_callback=seen.on_progress,
        )
    )
    out["long_running"] = {"error": result.is_error, "texts": _texts(result)}

    # 4. Sampling.
    result = await seen.request(
        session.call_tool("trigger-sampling-request", {"prompt": "say hi", "maxTokens": 16})
    )
    out["sampling_tool"] = {"error": result.is_error, "texts": _texts(result)}

    # 5. Elicitation.
    result = await seen.request(session.call_tool("trigger-elicitation-request", {}))
    out["elicitation_tool"] = {"error": result.is_error, "texts": _texts(result)}

    # 6. A resource appears: resources/list_changed.
    result = await seen.request(
        session.call_tool(
            "gzip-file-as-resource",
            {"name": RESOURCE_NAME, "data": RESOURCE_DATA, "outputType": "resourceLink"},
        )
    )
    out["gzip_tool"] = {
        "error": result.is_error,
        "links": [str(getattr(c, "uri", "")) for c in result.content],
    }
    await _wait(seen.resources_changed, wait, "notifications/resources/list_changed")
    resources = await seen.request(session.list_resources())
    out["resources"] = sorted(str(r.uri) for r in resources.resources)
    return out


async def run(options: argparse.Namespace, summary: dict[str, Any]) -> None:
    storage = MemoryStorage()
    browser = Browser(options.login, options.redirect_uri, "approve")
    recorder = StreamRecorder(httpx.URL(options.mcp_url).path)
    seen = Observer()
    provider = public_client(
        options.mcp_url, "SDK Everything Client", options.redirect_uri, storage, browser
    )
    client = httpx.AsyncClient(auth=provider, timeout=30.0, transport=recorder)
    summary["exchanges"] = recorder.exchanges
    summary["events"] = seen.events
    summary["progress"] = seen.progress
    summary["sampling"] = seen.sampling
    summary["elicitation"] = seen.elicitation
    summary["roots"] = seen.roots
    summary["logs"] = seen.logs
    summary["browser"] = browser.steps
    try:
        async with (
            client,
            streamable_http_client(options.mcp_url, http_client=client) as (
                read_stream,
                write_stream,
            ),
            ClientSession(
                read_stream,
                write_stream,
                sampling_callback=seen.on_sampling,
                elicitation_callback=seen.on_elicitation,
                list_roots_callback=seen.on_list_roots,
                logging_callback=seen.on_log,
                message_handler=seen.on_message,
            ) as session,
        ):
            summary["session"] = await exercise(session, seen, options.wait)
    finally:
        if browser.error is not None:
            summary["browser_error"] = browser.error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("mcp_url", help="the broker's MCP endpoint, e.g. http://127.0.0.1:8080/mcp")
    parser.add_argument("--login", default="alice", help="who signs in at the Forgejo stand-in")
    parser.add_argument("--redirect-uri", default="http://127.0.0.1:9/callback")
    parser.add_argument(
        "--wait", type=float, default=15.0, help="seconds to wait for each awaited notification"
    )
    parser.add_argument("--timeout", type=float, default=90.0, help="seconds for the whole run")
    parser.add_argument("--verbose", action="store_true", help="SDK debug logging on stderr")
    options = parser.parse_args(argv)
    return run_script("everything_client", run, options)


if __name__ == "__main__":
    sys.exit(main())
