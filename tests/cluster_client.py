"""
An MCP client under load for L{tests.test_cluster}, on the official Python
SDK (C{mcp}) and its OAuth client, run as a separate process (C{python -m
tests.cluster_client} from the project root).

It signs in through the broker's OAuth (the SDK's C{OAuthClientProvider},
with the headless browser of L{tests.sdk_oauth_client} playing the person
at the Forgejo stand-in), opens one Streamable HTTP session and calls one
tool in a loop, each call bounded by C{--call-timeout}, until C{--stop-file}
appears (or C{--timeout} passes).  A failed call does not end the session:
the next call goes to the same session.  Should the SDK's transport itself
fail (it cannot go on after some network errors), the client connects
again with the same session id and tokens, without a new initialize
(C{ClientSession.adopt} of the first result), and counts a reconnect.

With C{--handoff NODE_URL...} it does something else after signing in:
it opens sessions on one node directly and uses each at once on another
(see L{handoff}).  With C{--stateless N} it makes N stateless (MCP
2026-07-28) tool calls through the public URL instead (see L{stateless}).

On stdout, one JSON line per call as it ends (C{call}: number, C{start} and
C{end} wall-clock times, C{ok}, C{error}, C{timed_out}, the session id's
first 8 characters as the broker logs them, and a SHA-256 prefix of the
access token it was made with), a C{session} line once the session is
open, and last the summary (L{tests.sdk_oauth_client.run_script}'s, with
C{ok} and C{error}): calls, failures, the session ids and access tokens seen
on the wire, the /mcp responses by status, the token requests by grant type,
the initialize requests, the reconnects.  Token values are never printed.

Exit status: 0 when the run got to its end (the summary says how the calls
went), 1 on an error (the summary says which), 3 when the installed SDK
lacks an API this script needs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qsl, urlsplit

try:
    import anyio
    import httpx2 as httpx
    from fjmcp_dev.try_client import MemoryStorage
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    from tests.sdk_oauth_client import Browser, _describe, public_client, run_script
except ImportError as e:  # an SDK older than this script expects
    print(json.dumps({"unsupported": f"{type(e).__name__}: {e}"}))
    sys.exit(3)

SESSION_HEADER = "mcp-session-id"


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:12]


def emit(line: dict[str, Any]) -> None:
    print(json.dumps(line), flush=True)


class Wire:
    """
    httpx event hooks noting what matters on the wire: the session ids and
    access tokens /mcp requests carried, the initialize requests that got
    past the sign-in, the responses by status, and the token requests by
    grant type.
    """

    def __init__(self, mcp_path: str) -> None:
        self.mcp_path = mcp_path
        self.sessions: Counter[str] = Counter()
        self.tokens: Counter[str] = Counter()
        self.initialize = 0
        self.mcp_statuses: Counter[int] = Counter()
        self.grants: Counter[str] = Counter()
        self.token_statuses: Counter[int] = Counter()
        self.session_id: str | None = None

    async def on_request(self, request: Any) -> None:
        path = urlsplit(str(request.url)).path
        if path == self.mcp_path:
            session = request.headers.get(SESSION_HEADER)
            if session:
                self.sessions[session[:8] + "/" + digest(session)] += 1
            authorization = request.headers.get("authorization", "")
            if authorization.lower().startswith("bearer "):
                self.tokens[digest(authorization[7:].strip())] += 1
            if request.method == "POST":
                try:
                    body = json.loads(request.content)
                except ValueError:
                    body = None
                if isinstance(body, dict) and body.get("method") == "initialize":
                    request.extensions["fjmcp-initialize"] = True
        elif request.method == "POST" and path.endswith("/token"):
            try:
                form = dict(parse_qsl(request.content.decode("ascii")))
            except Exception:
                form = {}
            self.grants[form.get("grant_type", "?")] += 1

    async def on_response(self, response: Any) -> None:
        path = urlsplit(str(response.request.url)).path
        if path == self.mcp_path:
            self.mcp_statuses[response.status_code] += 1
            # The first one goes without a token, and its 401 starts the
            # sign-in; the SDK then sends it again.
            if response.request.extensions.get("fjmcp-initialize") and response.status_code != 401:
                self.initialize += 1
            session = response.headers.get(SESSION_HEADER)
            if session and self.session_id is None:
                self.session_id = session
        elif response.request.method == "POST" and path.endswith("/token"):
            self.token_statuses[response.status_code] += 1


class Load:
    """
    The call loop and its records.
    """

    def __init__(self, options: argparse.Namespace, storage: MemoryStorage, wire: Wire) -> None:
        self.options = options
        self.storage = storage
        self.wire = wire
        self.calls = 0
        self.failures: list[dict[str, Any]] = []
        self.longest = 0.0
        self.current: dict[str, Any] | None = None

    def stopped(self) -> bool:
        return os.path.exists(self.options.stop_file)

    def _token(self) -> str | None:
        tokens = self.storage.tokens
        return digest(tokens.access_token) if tokens is not None else None

    def _session(self) -> str | None:
        return self.wire.session_id[:8] if self.wire.session_id else None

    def finish(self, ok: bool, error: str | None = None, timed_out: bool = False) -> None:
        record = self.current
        if record is None:
            return
        self.current = None
        record["end"] = time.time()
        record.update(ok=ok, error=error, timed_out=timed_out)
        self.longest = max(self.longest, record["end"] - record["start"])
        if not ok:
            self.failures.append(record)
        emit(record)

    async def run(self, session: ClientSession) -> None:
        options = self.options
        arguments = json.loads(options.arguments)
        while not self.stopped():
            self.calls += 1
            self.current = {
                "call": self.calls,
                "start": time.time(),
                "session": self._session(),
                "token": self._token(),
            }
            # The SDK's own read timeout, and a hard bound beyond it in case
            # the SDK itself hangs (which would be a failure of its own).
            try:
                with anyio.fail_after(options.call_timeout + 5):
                    result = await session.call_tool(
                        options.tool, arguments, read_timeout_seconds=options.call_timeout
                    )
            except TimeoutError:
                self.finish(False, "no answer within the hard bound", timed_out=True)
            except Exception as e:
                text = _describe(e)
                self.finish(False, text, timed_out="timed out" in text.lower())
            else:
                if getattr(result, "is_error", False):
                    texts = [getattr(c, "text", "") for c in getattr(result, "content", [])]
                    self.finish(False, "tool error: " + " ".join(str(t) for t in texts)[:300])
                else:
                    self.finish(True)
            await anyio.sleep(options.interval)


def _provider(options: argparse.Namespace, storage: MemoryStorage, browser: Browser) -> Any:
    """
    The SDK's OAuth client, registering itself as a public client.
    """
    return public_client(
        options.mcp_url, f"cluster test client ({options.login})", options.redirect_uri,
        storage, browser,
    )  # fmt: skip


async def run(options: argparse.Namespace, summary: dict[str, Any]) -> None:
    if options.handoff:
        await handoff(options, summary)
        return
    if options.stateless:
        await stateless(options, summary)
        return
    storage = MemoryStorage()
    browser = Browser(options.login, options.redirect_uri, "approve")
    mcp_path = urlsplit(options.mcp_url).path
    wire = Wire(mcp_path)
    load = Load(options, storage, wire)
    reconnects: list[dict[str, Any]] = []
    provider = _provider(options, storage, browser)
    client = httpx.AsyncClient(
        auth=provider,
        timeout=options.call_timeout,
        event_hooks={"request": [wire.on_request], "response": [wire.on_response]},
    )
    initialized: Any = None
    try:
        async with client:
            while not load.stopped():
                try:
                    async with (
                        streamable_http_client(options.mcp_url, http_client=client) as (
                            read_stream,
                            write_stream,
                        ),
                        ClientSession(read_stream, write_stream) as session,
                    ):
                        if initialized is None:
                            with anyio.fail_after(options.call_timeout):
                                initialized = await session.initialize()
                            if wire.session_id is None:
                                raise RuntimeError("initialize answered without Mcp-Session-Id")
                            # From now on every request of this client names
                            # the session, through any later transport too.
                            client.headers[SESSION_HEADER] = wire.session_id
                            emit(
                                {
                                    "session": wire.session_id[:8],
                                    "protocol_version": initialized.protocol_version,
                                }
                            )
                        else:
                            session.adopt(initialized)
                        await load.run(session)
                except Exception as e:
                    if initialized is None:
                        raise
                    # The transport gave up (the in-flight call with it):
                    # the same session again, on a new transport.
                    text = _describe(e)
                    load.finish(False, "transport failed: " + text)
                    reconnects.append({"at": time.time(), "error": text})
                    await anyio.sleep(options.interval)
    finally:
        if browser.error is not None:
            summary["browser_error"] = browser.error
        summary.update(
            login=options.login,
            calls=load.calls,
            failed=len(load.failures),
            failures=load.failures,
            longest_call=round(load.longest, 3),
            session=wire.session_id[:8] if wire.session_id else None,
            sessions_on_wire=dict(wire.sessions),
            access_tokens_on_wire=dict(wire.tokens),
            initialize_requests=wire.initialize,
            mcp_statuses={str(k): v for k, v in wire.mcp_statuses.items()},
            token_grants=dict(wire.grants),
            token_statuses={str(k): v for k, v in wire.token_statuses.items()},
            reconnects=reconnects,
        )


HANDOFF_VERSION = "2025-11-25"
STATELESS_VERSION = "2026-07-28"


async def signed_in_headers(options: argparse.Namespace) -> dict[str, str]:
    """
    Sign in (an SDK session through the public URL); the headers of a
    request with the access token it got.
    """
    storage = MemoryStorage()
    browser = Browser(options.login, options.redirect_uri, "approve")
    async with (
        httpx.AsyncClient(
            auth=_provider(options, storage, browser), timeout=options.call_timeout
        ) as client,
        streamable_http_client(options.mcp_url, http_client=client) as (read_stream, write_stream),
        ClientSession(read_stream, write_stream) as session,
    ):
        await session.initialize()
    if storage.tokens is None:
        raise RuntimeError("signed in without tokens")
    return {
        "authorization": f"Bearer {storage.tokens.access_token}",
        "accept": "application/json, text/event-stream",
        "content-type": "application/json",
    }


async def stateless(options: argparse.Namespace, summary: dict[str, Any]) -> None:
    """
    Sign in, then make C{--stateless} tool calls as a stateless (MCP
    2026-07-28) client through the public URL, a few at a time: no session
    id, the version and name in headers and the C{_meta} envelope.  The
    statuses, and whether each answer is a tool result, go in the summary.
    """
    headers = {
        **await signed_in_headers(options),
        "mcp-protocol-version": STATELESS_VERSION,
        "mcp-method": "tools/call",
        "mcp-name": options.tool,
    }
    calls: list[dict[str, Any]] = []
    summary["stateless_calls"] = calls

    async def call(client: httpx.AsyncClient, n: int) -> None:
        answer = await client.post(
            options.mcp_url,
            headers=headers,
            json={
                "jsonrpc": "2.0",
                "id": n,
                "method": "tools/call",
                "params": {
                    "name": options.tool,
                    "arguments": json.loads(options.arguments),
                    "_meta": {
                        "io.modelcontextprotocol/protocolVersion": STATELESS_VERSION,
                        "io.modelcontextprotocol/clientCapabilities": {},
                        "io.modelcontextprotocol/clientInfo": {
                            "name": "cluster stateless",
                            "version": "1",
                        },
                    },
                },
            },
        )
        body = answer.json() if answer.status_code == 200 else {}
        calls.append({"status": answer.status_code, "result": "result" in body})

    async with httpx.AsyncClient(timeout=options.call_timeout) as client:
        for first in range(0, options.stateless, 4):
            async with anyio.create_task_group() as group:
                for n in range(first, min(first + 4, options.stateless)):
                    group.start_soon(call, client, n + 1)


async def handoff(options: argparse.Namespace, summary: dict[str, Any]) -> None:
    """
    Sign in (an SDK session through the public URL), then, round after
    round, open a session on one node directly and at once use it on the
    next one: C{notifications/initialized} and C{tools/list} there, which
    must find it (the store has it before the initialize is answered),
    then C{DELETE}.  The statuses of each round go in the summary.
    """
    headers = await signed_in_headers(options)
    path = urlsplit(options.mcp_url).path
    nodes = options.handoff
    rounds: list[dict[str, Any]] = []
    summary["rounds"] = rounds
    async with httpx.AsyncClient(timeout=options.call_timeout) as client:
        for i in range(options.rounds):
            first, second = nodes[i % len(nodes)], nodes[(i + 1) % len(nodes)]
            opened = await client.post(
                first + path,
                headers=headers,
                json={
                    "jsonrpc": "2.0",
                    "id": 1,
                    "method": "initialize",
                    "params": {
                        "protocolVersion": HANDOFF_VERSION,
                        "capabilities": {},
                        "clientInfo": {"name": "cluster handoff", "version": "1"},
                    },
                },
            )
            record: dict[str, Any] = {"first": first, "second": second}
            record["initialize"] = opened.status_code
            rounds.append(record)
            session_id = opened.headers.get(SESSION_HEADER)
            if opened.status_code != 200 or not session_id:
                continue
            record["session"] = session_id[:8]
            there = {**headers, SESSION_HEADER: session_id, "mcp-protocol-version": HANDOFF_VERSION}
            initialized = await client.post(
                second + path,
                headers=there,
                json={"jsonrpc": "2.0", "method": "notifications/initialized"},
            )
            record["initialized"] = initialized.status_code
            listed = await client.post(
                second + path,
                headers=there,
                json={"jsonrpc": "2.0", "id": 2, "method": "tools/list"},
            )
            record["tools_list"] = listed.status_code
            record["deleted"] = (await client.delete(second + path, headers=there)).status_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("mcp_url", help="the MCP endpoint, e.g. http://127.0.0.1:8080/mcp")
    parser.add_argument("--login", required=True, help="who signs in at the Forgejo stand-in")
    parser.add_argument("--stop-file", help="stop once this file exists (the load)")
    parser.add_argument(
        "--handoff",
        nargs="+",
        metavar="NODE_URL",
        help="instead of the load: sessions opened on one of these nodes and used at once"
        " on the next",
    )
    parser.add_argument("--rounds", type=int, default=15, help="handoff rounds")
    parser.add_argument(
        "--stateless",
        type=int,
        default=0,
        metavar="N",
        help="instead of the load: N stateless (2026-07-28) tool calls through the public URL",
    )
    parser.add_argument("--redirect-uri", default="http://127.0.0.1:9/callback")
    parser.add_argument("--tool", default="get_my_user_info")
    parser.add_argument("--arguments", default="{}", help="the tool's arguments, JSON")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between calls")
    parser.add_argument("--call-timeout", type=float, default=20.0, help="seconds per call")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds for the whole run")
    parser.add_argument("--verbose", action="store_true", help="SDK debug logging on stderr")
    options = parser.parse_args(argv)
    if not options.handoff and not options.stateless and not options.stop_file:
        parser.error("--stop-file is needed for the load")
    return run_script("cluster_client", run, options)


if __name__ == "__main__":
    sys.exit(main())
