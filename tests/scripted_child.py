"""
A small scripted stdio MCP server for the broker's tests: it behaves well or
badly on request.

    python tests/scripted_child.py [BEHAVIOUR ...]

Behaviours: crash-on-initialize, crash-on-call, garbage, long-line,
never-answer, ignore-term, slow-initialize (answers initialize after 2 s).
Tools: `whoami` (the token and URL it was given), `echo` (its arguments
back), `slow` (progress notifications, then the answer), `ask` (a sampling
request to the client, then its answer), `env` (its whole environment),
`change` (a tools/list_changed notification), `flood` (thousands of large
progress notifications, for backpressure), `hang` (never answered, while
everything else is), `cancelled` (the request ids of every
notifications/cancelled it got), `refuse` (a JSON-RPC error, as a server
refusing the call's arguments answers).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

BEHAVIOURS = set(sys.argv[1:])
lock = threading.Lock()
waiting: dict[str, threading.Event] = {}
answers: dict[str, object] = {}
cancelled: list[object] = []


def send(message: dict[str, object]) -> None:
    with lock:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()


def result(id: object, value: object) -> None:
    send({"jsonrpc": "2.0", "id": id, "result": value})


def text(id: object, value: str) -> None:
    result(id, {"content": [{"type": "text", "text": value}]})


def call(id: object, name: str, args: dict[str, object], meta: dict[str, object]) -> None:
    if "crash-on-call" in BEHAVIOURS:
        os._exit(3)
    if name == "whoami":
        text(
            id,
            json.dumps(
                {
                    "token": os.environ.get("FORGEJO_ACCESS_TOKEN"),
                    "url": os.environ.get("FORGEJO_URL"),
                    "pid": os.getpid(),
                }
            ),
        )
    elif name == "env":
        text(id, json.dumps(dict(os.environ)))
    elif name == "echo":
        text(id, json.dumps(args))
    elif name == "slow":
        token = meta.get("progressToken")
        for i in range(3):
            if token is not None:
                send(
                    {
                        "jsonrpc": "2.0",
                        "method": "notifications/progress",
                        "params": {"progressToken": token, "progress": i + 1, "total": 3},
                    }
                )
            time.sleep(float(args.get("delay", 0.05)))  # type: ignore[arg-type]
        text(id, "done")
    elif name == "ask":
        server_id = f"ask-{id}"
        event = threading.Event()
        waiting[server_id] = event
        send(
            {
                "jsonrpc": "2.0",
                "id": server_id,
                "method": "sampling/createMessage",
                "params": {
                    "messages": [{"role": "user", "content": {"type": "text", "text": "2+2?"}}],
                    "maxTokens": 5,
                },
            }
        )
        event.wait(30)
        text(id, json.dumps(answers.get(server_id)))
    elif name == "flood":
        # Many large progress notifications, as fast as the pipe takes them.
        token = meta.get("progressToken")
        count = int(args.get("count", 2000))  # type: ignore[call-overload]
        for i in range(count):
            send(
                {
                    "jsonrpc": "2.0",
                    "method": "notifications/progress",
                    "params": {
                        "progressToken": token,
                        "progress": i + 1,
                        "total": count,
                        "message": "x" * 4000,
                    },
                }
            )
        text(id, "flooded")
    elif name == "hang":
        return
    elif name == "refuse":
        send({"jsonrpc": "2.0", "id": id, "error": {"code": -32602, "message": "bad arguments"}})
    elif name == "cancelled":
        text(id, json.dumps(cancelled))
    elif name == "change":
        send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        text(id, "changed")
    else:
        send({"jsonrpc": "2.0", "id": id, "error": {"code": -32602, "message": "unknown tool"}})


def handle(message: dict[str, object]) -> None:
    method = message.get("method")
    id = message.get("id")
    params = message.get("params") or {}
    assert isinstance(params, dict)
    if method is None:
        # A response to one of our requests.
        key = str(id)
        answers[key] = message.get("result", message.get("error"))
        if key in waiting:
            waiting.pop(key).set()
        return
    if "never-answer" in BEHAVIOURS:
        return
    if method == "notifications/cancelled":
        cancelled.append(params.get("requestId"))
        return
    if method == "initialize":
        if "crash-on-initialize" in BEHAVIOURS:
            os._exit(2)
        if "slow-initialize" in BEHAVIOURS:
            time.sleep(2)
        result(
            id,
            {
                "protocolVersion": params.get("protocolVersion", "2025-06-18"),
                "capabilities": {"tools": {"listChanged": True}},
                "serverInfo": {"name": "scripted-child", "version": "1"},
            },
        )
        if "garbage" in BEHAVIOURS:
            sys.stdout.write("this is not json\n")
            sys.stdout.flush()
        if "long-line" in BEHAVIOURS:
            sys.stdout.write(
                '{"jsonrpc": "2.0", "method": "x", "params": "' + "y" * 200_000 + '"}\n'
            )
            sys.stdout.flush()
    elif method == "tools/list":
        result(
            id,
            {
                "tools": [
                    {"name": n, "inputSchema": {"type": "object"}}
                    for n in (
                        "whoami",
                        "echo",
                        "slow",
                        "ask",
                        "env",
                        "change",
                        "flood",
                        "hang",
                        "cancelled",
                        "refuse",
                    )
                ]
            },
        )
    elif method == "tools/call":
        meta = params.get("_meta") or {}
        assert isinstance(meta, dict)
        args = params.get("arguments") or {}
        assert isinstance(args, dict)
        threading.Thread(
            target=call, args=(id, str(params.get("name")), args, meta), daemon=True
        ).start()
    elif method == "ping":
        result(id, {})
    elif id is not None:
        send({"jsonrpc": "2.0", "id": id, "error": {"code": -32601, "message": "no such method"}})


def main() -> None:
    if "ignore-term" in BEHAVIOURS:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    for line in sys.stdin:
        line = line.strip()
        if line:
            handle(json.loads(line))
    if "ignore-term" in BEHAVIOURS:
        while True:
            time.sleep(1)


if __name__ == "__main__":
    main()
