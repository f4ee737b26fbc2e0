"""
What the benchmarks in bench/ share: the processes under test (the Forgejo
stand-in and the broker), the OAuth flow that gets the broker's bearer
token, the ways of reaching an MCP server (its stdio directly, or Streamable
HTTP through a bridge), the closed-loop load generator and the meters (CPU,
memory of a process tree).  C{bench_bridge.py} compares the broker with the
direct path; C{bench_peers.py} adds other bridges; C{broker_costs.py}
explains the broker's CPU.

Everything listens on and talks to 127.0.0.1 only, and every wait is bounded.
"""

# Every URL here is one this module built for 127.0.0.1.
# ruff: noqa: S310

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import hashlib
import http.cookiejar
import json
import os
import platform
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CHILD_SCRIPT = ROOT / "tests" / "scripted_child.py"
HOST = "127.0.0.1"
CLIENT_ID = "fjmcp-bench"
REDIRECT = "http://127.0.0.1:9/callback"
PROTOCOL = "2025-06-18"
# The scripted child's initialize answer is tiny; tool results here too.
READ_LIMIT = 16 * 1024 * 1024

# --------------------------------------------------------------------------
# Small helpers


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def percentile(sorted_values: list[float], p: float) -> float:
    """
    Nearest-rank percentile of an already sorted list.
    """
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(p / 100.0 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


def proc_status(pid: int) -> dict[str, int]:
    """
    The kB fields of /proc/PID/status (VmRSS, RssAnon, ...).
    """
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = int(parts[0])
    return out


def children_of(pid: int) -> list[int]:
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                pids.extend(int(p) for p in f.read().split())
    return pids


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += proc_status(pid).get("VmRSS", 0)
    return total


def descendants(pid: int) -> list[int]:
    """
    Every process below C{pid} (children, their children, ...).
    """
    found: list[int] = []
    todo = children_of(pid)
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children_of(child))
    return found


def pss_kib(pid: int) -> int:
    """
    The proportional set size: RSS with each shared page divided among the
    processes that map it (0 when the kernel does not say).
    """
    with contextlib.suppress(OSError), open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def tree_memory(roots: Sequence[int]) -> dict[str, int]:
    """
    RSS and PSS summed over the given processes and all their descendants.
    The RSS sum counts shared pages (the interpreter, libraries) once per
    process; the PSS sum counts them once in all.
    """
    pids: list[int] = []
    for root in roots:
        pids.append(root)
        pids.extend(descendants(root))
    return {
        "processes": len(pids),
        "rss_kib": rss_kib(pids),
        "pss_kib": sum(pss_kib(p) for p in pids),
    }


def revision() -> str:
    """
    The commit measured, and a digest of uncommitted changes to fjmcp/ when
    there are any (the tree is often being edited while benchmarks run).
    """
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        diff = subprocess.run(
            ["git", "-C", str(ROOT), "diff", "HEAD", "--", "fjmcp"],
            capture_output=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if not head:
        return "unknown"
    if diff:
        digest = hashlib.sha256(diff).hexdigest()[:12]
        return f"{head} + uncommitted fjmcp/ changes (diff sha256 {digest})"
    return head


def load_and_runtime(info: dict[str, Any]) -> str:
    """
    The report's line on the machine's load around a run and its length
    (C{info}: L{machine_info}'s, with C{loadavg_at_end} and C{runtime_s}).
    """
    return (
        "Load average at start "
        + ", ".join(f"{x:.2f}" for x in info["loadavg_at_start"])
        + "; at end "
        + ", ".join(f"{x:.2f}" for x in info["loadavg_at_end"])
        + f". Runtime {info['runtime_s']:.0f} s."
    )


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_total = 0
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_total = int(line.split()[1]) // 1024
    return {
        "revision": revision(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": model,
        "memory_mib": mem_total,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
    }


# --------------------------------------------------------------------------
# A minimal HTTP/1.1 client: one keep-alive connection, one request at a
# time.  Much cheaper per request than a general-purpose client, so the load
# generator takes as little CPU as possible from the broker on a small box.


class HTTPError(Exception):
    pass


class Connection:
    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(
            HOST, self.port, limit=READ_LIMIT
        )
        sock = self._writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(Exception):
                await self._writer.wait_closed()
            self._writer = self._reader = None

    async def request(
        self, method: str, path: str, headers: dict[str, str], body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        if self._writer is None:
            await self.open()
        assert self._reader is not None and self._writer is not None
        head = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{self.port}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        head.append(f"Content-Length: {len(body)}")
        self._writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        return await self._response(method)

    async def _response(self, method: str) -> tuple[int, dict[str, str], bytes]:
        assert self._reader is not None
        raw = await self._reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            body = b""
        elif "content-length" in headers:
            body = await self._reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self._reader.readuntil(b"\r\n")
                    break
                parts.append(await self._reader.readexactly(size + 2))
            body = b"".join(p[:-2] for p in parts)
        else:
            body = await self._reader.read()
            await self.close()
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, headers, body


def jsonrpc_body(headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """
    The JSON-RPC message of a response: plain JSON, or the last event of an
    SSE stream.
    """
    if headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[6:] for line in body.split(b"\n") if line.startswith(b"data: ")]
        return json.loads(data[-1]) if data else {}
    return json.loads(body) if body else {}


# --------------------------------------------------------------------------
# The OAuth flow, as an MCP client does it (synchronous; a handful of requests)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _open(
    opener: urllib.request.OpenerDirector, req: urllib.request.Request
) -> tuple[int, Any, bytes]:
    try:
        with opener.open(req, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


class OAuthFlow:
    """
    The broker's real OAuth flow as a person's browser and a public client
    go through it (the Forgejo stand-in's C{X-Standin-Login} plays the
    person): one registered client, as many grants as wanted.  Every
    request carries L{extra_headers}.
    """

    def __init__(self, broker: str) -> None:
        self.broker = broker

    def extra_headers(self) -> dict[str, str]:
        """
        Headers for every request of the flow (none here).
        """
        return {}

    def _open(
        self,
        opener: urllib.request.OpenerDirector,
        url: str,
        data: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any, bytes]:
        request = urllib.request.Request(
            url, data=data, headers={**self.extra_headers(), **(headers or {})}
        )
        return _open(opener, request)

    def register(self, name: str = "bench") -> str:
        """
        A new public client (dynamic registration) called C{name}: its id.
        """
        opener = urllib.request.build_opener(_NoRedirect())
        status, _, body = self._open(
            opener,
            self.broker + "/oauth/register",
            json.dumps(
                {
                    "redirect_uris": [REDIRECT],
                    "token_endpoint_auth_method": "none",
                    "client_name": name,
                }
            ).encode(),
            {"Content-Type": "application/json"},
        )
        if status != 201:
            raise RuntimeError(f"registration failed: {status} {body[:300]!r}")
        return str(json.loads(body)["client_id"])

    def grant(self, client_id: str, login: str = "alice") -> tuple[str, str]:
        """
        A new grant to C{client_id}, through a new browser (consent, the
        stand-in's login, the callback, the code redeemed): its access and
        refresh tokens.
        """
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar), _NoRedirect())
        verifier = secrets.token_urlsafe(48)
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .rstrip(b"=")
            .decode()
        )
        params = {
            "response_type": "code",
            "client_id": client_id,
            "redirect_uri": REDIRECT,
            "code_challenge": challenge,
            "code_challenge_method": "S256",
            "state": "bench",
            "scope": "claudeai offline_access",
            "resource": self.broker + "/mcp",
        }
        status, _, body = self._open(
            opener, self.broker + "/oauth/authorize?" + urllib.parse.urlencode(params)
        )
        page = body.decode()
        if status != 200 or 'name="consent" value="' not in page:
            raise RuntimeError(f"no consent page: {status} {page[:300]!r}")
        consent = page.split('name="consent" value="')[1].split('"')[0]
        status, headers, body = self._open(
            opener,
            self.broker + "/oauth/authorize",
            urllib.parse.urlencode({"consent": consent, "decision": "approve"}).encode(),
        )
        if status not in (302, 303):
            raise RuntimeError(f"consent not accepted: {status} {body[:300]!r}")
        status, headers, body = self._open(
            opener, headers["Location"], headers={"X-Standin-Login": login}
        )
        if status not in (302, 303):
            raise RuntimeError(f"stand-in login failed: {status} {body[:300]!r}")
        status, headers, body = self._open(opener, headers["Location"])
        if status not in (302, 303):
            raise RuntimeError(f"callback failed: {status} {body[:300]!r}")
        code = urllib.parse.parse_qs(urllib.parse.urlsplit(headers["Location"]).query)["code"][0]
        status, _, body = self._open(
            opener,
            self.broker + "/oauth/token",
            urllib.parse.urlencode(
                {
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": REDIRECT,
                    "code_verifier": verifier,
                    "client_id": client_id,
                }
            ).encode(),
        )
        if status != 200:
            raise RuntimeError(f"token endpoint refused: {status} {body[:300]!r}")
        tokens = json.loads(body)
        return str(tokens["access_token"]), str(tokens["refresh_token"])


def oauth_access_token(broker: str, login: str = "alice") -> str:
    """
    An access token of C{login}'s, through the broker's real OAuth flow.
    """
    flow = OAuthFlow(broker)
    return flow.grant(flow.register(), login)[0]


# --------------------------------------------------------------------------
# The two ways to reach the child


def initialize_message(id: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL,
            "capabilities": {},
            "clientInfo": {"name": "bench_bridge", "version": "1"},
        },
    }


INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def echo_message(id: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": id,
        "method": "tools/call",
        "params": {"name": "echo", "arguments": {"text": "hello, bench"}},
    }


def check_echo(message: dict[str, Any], id: int) -> None:
    if message.get("id") != id or "result" not in message:
        raise HTTPError(f"unexpected answer to request {id}: {str(message)[:200]}")


class DirectSession:
    """
    The child spawned by us, spoken to over its stdio, as the broker would.
    """

    def __init__(self, wrapper: Path, env: dict[str, str]) -> None:
        self._wrapper = wrapper
        self._env = env
        self.proc: asyncio.subprocess.Process | None = None
        self._next = 1

    async def start(self) -> float:
        """
        Spawn and initialize; returns the seconds until initialize was answered.
        """
        started = time.perf_counter()
        self.proc = await asyncio.create_subprocess_exec(
            str(self._wrapper),
            "--transport",
            "stdio",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=self._env,
            limit=READ_LIMIT,
        )
        answer = await self._rpc(initialize_message(self._take_id()))
        elapsed = time.perf_counter() - started
        if "result" not in answer:
            raise RuntimeError(f"direct child refused initialize: {answer}")
        self._write(INITIALIZED)
        return elapsed

    def _take_id(self) -> int:
        id, self._next = self._next, self._next + 1
        return id

    def _write(self, message: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    async def _rpc(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        self._write(message)
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError("direct child closed its stdout")
        return json.loads(line)

    async def call(self) -> None:
        id = self._take_id()
        check_echo(await self._rpc(echo_message(id)), id)

    async def close(self) -> None:
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            await asyncio.wait_for(self.proc.wait(), 5)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


class HTTPSession:
    """
    One MCP session over Streamable HTTP, on its own keep-alive connection:
    through the broker (with its bearer token) or through another bridge
    (C{token} None: no Authorization header).
    """

    def __init__(self, port: int, token: str | None, path: str = "/mcp") -> None:
        self.conn = Connection(port)
        self._token = token
        self._path = path
        self.session_id: str | None = None
        self._next = 1

    def _headers(self) -> dict[str, str]:
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
        }
        if self._token is not None:
            headers["Authorization"] = "Bearer " + self._token
        if self.session_id is not None:
            headers["Mcp-Session-Id"] = self.session_id
            headers["MCP-Protocol-Version"] = PROTOCOL
        return headers

    def _take_id(self) -> int:
        id, self._next = self._next, self._next + 1
        return id

    async def start(self) -> float:
        """
        Initialize a new session; returns the seconds the initialize POST took.
        """
        await self.conn.open()
        started = time.perf_counter()
        status, headers, body = await self.conn.request(
            "POST",
            self._path,
            self._headers(),
            json.dumps(initialize_message(self._take_id())).encode(),
        )
        elapsed = time.perf_counter() - started
        if status != 200 or "mcp-session-id" not in headers:
            raise RuntimeError(f"initialize failed: {status} {body[:300]!r}")
        self.session_id = headers["mcp-session-id"]
        status, _, body = await self.conn.request(
            "POST", self._path, self._headers(), json.dumps(INITIALIZED).encode()
        )
        if status != 202:
            raise RuntimeError(f"notifications/initialized: {status} {body[:300]!r}")
        return elapsed

    async def call(self) -> None:
        id = self._take_id()
        status, headers, body = await self.conn.request(
            "POST", self._path, self._headers(), json.dumps(echo_message(id)).encode()
        )
        if status != 200:
            raise HTTPError(f"tools/call answered {status}: {body[:200]!r}")
        check_echo(jsonrpc_body(headers, body), id)

    async def close(self, delete: bool = True) -> None:
        if delete and self.session_id is not None:
            with contextlib.suppress(Exception):
                await self.conn.request("DELETE", self._path, self._headers())
        await self.conn.close()


STATELESS = "2026-07-28"


def stateless_echo(id: int) -> dict[str, Any]:
    """
    The echo call of a stateless (MCP 2026-07-28) client: its envelope in
    C{_meta}, no session.
    """
    message = echo_message(id)
    message["params"]["_meta"] = {
        "io.modelcontextprotocol/protocolVersion": STATELESS,
        "io.modelcontextprotocol/clientCapabilities": {},
    }
    return message


class StatelessHTTPSession:
    """
    A stateless client on its own keep-alive connection: nothing to open or
    end, every request carries its envelope and routing headers.
    """

    session_id = "-"

    def __init__(self, port: int, token: str | None, path: str = "/mcp") -> None:
        self.conn = Connection(port)
        self._token = token
        self._path = path
        self._next = 1

    async def start(self) -> float:
        await self.conn.open()
        return 0.0

    async def call(self) -> None:
        id, self._next = self._next, self._next + 1
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json, text/event-stream",
            "MCP-Protocol-Version": STATELESS,
            "Mcp-Method": "tools/call",
            "Mcp-Name": "echo",
        }
        if self._token is not None:
            headers["Authorization"] = "Bearer " + self._token
        status, answer_headers, body = await self.conn.request(
            "POST", self._path, headers, json.dumps(stateless_echo(id)).encode()
        )
        if status != 200:
            raise HTTPError(f"tools/call answered {status}: {body[:200]!r}")
        check_echo(jsonrpc_body(answer_headers, body), id)

    async def close(self, delete: bool = True) -> None:
        await self.conn.close()


# --------------------------------------------------------------------------
# Load


async def closed_loop(
    calls: list[Callable[[], Awaitable[None]]],
    per_session: int,
    warmup: int,
    deadline: float,
    meter: Callable[[], Meter] | None = None,
) -> dict[str, Any]:
    """
    Every session issues one request at a time: C{warmup} unrecorded, then
    up to C{per_session} recorded, stopping early at C{deadline} seconds.
    """

    async def warm(call: Callable[[], Awaitable[None]]) -> None:
        for _ in range(warmup):
            await call()

    await asyncio.wait_for(asyncio.gather(*(warm(c) for c in calls)), deadline)
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + deadline

    async def run(call: Callable[[], Awaitable[None]]) -> None:
        nonlocal errors
        for _ in range(per_session):
            if time.perf_counter() > stop_at:
                return
            t0 = time.perf_counter()
            try:
                await call()
            except (HTTPError, OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)

    measuring = meter() if meter is not None else None
    started = time.perf_counter()
    await asyncio.wait_for(asyncio.gather(*(run(c) for c in calls)), deadline + 10)
    wall = time.perf_counter() - started
    cpu = measuring.read() if measuring is not None else {}
    latencies.sort()
    if "broker_cpu_share" in cpu and latencies:
        cpu["broker_cpu_us_per_request"] = cpu["broker_cpu_share"] * wall / len(latencies) * 1e6
    return cpu | {
        "requests": len(latencies),
        "errors": errors,
        "seconds": wall,
        "rps": len(latencies) / wall if wall > 0 else float("nan"),
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "mean_ms": (statistics.fmean(latencies) * 1000) if latencies else float("nan"),
    }


def cpu_seconds(pid: int) -> float:
    """
    User + system CPU time of a process (all its threads), in seconds.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def machine_jiffies() -> tuple[int, int]:
    """
    (busy, total) jiffies of all CPUs together, from /proc/stat.
    """
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # without guest time, which is counted in user
    return total - idle, total


class Meter:
    """
    Where the CPU went during a phase: the broker, this load generator, and
    the whole machine (whose remainder is mostly the children).
    """

    def __init__(self, broker_pid: int | None) -> None:
        self._pid = broker_pid
        self._wall = time.perf_counter()
        self._broker = cpu_seconds(broker_pid) if broker_pid is not None else 0.0
        self._self = time.process_time()
        self._busy, self._total = machine_jiffies()

    def read(self) -> dict[str, float]:
        wall = time.perf_counter() - self._wall
        busy, total = machine_jiffies()
        out = {
            "loadgen_cpu_share": (time.process_time() - self._self) / wall,
            "machine_busy_share": (busy - self._busy) / max(1, total - self._total),
        }
        if self._pid is not None:
            out["broker_cpu_share"] = (cpu_seconds(self._pid) - self._broker) / wall
        return out


# --------------------------------------------------------------------------
# The processes under test


class Stack:
    """
    The stand-in and the broker as processes in a temporary directory.
    """

    def __init__(
        self,
        workdir: Path,
        profile: Path | None,
        log_level: str,
        # One login opens every session: the per-user caps as high as the rest.
        broker_options: Sequence[str] = (
            "--max-sessions=400",
            "--max-sessions-per-user=400",
            "--max-children=400",
            "--max-children-per-user=400",
        ),
        standin_clients: Sequence[str] = (),
    ) -> None:
        """
        @param broker_options: more options for C{twistd fjmcp} (the caps).
        @param standin_clients: more C{--client} values for the stand-in,
            besides the broker's own.
        """
        self.workdir = workdir
        self.profile = profile
        self.log_level = log_level
        self.broker_options = list(broker_options)
        self.standin_clients = list(standin_clients)
        self.wrapper = workdir / "forgejo-mcp"
        self.standin: subprocess.Popen[bytes] | None = None
        self.broker: subprocess.Popen[bytes] | None = None
        self.broker_port = free_port()
        self.broker_url = f"http://{HOST}:{self.broker_port}"
        self.forgejo_url = ""

    def prepare(self) -> None:
        # The broker gives its child an empty environment: the wrapper names
        # this interpreter by its absolute path.
        self.wrapper.write_text(
            f'#!/bin/sh\nexec {sys.executable} {CHILD_SCRIPT} "$@"\n', encoding="utf-8"
        )
        self.wrapper.chmod(0o755)
        key = self.workdir / "secret.key"
        key.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
        key.chmod(0o600)
        self.client_secret = "gto_" + secrets.token_hex(24)
        (self.workdir / "client-secret").write_text(self.client_secret + "\n")
        (self.workdir / "client-secret").chmod(0o600)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FJMCP_")}
        env["PYTHONPATH"] = str(ROOT)
        self.standin = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fjmcp_dev.standin",
                f"--listen=tcp:0:interface={HOST}",
                f"--client={CLIENT_ID}:{self.client_secret}:{self.broker_url}/oauth/callback",
                *(f"--client={client}" for client in self.standin_clients),
                "--test-login",
                "--quiet",
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=open(self.workdir / "standin.log", "wb"),
        )
        assert self.standin.stdout is not None
        line = self.standin.stdout.readline().decode().strip()
        if "listening on " not in line:
            raise RuntimeError(f"the stand-in did not start: {line!r}")
        self.forgejo_url = line.rsplit(" ", 1)[1]
        twistd = str(Path(sys.executable).parent / "twistd")
        runner = [sys.executable, twistd]
        if self.profile is not None:
            runner = [sys.executable, "-m", "pyinstrument", "-o", str(self.profile)]
            runner.append(twistd)
        self.broker = subprocess.Popen(
            [
                *runner,
                "--nodaemon",
                "--pidfile=",
                f"--logfile={self.workdir / 'broker.log'}",
                "fjmcp",
                f"--listen=tcp:{self.broker_port}:interface={HOST}",
                f"--public-url={self.broker_url}",
                f"--forgejo-url={self.forgejo_url}",
                f"--forgejo-client-id={CLIENT_ID}",
                f"--forgejo-client-secret-file={self.workdir / 'client-secret'}",
                f"--forgejo-mcp={self.wrapper}",
                f"--data-dir={self.workdir / 'data'}",
                f"--secret-key-file={self.workdir / 'secret.key'}",
                f"--log-level={self.log_level}",
                *self.broker_options,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "broker.stderr", "wb"),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.broker.poll() is not None:
                raise RuntimeError(
                    "the broker exited: "
                    + (self.workdir / "broker.stderr").read_text(errors="replace")[-2000:]
                )
            try:
                with urllib.request.urlopen(self.broker_url + "/healthz", timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("the broker did not answer /healthz within 30 s")

    @property
    def broker_pid(self) -> int:
        """
        The process whose memory counts: twistd itself (under pyinstrument,
        the same process too).
        """
        assert self.broker is not None
        return self.broker.pid

    def stop(self) -> None:
        for proc in (self.broker, self.standin):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


# --------------------------------------------------------------------------
# Opening many sessions, waiting for children, the direct path's set-up


async def open_http_sessions(
    port: int, token: str | None, n: int, path: str = "/mcp"
) -> list[HTTPSession]:
    sessions = [HTTPSession(port, token, path) for _ in range(n)]
    # A few at a time: opening means spawning, which is what a burst of
    # clients would do too, but not hundreds at once.
    sem = asyncio.Semaphore(8)

    async def one(s: HTTPSession) -> None:
        async with sem:
            await s.start()

    await asyncio.wait_for(asyncio.gather(*(one(s) for s in sessions)), 120)
    return sessions


async def open_direct_sessions(wrapper: Path, env: dict[str, str], n: int) -> list[DirectSession]:
    sessions = [DirectSession(wrapper, env) for _ in range(n)]
    sem = asyncio.Semaphore(8)

    async def one(s: DirectSession) -> None:
        async with sem:
            await s.start()

    await asyncio.wait_for(asyncio.gather(*(one(s) for s in sessions)), 120)
    return sessions


def direct_setup_once(wrapper: Path, env: dict[str, str]) -> float:
    """
    Spawn the child the way Twisted's reactor does on Linux (posix_spawn,
    three pipes) and initialize it: seconds until the answer arrived.  The
    child is then ended (stdin closed, bounded wait, then killed).
    """
    stdin_r, stdin_w = os.pipe()
    stdout_r, stdout_w = os.pipe()
    devnull = os.open(os.devnull, os.O_WRONLY)
    started = time.perf_counter()
    pid = os.posix_spawn(
        str(wrapper),
        [str(wrapper), "--transport", "stdio"],
        env,
        file_actions=[
            (os.POSIX_SPAWN_DUP2, stdin_r, 0),
            (os.POSIX_SPAWN_DUP2, stdout_w, 1),
            (os.POSIX_SPAWN_DUP2, devnull, 2),
            (os.POSIX_SPAWN_CLOSE, stdin_w),
            (os.POSIX_SPAWN_CLOSE, stdout_r),
        ],
    )
    os.close(stdin_r)
    os.close(stdout_w)
    os.close(devnull)
    try:
        os.write(stdin_w, json.dumps(initialize_message(1)).encode() + b"\n")
        buffer = b""
        deadline = time.monotonic() + 30
        while b"\n" not in buffer and time.monotonic() < deadline:
            chunk = os.read(stdout_r, 65536)
            if not chunk:
                break
            buffer += chunk
        elapsed = time.perf_counter() - started
        if "result" not in json.loads(buffer.split(b"\n", 1)[0] or b"{}"):
            raise RuntimeError(f"direct child refused initialize: {buffer[:300]!r}")
        return elapsed
    finally:
        os.close(stdin_w)
        os.close(stdout_r)
        for _ in range(100):
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                break
            time.sleep(0.02)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)


async def settle(
    pid: int, expected_children: int, seconds: float = 10.0, settle_for: float = 1.0
) -> None:
    """
    Wait (bounded) until the broker has exactly the children expected.
    """
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if len(children_of(pid)) == expected_children:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(settle_for)
