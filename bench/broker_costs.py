#!/usr/bin/env python3
"""
Where a brokered request's CPU goes: the companion of C{bench_bridge.py},
for explaining its numbers (see docs/benchmarks.md).

    python bench/broker_costs.py [--requests N] [--sessions 16]

Two parts, both on 127.0.0.1 only and bounded in count and time:

  1. the framework floor: a server process answering the same C{POST /mcp}
     (same headers, same body, a canned JSON answer, no child, no database)
     with plain C{twisted.web}, then with a Klein route, then with a Klein
     route that awaits one and two C{adbapi} round trips to SQLite as the
     broker does for every request; requests/s and server CPU per request
     under the same closed-loop load as the bridge benchmark;
  2. per-request pieces of the broker measured in this process: Twisted's
     Content-Type parsing, the access-log line through fjmcp's log
     pipeline, a level-filtered debug event, the sealed Forgejo token's
     decryption, and one store read through the pool against the same
     SQL run directly (some of these left the hot path in 08bfaca; they
     stay here to show what they cost).
"""

# Every URL here is one this script built for 127.0.0.1.

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))

from bench.mcpload import HOST, Connection, Meter, closed_loop, free_port  # noqa: E402

SERVER = r"""
import json, sqlite3, sys
from klein import Klein
from twisted.enterprise import adbapi
from twisted.internet import reactor, endpoints
from twisted.web.resource import Resource
from twisted.web.server import Site, NOT_DONE_YET

kind, port, db = sys.argv[1], int(sys.argv[2]), sys.argv[3]
ANSWER = json.dumps({"jsonrpc": "2.0", "id": 1, "result": {"content": [
    {"type": "text", "text": "{\"text\": \"hello, bench\"}"}]}}).encode()

pool = adbapi.ConnectionPool("sqlite3", db, check_same_thread=False, cp_min=1, cp_max=1)

def read(txn):
    txn.execute("SELECT 1")
    return txn.fetchone()

class Plain(Resource):
    isLeaf = True
    def render_POST(self, request):
        json.loads(request.content.read())
        request.setHeader(b"Content-Type", b"application/json")
        return ANSWER
    render_GET = render_POST

app = Klein()
reads = {"klein": 0, "klein+1db": 1, "klein+2db": 2}.get(kind, 0)

@app.route("/mcp", methods=["POST", "GET"])
async def mcp(request):
    for _ in range(reads):
        await pool.runInteraction(read)
    json.loads(request.content.read())
    request.setHeader(b"Content-Type", b"application/json")
    return ANSWER

root = Plain() if kind == "plain" else app.resource()
endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1").listen(Site(root))
reactor.run()
"""

HEADERS = {
    "Authorization": "Bearer " + "x" * 43,
    "Content-Type": "application/json",
    "Accept": "application/json, text/event-stream",
    "Mcp-Session-Id": "y" * 32,
    "MCP-Protocol-Version": "2025-06-18",
}
BODY = (
    b'{"jsonrpc":"2.0","id":1,"method":"tools/call",'
    b'"params":{"name":"echo","arguments":{"text":"hello, bench"}}}'
)


async def floor(kind: str, sessions: int, requests: int, workdir: Path) -> dict[str, Any]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, kind, str(port), str(workdir / f"{kind}.db")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}/mcp", timeout=1):
                    break
            except urllib.error.HTTPError:
                break  # it answers
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"the {kind} server did not start") from None
                time.sleep(0.1)
        conns = [Connection(port) for _ in range(sessions)]

        def caller(conn: Connection) -> Callable[[], Any]:
            async def call() -> None:
                status, _, _ = await conn.request("POST", "/mcp", HEADERS, BODY)
                if status != 200:
                    raise OSError(f"status {status}")

            return call

        result: dict[str, Any] = await closed_loop(
            [caller(c) for c in conns],
            max(1, requests // sessions),
            20,
            30.0,
            lambda: Meter(proc.pid),
        )
        for c in conns:
            await c.close()
        return result
    finally:
        proc.terminate()
        proc.wait(10)


def per_call(fn: Callable[[], Any], n: int) -> float:
    """
    Microseconds per call of C{fn}, best of three batches of C{n}.
    """
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best * 1e6


def pieces(workdir: Path, n: int) -> list[tuple[str, float, str]]:
    from twisted.logger import Logger, LoggingFile, LogLevel
    from twisted.web.http import _parseContentType
    from twisted.web.test.requesthelper import DummyChannel, DummyRequest

    from fjmcp.http.common import access_log_line
    from fjmcp.logs import make_observer
    from fjmcp.secrets.crypto import SecretBox

    out: list[tuple[str, float, str]] = []
    out.append(
        (
            "Twisted's Content-Type parsing of a POST (email package)",
            per_call(lambda: _parseContentType(b"application/json"), n),
            "Request.requestReceived, each POST with a body, unless the Site "
            "parses no forms (fjmcp since 08bfaca)",
        )
    )

    request: Any = DummyRequest([b"mcp"])
    request.method = b"POST"
    request.path = b"/mcp"
    request.clientproto = b"HTTP/1.1"
    request.code = 200
    request.sentLength = 111
    request.channel = DummyChannel()
    log_file = open(workdir / "access.log", "a", encoding="utf-8")
    for level, name in ((LogLevel.info, "info"), (LogLevel.warn, "warn")):
        observer = make_observer(log_file, "text", level, ["not-a-real-secret"])
        legacy = LoggingFile(Logger(namespace="log_legacy", observer=observer))

        def access(legacy: LoggingFile = legacy) -> None:
            legacy.write(access_log_line("26/Nov/2026:17:00:00 +0000", request) + "\n")

        out.append(
            (
                f"access-log line through fjmcp's pipeline (--log-level {name})",
                per_call(access, n),
                "twisted.web.http.HTTPFactory.log, once per request",
            )
        )
    observer = make_observer(log_file, "text", LogLevel.info, ["not-a-real-secret"])
    logger = Logger(namespace="fjmcp.store.database", observer=observer)
    out.append(
        (
            "store debug event, filtered out at --log-level info",
            per_call(lambda: logger.debug("store {desc} took {ms:.1f} ms", desc="x", ms=0.1), n),
            "Store._run, once per transaction (until 08bfaca)",
        )
    )
    box = SecretBox(secrets.token_bytes(32))
    sealed = box.seal("gto_" + "a" * 40, "user:1:access")
    out.append(
        (
            "decrypting the user's Forgejo token (AES-GCM)",
            per_call(lambda: box.open(sealed, "user:1:access"), n),
            "UpstreamCredentials.access_token, on a cache miss",
        )
    )
    log_file.close()
    return out


def store_round_trip(workdir: Path, n: int) -> list[tuple[str, float, str]]:
    """
    One indexed read through the broker's store (adbapi, one connection)
    against the same SQL on a connection in this thread.
    """
    import sqlite3

    from fjmcp.store import Store, migrate_database

    db = workdir / "broker.db"
    migrate_database(db)
    results: list[tuple[str, float, str]] = []

    async def measure(reactor: Any) -> None:
        store = Store.open(db, reactor)
        try:
            for _ in range(50):
                await store.get_upstream_credential(1)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for _ in range(n):
                    await store.get_upstream_credential(1)
                best = min(best, (time.perf_counter() - t0) / n)
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            for _ in range(n):
                await store.get_upstream_credential(1)
            wall = time.perf_counter() - t0
            cpu = time.process_time() - cpu0
        finally:
            store.close()
        results.append(
            (
                "one store read through the pool (wall, sequential)",
                best * 1e6,
                "bearer check + Forgejo token: 2 per /mcp request until 08bfaca, "
                "now at most one per token or user every 5 s",
            )
        )
        results.append(
            (
                "  of which CPU (both threads)",
                cpu / n * 1e6,
                f"{cpu / wall * 100:.0f}% of the wall time",
            )
        )

    from twisted.internet import reactor
    from twisted.internet.defer import Deferred

    failures: list[Any] = []

    def start() -> None:
        d = Deferred.fromCoroutine(measure(reactor))
        d.addErrback(failures.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if failures:
        failures[0].raiseException()
    conn = sqlite3.connect(db, isolation_level=None)

    def direct() -> None:
        conn.execute("BEGIN")
        conn.execute(
            "SELECT forgejo_user_id, access_token_enc, refresh_token_enc, expires_at,"
            " scope, generation, updated_at FROM upstream_credentials"
            " WHERE forgejo_user_id = ?",
            (1,),
        ).fetchone()
        conn.execute("COMMIT")

    results.append(
        (
            "the same read on a connection in the calling thread",
            per_call(direct, n),
            "for comparison",
        )
    )
    conn.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--sessions", type=int, default=16)
    parser.add_argument("--calls", type=int, default=2000, help="calls per micro-measurement")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="fjmcp-costs-"))
    print(f"Load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print(
        f"Framework floor: POST /mcp, {args.sessions} connections, closed loop, "
        "canned answer (no child)."
    )
    print()
    print("| server | req/s | p50 ms | p99 ms | server CPU | CPU µs/req |")
    print("|---|---:|---:|---:|---:|---:|")
    for kind in ("plain", "klein", "klein+1db", "klein+2db"):
        r = asyncio.run(floor(kind, args.sessions, args.requests, workdir))
        print(
            f"| {kind} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {r['broker_cpu_share'] * 100:.0f}% | {r['broker_cpu_us_per_request']:.0f} |",
            flush=True,
        )
    print()
    print("Per-request pieces of the broker, measured alone:")
    print()
    print("| piece | µs | where |")
    print("|---|---:|---|")
    for name, us, where in pieces(workdir, args.calls) + store_round_trip(workdir, args.calls):
        print(f"| {name} | {us:.0f} | {where} |")


if __name__ == "__main__":
    main()
