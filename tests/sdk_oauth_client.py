"""
An MCP client built on the official Python SDK (C{mcp}), run as a separate
process by L{tests.test_sdk_oauth}: the SDK is asyncio/httpx based and the
tests run a Twisted reactor, so the two meet over loopback sockets only.

It connects to a broker's /mcp with C{mcp.client.auth.OAuthClientProvider}
as the HTTP auth and lets the SDK do the OAuth dance: discovery, dynamic
registration (or a client ID metadata document URL), authorization with
PKCE, the token request, and the retried MCP request with the bearer token.
The person at the browser is played by the redirect handler (fjmcp-try's
L{fjmcp_dev.try_client.HeadlessBrowser}): it opens the authorization URL with its
own cookie jar, submits the consent form as a browser would, signs in at the
Forgejo stand-in with its test header, follows the broker's callback, and
hands the code it is sent back to the SDK through the callback handler.
Nothing listens on the redirect URI.

Every HTTP request the SDK makes is recorded (method, path, status, whether
it carried a bearer token or HTTP Basic credentials); the last line on
stdout is a JSON summary of the run.  Token values, client secrets and
authorization codes are never printed, only whether they were there.

By default the session is exercised with the scripted child's C{echo} tool;
C{--call TOOL JSONARGS} (repeatable) calls those tools instead, in order,
C{--call-interval} seconds apart, printing one line per result before the
summary (which has them too, under C{initialize.calls}).

Exit status: 0 when the flow ran to the end (the summary says how it went),
1 on an error (the summary says which), 3 when the installed SDK lacks an
API this script needs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

try:
    import anyio
    import httpx2 as httpx
    from fjmcp_dev.try_client import SECRET_FIELDS, HeadlessBrowser, MemoryStorage
    from mcp.client.auth import AuthorizationCodeResult, OAuthClientProvider  # noqa: F401
    from mcp.client.client import Client
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client
    from mcp.shared.auth import OAuthClientMetadata
except ImportError as e:  # an SDK older than this script expects
    print(json.dumps({"unsupported": f"{type(e).__name__}: {e}"}))
    sys.exit(3)


def _path(url: Any) -> str:
    return urlsplit(str(url)).path


def _form(request: Any) -> list[tuple[str, str]]:
    """
    The fields of an urlencoded request body (none if it cannot be read).
    """
    try:
        body = request.content.decode("ascii")
    except Exception:
        return []
    return parse_qsl(body, keep_blank_values=True)


class Recorder:
    """
    httpx event hooks that note every request the SDK's client sends,
    including those the OAuth provider makes on its own.
    """

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    async def on_request(self, request: Any) -> None:
        authorization = request.headers.get("authorization", "")
        entry: dict[str, Any] = {
            "method": request.method,
            "url": str(request.url.copy_with(query=None)),
            "path": _path(request.url),
            "bearer": authorization.lower().startswith("bearer "),
            "basic": authorization.lower().startswith("basic "),
            "status": None,
            # The stateless revision names each request's method in a header.
            "mcp_method": request.headers.get("mcp-method"),
            "mcp_protocol_version": request.headers.get("mcp-protocol-version"),
        }
        if request.method == "POST" and entry["path"].endswith("/token"):
            # Which fields were sent, and the values of those that are no secret.
            form = _form(request)
            entry["form_keys"] = sorted({k for k, _ in form})
            entry["form"] = {k: v for k, v in form if k not in SECRET_FIELDS}
        request.extensions["fjmcp-test-entry"] = entry
        self.requests.append(entry)

    async def on_response(self, response: Any) -> None:
        entry = response.request.extensions.get("fjmcp-test-entry")
        if entry is None:
            return
        entry["status"] = response.status_code
        # JSON or SSE: how the answer came.
        entry["content_type"] = response.headers.get("content-type", "").split(";")[0]
        challenge = response.headers.get("www-authenticate")
        if challenge is not None:
            entry["www_authenticate"] = challenge
        if entry["method"] == "POST" and entry["path"].endswith("/register"):
            await response.aread()
            entry["response"] = _redacted_json(response)
        elif entry["method"] == "POST" and entry["path"].endswith("/token"):
            await response.aread()
            body = _json(response)
            entry["response"] = {
                k: (bool(v) if k in ("access_token", "refresh_token") else v)
                for k, v in body.items()
            }


def _json(response: Any) -> dict[str, Any]:
    try:
        body = json.loads(response.content)
    except ValueError:
        return {"unparsable": response.text[:200]}
    return body if isinstance(body, dict) else {"not_an_object": True}


def _redacted_json(response: Any) -> dict[str, Any]:
    body = _json(response)
    if "client_secret" in body:
        body["client_secret"] = bool(body["client_secret"])
    return body


class Browser(HeadlessBrowser):
    """
    The person at the browser (L{fjmcp_dev.try_client.HeadlessBrowser}), signing
    in at the stand-in with its test header, so the browser leg is exactly
    four hops: consent page, approval, Forgejo, callback.
    """

    def __init__(self, login: str, redirect_uri: str, decision: str) -> None:
        super().__init__(login, redirect_uri, decision, test_login_header=True)


def public_client(
    mcp_url: str, name: str, redirect_uri: str, storage: Any, browser: Browser
) -> Any:
    """
    The SDK's OAuth client (an C{OAuthClientProvider}) for C{mcp_url},
    registering itself as the public client C{name}, with C{browser}
    playing the person.
    """
    return OAuthClientProvider(
        server_url=mcp_url,
        client_metadata=OAuthClientMetadata.model_validate(
            {
                "client_name": name,
                "redirect_uris": [redirect_uri],
                "grant_types": ["authorization_code", "refresh_token"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "none",
            }
        ),
        storage=storage,
        redirect_handler=browser.redirect_handler,
        callback_handler=browser.callback_handler,
    )


async def run(options: argparse.Namespace, summary: dict[str, Any]) -> None:
    storage = MemoryStorage()
    browser = Browser(options.login, options.redirect_uri, options.decision)
    recorder = Recorder()
    summary["browser"] = browser.steps
    summary["requests"] = recorder.requests
    metadata: dict[str, Any] = {
        "client_name": options.client_name,
        "redirect_uris": [options.redirect_uri],
        "grant_types": ["authorization_code", "refresh_token"],
        "response_types": ["code"],
    }
    if options.auth_method != "omit":
        metadata["token_endpoint_auth_method"] = options.auth_method
    provider = OAuthClientProvider(
        server_url=options.mcp_url,
        client_metadata=OAuthClientMetadata.model_validate(metadata),
        storage=storage,
        redirect_handler=browser.redirect_handler,
        callback_handler=browser.callback_handler,
        client_metadata_url=options.client_metadata_url,
    )
    client = httpx.AsyncClient(
        auth=provider,
        timeout=20.0,
        event_hooks={"request": [recorder.on_request], "response": [recorder.on_response]},
    )
    try:
        async with client, connected(options, client) as session:
            summary["initialize"] = await exercise(
                session, first=True, calls=options.call, interval=options.call_interval
            )
            if options.again_after is not None:
                # By now the access token has expired (the test makes them
                # short-lived): the SDK refreshes it first.
                before = storage.tokens
                await anyio.sleep(options.again_after)
                summary["initialize_again"] = await exercise(
                    session, first=False, calls=options.call, interval=options.call_interval
                )
                summary["tokens_changed"] = _changed(before, storage.tokens)
    finally:
        summary["authorization_request"] = browser.authorization_params
        summary["authorization_response"] = browser.returned
        if browser.error is not None:
            summary["browser_error"] = browser.error
        info = storage.client_info
        summary["client_info"] = (
            None
            if info is None
            else {
                "client_id": info.client_id,
                "token_endpoint_auth_method": info.token_endpoint_auth_method,
                "client_secret_issued": info.client_secret is not None,
            }
        )
        tokens = storage.tokens
        summary["tokens"] = (
            None
            if tokens is None
            else {
                "access_token": bool(tokens.access_token),
                "refresh_token": bool(tokens.refresh_token),
                "token_type": tokens.token_type,
                "expires_in": tokens.expires_in,
                "scope": tokens.scope,
            }
        )


@contextlib.asynccontextmanager
async def connected(
    options: argparse.Namespace, client: Any
) -> AsyncIterator[ClientSession | Client]:
    """
    The MCP connection over C{client}: a C{ClientSession} (mode C{session},
    which the caller initializes), or the SDK's C{Client} pinned to a
    version or negotiating it (auto), connected when entered.
    """
    transport = streamable_http_client(options.mcp_url, http_client=client)
    if options.mode != "session":
        async with Client(
            transport,
            mode=options.mode,
            cache=None,
            sampling_callback=sampling(options.sampling_answer),
        ) as modern:
            yield modern
        return
    async with (
        transport as (read_stream, write_stream),
        ClientSession(read_stream, write_stream) as session,
    ):
        yield session


def sampling(answer: str | None) -> Any:
    """
    A sampling callback that answers every question with C{answer} (None:
    the client declares no sampling).
    """
    if answer is None:
        return None

    async def callback(context: Any, params: Any) -> Any:
        from mcp import types

        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text=answer),
            model="sdk-oauth-client",
        )

    return callback


def _changed(before: Any, after: Any) -> dict[str, bool]:
    return {
        name: after is not None
        and before is not None
        and getattr(after, name) != getattr(before, name)
        for name in ("access_token", "refresh_token")
    }


async def exercise(
    session: ClientSession | Client,
    first: bool,
    calls: list[tuple[str, dict[str, Any]]] | None = None,
    interval: float = 0.0,
) -> dict[str, Any]:
    """
    The MCP handshake (the first time), then a tool listing and a call
    (C{echo}, or each of C{calls} in turn); how it went.
    """
    out: dict[str, Any] = {}
    try:
        if isinstance(session, Client):
            # Connected (and negotiated) when it was entered.
            out["protocol_version"] = session.protocol_version
        elif first:
            result = await session.initialize()
            out["protocol_version"] = result.protocol_version
        tools = await session.list_tools()
        out["tools"] = sorted(t.name for t in tools.tools)
        if not calls:
            called = await session.call_tool("echo", {"hello": "world"})
            out["echo"] = [getattr(c, "text", None) for c in called.content]
        else:
            results: list[dict[str, Any]] = []
            out["calls"] = results
            for i, (tool, arguments) in enumerate(calls):
                if i and interval:
                    await anyio.sleep(interval)
                called = await session.call_tool(tool, arguments)
                texts = [getattr(c, "text", None) for c in called.content]
                results.append({"tool": tool, "is_error": bool(called.is_error), "text": texts})
                for text in texts:
                    print(f"{tool}: {text}", flush=True)
    except Exception as e:
        error = getattr(e, "error", None)
        out.update(
            ok=False,
            exception=type(e).__name__,
            code=getattr(error, "code", None),
            message=getattr(error, "message", str(e))[:300],
        )
        return out
    out["ok"] = True
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("mcp_url", help="the broker's MCP endpoint, e.g. http://127.0.0.1:8080/mcp")
    parser.add_argument(
        "--auth-method",
        default="none",
        choices=["none", "client_secret_post", "client_secret_basic", "omit"],
        help="token_endpoint_auth_method to register with (omit: leave it out)",
    )
    parser.add_argument(
        "--client-metadata-url", default=None, help="use this client ID metadata document URL"
    )
    parser.add_argument("--login", default="alice", help="who signs in at the Forgejo stand-in")
    parser.add_argument(
        "--sampling-answer",
        default=None,
        help="declare sampling and answer every sampling request with this text (Client modes)",
    )
    parser.add_argument(
        "--mode",
        default="session",
        help="session (ClientSession, initialize), or the SDK Client's mode: "
        "legacy, auto, or a stateless version such as 2026-07-28",
    )
    parser.add_argument("--decision", default="approve", choices=["approve", "deny"])
    parser.add_argument("--redirect-uri", default="http://127.0.0.1:9/callback")
    parser.add_argument("--client-name", default="SDK Test Client")
    parser.add_argument(
        "--again-after",
        type=float,
        default=None,
        help="after the first initialize, wait this many seconds and initialize again",
    )
    parser.add_argument(
        "--call",
        nargs=2,
        action="append",
        metavar=("TOOL", "JSONARGS"),
        type=str,
        default=None,
        help="call TOOL with these JSON arguments instead of echo (repeatable, in order)",
    )
    parser.add_argument(
        "--call-interval",
        type=float,
        default=0.0,
        help="seconds to wait between two --call tool calls",
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for the whole run")
    parser.add_argument("--verbose", action="store_true", help="SDK debug logging on stderr")
    options = parser.parse_args(argv)
    calls: list[tuple[str, dict[str, Any]]] = []
    for tool, arguments in options.call or []:
        try:
            parsed = json.loads(arguments)
        except ValueError as e:
            parser.error(f"--call {tool}: the arguments are not JSON: {e}")
        if not isinstance(parsed, dict):
            parser.error(f"--call {tool}: the arguments must be a JSON object")
        calls.append((tool, parsed))
    options.call = calls
    return run_script("sdk_oauth_client", run, options)


def run_script(
    prog: str,
    run: Callable[[argparse.Namespace, dict[str, Any]], Awaitable[None]],
    options: argparse.Namespace,
) -> int:
    """
    Run a client script's C{run} within C{options.timeout} seconds and
    print its summary as one JSON line (what the tests read): C{ok}, the
    C{error} if any, and whatever C{run} put in it.  The exit status is 1
    on any error, whose traceback goes to stderr.
    """
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.DEBUG if options.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    summary: dict[str, Any] = {"ok": False, "error": None}

    async def bounded() -> None:
        with anyio.fail_after(options.timeout):
            await run(options, summary)

    status = 0
    try:
        anyio.run(bounded)
        summary["ok"] = True
    except TimeoutError as e:
        summary["error"] = str(e) or f"timed out after {options.timeout} seconds"
        status = 1
    except BaseException as e:  # reported, with the traceback on stderr
        if isinstance(e, KeyboardInterrupt):
            raise
        traceback.print_exc(file=sys.stderr)
        summary["error"] = _describe(e)
        status = 1
    if summary["error"] is not None:
        print(f"{prog}: {summary['error']}", file=sys.stderr)
    print(json.dumps(summary, default=str))
    return status


def _describe(e: BaseException) -> str:
    """
    One line for an exception; for an exception group, its leaves.
    """
    inner = getattr(e, "exceptions", None)
    if inner:
        return "; ".join(_describe(x) for x in inner)
    return f"{type(e).__name__}: {e}"[:1000]


if __name__ == "__main__":
    sys.exit(main())
