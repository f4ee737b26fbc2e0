#!/usr/bin/env python3
"""
Benchmark of many MCP sessions on few children (issue 13): N sessions with
the real forgejo-mcp as child, at most C{--max-children} of them running at
once, the others hibernating; what a session costs the broker and what
waking one costs its client.  Results and how to read them:
docs/benchmarks.md, "Many sessions, few children (issue 13)".

    .venv/bin/python bench/bench_sessions.py [--sessions 200] [--users 3]
        [--max-children 100] [--hibernate-after 5s] [--concurrency 20]
        [--json out.json] [--keep]

What it does, all on 127.0.0.1:

  1. starts the Forgejo stand-in and the broker (C{twistd fjmcp}) as their
     own processes, from a throw-away directory, the broker with the real
     forgejo-mcp (C{bin/forgejo-mcp}, as the tests find it),
     C{--max-children}, a short C{--session-hibernate-after}, and session
     caps raised to fit N; gets one access token per stand-in user through
     the real OAuth flow;
  2. measures forgejo-mcp's own start-up (posix_spawn + initialize, straight
     over stdio, no broker) a few times;
  3. opens N sessions, C{--concurrency} at a time, spread over the users:
     initialize, notifications/initialized, C{tools/call get_my_user_info}
     (the first call, on the session's fresh child), the same call again
     (an awake child); then closes the connection (the broker holds the
     session only);
  4. waits until every child has hibernated; broker RSS, fds, children;
  5. calls the tool again on every session, C{--concurrency} at a time:
     each call wakes the session (a child is spawned and the client's
     handshake replayed before the call), then once more on the now awake
     session.  The resume latency minus the awake latency is what the wake
     (spawn + handshake) costs a client;
  6. reports RSS (/proc/PID/status), children (/proc/PID/task/*/children),
     fds (/proc/PID/fd), the broker's counters (/metrics), errors (non-200,
     JSON-RPC errors, tool errors, wrong user) and the load average.

A C{503}/C{429} is retried after its Retry-After (at most 5 s, at most 10
times) and counted.  Every loop is bounded by a count and a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.cookiejar
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

# Every URL here is one this module built for 127.0.0.1.
# ruff: noqa: S310

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# After the path tweak: the project's modules, and bench/ as a namespace package.
from bench.mcpload import (  # noqa: E402
    HOST,
    REDIRECT,
    HTTPSession,
    Stack,
    _NoRedirect,
    children_of,
    direct_setup_once,
    free_port,
    jsonrpc_body,
    machine_info,
    oauth_access_token,
    percentile,
    proc_status,
    rss_kib,
)
from fjmcp.mcp.children import child_environment  # noqa: E402
from tests.test_forgejo_mcp import find_forgejo_mcp  # noqa: E402

# The stand-in's seeded users (fjmcp_dev.standin.model.seed).
USERS = ("alice", "bob", "carol")
# A second confidential app in the stand-in: its own grant, so the Forgejo
# token the direct start-ups use does not touch the broker's.
DIRECT_CLIENT = "fjmcp-bench-direct"
TOOL = "get_my_user_info"
# Broker log lines worth reading (the text log has no level; access log lines
# are left out).
PROBLEM = re.compile(
    r"error|cannot|refus|fail|exited|killed|timed out|traceback|unhandled", re.IGNORECASE
)
REQUEST_TIMEOUT = 60.0
MAX_RETRIES = 10


def parse_seconds(text: str) -> float:
    """
    5, 5s, 2m: seconds.
    """
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|m)?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}")
    value = float(match.group(1))
    return value * {"ms": 0.001, "s": 1.0, "m": 60.0, None: 1.0}[match.group(2)]


def forgejo_token(forgejo_url: str, client_secret: str, login: str = "alice") -> str:
    """
    A Forgejo access token of C{login} for L{DIRECT_CLIENT}, through the
    stand-in's own authorization code flow (its test login approves at once):
    forgejo-mcp checks its token against Forgejo as it starts.
    """
    opener = urllib.request.build_opener(
        urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()), _NoRedirect()
    )
    query = urllib.parse.urlencode(
        {
            "client_id": DIRECT_CLIENT,
            "redirect_uri": REDIRECT,
            "response_type": "code",
            "state": "bench",
            "scope": "read:user",
        }
    )
    request = urllib.request.Request(
        f"{forgejo_url}/login/oauth/authorize?{query}", headers={"X-Standin-Login": login}
    )
    try:
        with opener.open(request, timeout=30) as response:
            raise RuntimeError(f"the stand-in did not redirect: {response.status}")
    except urllib.error.HTTPError as e:
        if e.code not in (302, 303):
            raise RuntimeError(f"the stand-in refused: {e.code} {e.read()[:300]!r}") from e
        location = e.headers["Location"]
    code = urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)["code"][0]
    body = urllib.parse.urlencode(
        {
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": DIRECT_CLIENT,
            "client_secret": client_secret,
        }
    ).encode()
    with opener.open(
        urllib.request.Request(f"{forgejo_url}/login/oauth/access_token", data=body), timeout=30
    ) as response:
        return str(json.loads(response.read())["access_token"])


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def snapshot(pid: int) -> dict[str, Any]:
    """
    The broker's memory, descriptors and children right now.
    """
    status = proc_status(pid)
    kids = children_of(pid)
    return {
        "rss_kib": status["VmRSS"],
        "anon_kib": status.get("RssAnon", 0),
        "fds": fd_count(pid),
        "threads": len(os.listdir(f"/proc/{pid}/task")),
        "children": len(kids),
        "children_rss_kib": rss_kib(kids),
        "loadavg": os.getloadavg(),
    }


def latency_summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "count": len(ordered),
        "p50_ms": percentile(ordered, 50) * 1000,
        "p90_ms": percentile(ordered, 90) * 1000,
        "p99_ms": percentile(ordered, 99) * 1000,
        "max_ms": (ordered[-1] * 1000) if ordered else math.nan,
        "mean_ms": (statistics.fmean(ordered) * 1000) if ordered else math.nan,
    }


# --------------------------------------------------------------------------
# The processes: the shared stack, with the real forgejo-mcp and our caps


class SessionsStack(Stack):
    """
    L{Stack} with the real forgejo-mcp, a metrics listener, the caps of this
    benchmark, and a second stand-in client for forgejo-mcp run directly.
    """

    def __init__(self, workdir: Path, binary: str, broker_options: list[str]) -> None:
        self.metrics_port = free_port()
        super().__init__(
            workdir,
            None,
            "info",
            [f"--metrics-listen=tcp:{self.metrics_port}:interface={HOST}", *broker_options],
        )
        self.binary = binary

    def prepare(self) -> None:
        super().prepare()
        self.wrapper = Path(self.binary)
        self.standin_clients = [f"{DIRECT_CLIENT}:{self.client_secret}:{REDIRECT}"]

    def counters(self) -> dict[str, float]:
        """
        The broker's fjmcp_sessions_* and fjmcp_child_* counters, and its
        /mcp answers by status.
        """
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                text = response.read().decode()
        except OSError:
            return {}
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            if name.split("{")[0].endswith("_created"):
                continue
            if name.startswith(("fjmcp_sessions", "fjmcp_child")) or (
                name.startswith("fjmcp_http_requests_total") and 'route="/mcp"' in name
            ):
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out

    def log_problems(self, limit: int = 20) -> dict[str, Any]:
        """
        The broker log's warn/error/critical lines: how many, and the first few.
        """
        lines: list[str] = []
        with contextlib.suppress(OSError):
            text = (self.workdir / "broker.log").read_text(errors="replace")
            lines = [
                line
                for line in text.splitlines()
                if "[twisted.python.log]" not in line
                and "exited with status 0" not in line
                and PROBLEM.search(line)
            ]
        return {"count": len(lines), "first": lines[:limit]}

    def log_lines(self, pattern: str) -> int:
        with contextlib.suppress(OSError):
            text = (self.workdir / "broker.log").read_text(errors="replace")
            return len(re.findall(pattern, text))
        return 0


# --------------------------------------------------------------------------
# A session of the benchmark


class Errors:
    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.examples: list[str] = []
        self.refusals: list[str] = []

    def add(self, kind: str, detail: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if len(self.examples) < 20:
            self.examples.append(f"{kind}: {detail[:300]}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class BenchSession(HTTPSession):
    """
    One session of one user; every request bounded, 503/429 retried.
    """

    def __init__(self, port: int, token: str, login: str, errors: Errors) -> None:
        super().__init__(port, token)
        self.login = login
        self.errors = errors
        self.refusals = 0

    async def _post(self, message: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        body = json.dumps(message).encode()
        for _ in range(MAX_RETRIES):
            try:
                status, headers, answer = await asyncio.wait_for(
                    self.conn.request("POST", "/mcp", self._headers(), body), REQUEST_TIMEOUT
                )
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError) as e:
                # The connection is in an unknown state: start a new one.
                await self.conn.close()
                return 0, {}, repr(e).encode()
            if status not in (429, 503):
                return status, headers, answer
            self.refusals += 1
            if len(self.errors.refusals) < 5:
                self.errors.refusals.append(f"{status}: {answer[:200].decode(errors='replace')}")
            try:
                wait = float(headers.get("retry-after", "1"))
            except ValueError:
                wait = 1.0
            await asyncio.sleep(min(max(wait, 0.1), 5.0))
        return status, headers, answer

    async def open(self) -> float | None:
        """
        initialize + notifications/initialized; the seconds initialize took,
        or None (counted as an error).
        """
        started = time.perf_counter()
        status, headers, body = await self._post(
            {
                "jsonrpc": "2.0",
                "id": self._take_id(),
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-06-18",
                    "capabilities": {},
                    "clientInfo": {"name": "bench_sessions", "version": "1"},
                },
            }
        )
        elapsed = time.perf_counter() - started
        if status != 200 or "mcp-session-id" not in headers:
            self.errors.add(f"initialize HTTP {status}", body.decode(errors="replace"))
            return None
        message = jsonrpc_body(headers, body)
        if "result" not in message:
            self.errors.add("initialize JSON-RPC error", json.dumps(message))
            return None
        self.session_id = headers["mcp-session-id"]
        status, _, body = await self._post(
            {"jsonrpc": "2.0", "method": "notifications/initialized"}
        )
        if status != 202:
            self.errors.add(f"initialized HTTP {status}", body.decode(errors="replace"))
            return None
        return elapsed

    async def tool(self) -> float | None:
        """
        One C{tools/call get_my_user_info}: the seconds it took, or None
        (counted as an error).
        """
        id = self._take_id()
        started = time.perf_counter()
        status, headers, body = await self._post(
            {
                "jsonrpc": "2.0",
                "id": id,
                "method": "tools/call",
                "params": {"name": TOOL, "arguments": {}},
            }
        )
        elapsed = time.perf_counter() - started
        if status != 200:
            self.errors.add(f"tools/call HTTP {status}", body.decode(errors="replace"))
            return None
        try:
            message = jsonrpc_body(headers, body)
        except ValueError:
            self.errors.add("tools/call not JSON", body.decode(errors="replace"))
            return None
        if message.get("id") != id or "result" not in message:
            self.errors.add("tools/call JSON-RPC error", json.dumps(message))
            return None
        result = message["result"]
        if result.get("isError"):
            self.errors.add("tools/call tool error", json.dumps(result))
            return None
        if f'"{self.login}"' not in json.dumps(result).replace('\\"', '"'):
            self.errors.add("tools/call wrong user", json.dumps(result))
            return None
        return elapsed


async def bounded_all(jobs: list[Any], concurrency: int, deadline: float, what: str) -> list[Any]:
    """
    Run coroutine functions C{concurrency} at a time; the whole bounded by
    C{deadline} seconds; progress on stderr.
    """
    sem = asyncio.Semaphore(concurrency)
    done = 0
    step = max(1, len(jobs) // 10)

    async def one(job: Any) -> Any:
        nonlocal done
        async with sem:
            result = await job()
        done += 1
        if done % step == 0:
            print(f"  {what}: {done}/{len(jobs)}", file=sys.stderr, flush=True)
        return result

    return list(await asyncio.wait_for(asyncio.gather(*(one(j) for j in jobs)), deadline))


async def wait_children(pid: int, most: int, seconds: float) -> float:
    """
    Wait (bounded) until the broker has at most C{most} children; the
    seconds it took (the bound when never reached).
    """
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if len(children_of(pid)) <= most:
            break
        await asyncio.sleep(0.2)
    return time.monotonic() - started


# --------------------------------------------------------------------------
# The phases


async def run(args: argparse.Namespace, stack: SessionsStack) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    pid = stack.broker_pid
    users = USERS[: args.users]
    tokens = {}
    for login in users:
        tokens[login] = await asyncio.wait_for(
            loop.run_in_executor(None, oauth_access_token, stack.broker_url, login), 60
        )
    results: dict[str, Any] = {"users": list(users)}
    results["at_start"] = snapshot(pid)

    # forgejo-mcp's own start-up, straight over stdio.
    direct_token = await loop.run_in_executor(
        None, forgejo_token, stack.forgejo_url, stack.client_secret
    )
    env = child_environment(stack.forgejo_url, direct_token)
    direct = []
    for _ in range(args.spawn_samples):
        direct.append(
            await asyncio.wait_for(
                loop.run_in_executor(None, direct_setup_once, stack.wrapper, env), 40
            )
        )
    results["direct_spawn"] = latency_summary(direct)

    errors = Errors()
    sessions = [
        BenchSession(
            stack.broker_port, tokens[users[i % len(users)]], users[i % len(users)], errors
        )
        for i in range(args.sessions)
    ]
    init: list[float] = []
    first: list[float] = []
    awake1: list[float] = []

    async def open_and_call(s: BenchSession) -> None:
        try:
            t = await s.open()
            if t is None:
                return
            init.append(t)
            t = await s.tool()
            if t is not None:
                first.append(t)
            t = await s.tool()
            if t is not None:
                awake1.append(t)
        finally:
            # The broker holds the session only.
            await s.conn.close()

    print(f"opening {args.sessions} sessions ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    await bounded_all(
        [lambda s=s: open_and_call(s) for s in sessions],
        args.concurrency,
        args.phase_seconds,
        "opened",
    )
    open_seconds = time.monotonic() - started
    opened = [s for s in sessions if s.session_id is not None]
    results["open"] = {
        "seconds": open_seconds,
        "sessions_opened": len(opened),
        "refusals_retried": sum(s.refusals for s in sessions),
        "errors": dict(errors.counts),
        "initialize": latency_summary(init),
        "first_call": latency_summary(first),
        "awake_call": latency_summary(awake1),
    }
    results["after_open"] = snapshot(pid)
    results["counters_after_open"] = stack.counters()

    print("waiting for every child to hibernate ...", file=sys.stderr, flush=True)
    waited = await wait_children(pid, 0, args.hibernate_after + 60)
    # Let the exits settle and the allocator with them.
    await asyncio.sleep(2)
    results["hibernated"] = snapshot(pid) | {"waited_s": waited}
    results["counters_hibernated"] = stack.counters()

    errors_before = errors.total
    refusals_before = sum(s.refusals for s in sessions)
    resume: list[float] = []
    awake2: list[float] = []

    async def wake_and_call(s: BenchSession) -> None:
        try:
            t = await s.tool()
            if t is not None:
                resume.append(t)
            t = await s.tool()
            if t is not None:
                awake2.append(t)
        finally:
            await s.conn.close()

    print(f"resuming {len(opened)} sessions ...", file=sys.stderr, flush=True)
    peak_children = 0

    async def watch() -> None:
        nonlocal peak_children
        while True:
            peak_children = max(peak_children, len(children_of(pid)))
            await asyncio.sleep(0.2)

    watcher = asyncio.create_task(watch())
    started = time.monotonic()
    try:
        await bounded_all(
            [lambda s=s: wake_and_call(s) for s in opened],
            args.concurrency,
            args.phase_seconds,
            "resumed",
        )
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    resume_seconds = time.monotonic() - started
    resume_errors = dict(errors.counts)
    results["resume"] = {
        "seconds": resume_seconds,
        "sessions": len(opened),
        "refusals_retried": sum(s.refusals for s in sessions) - refusals_before,
        "errors": errors.total - errors_before,
        "errors_all_phases": resume_errors,
        "resume_call": latency_summary(resume),
        "awake_call": latency_summary(awake2),
        "peak_children": peak_children,
    }
    results["after_resume"] = snapshot(pid)

    # The same, one session at a time: what a wake costs without the queueing
    # of the concurrent pass.
    serial = opened[: args.serial_samples]
    print(f"waiting to hibernate, then {len(serial)} serial wakes ...", file=sys.stderr, flush=True)
    await wait_children(pid, 0, args.hibernate_after + 60)
    await asyncio.sleep(1)
    errors_before = errors.total
    resume.clear()
    awake2.clear()
    await bounded_all(
        [lambda s=s: wake_and_call(s) for s in serial], 1, args.phase_seconds, "serial"
    )
    results["serial"] = {
        "sessions": len(serial),
        "errors": errors.total - errors_before,
        "resume_call": latency_summary(resume),
        "awake_call": latency_summary(awake2),
    }
    results["counters_end"] = stack.counters()
    results["error_examples"] = errors.examples
    results["refusal_examples"] = errors.refusals
    results["log_problems"] = stack.log_problems()
    results["log_woke"] = stack.log_lines(r" woke up: child pid ")
    results["log_hibernates"] = stack.log_lines(r" hibernates \(")
    results["loadavg_at_end"] = os.getloadavg()
    return results


# --------------------------------------------------------------------------
# Report


def counter(counters: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in counters.items() if k.startswith(prefix))


def report(info: dict[str, Any], args: argparse.Namespace, r: dict[str, Any]) -> str:
    n = r["open"]["sessions_opened"]
    start, hib, peak, end = r["at_start"], r["hibernated"], r["after_open"], r["after_resume"]
    per_session = (hib["rss_kib"] - start["rss_kib"]) / max(1, n)
    anon_per_session = (hib["anon_kib"] - start["anon_kib"]) / max(1, n)
    out = []
    load0 = ", ".join(f"{x:.2f}" for x in info["loadavg_at_start"])
    load1 = ", ".join(f"{x:.2f}" for x in r["loadavg_at_end"])
    out.append(
        f"Date: {info['date']}; machine: {info['nproc']} CPUs ({info['cpu']}), "
        f"{info['memory_mib']} MiB, Linux {info['kernel']}, Python {info['python']}; "
        f"load average at start {load0}, at end {load1}; fjmcp at {info['revision']}; "
        f"forgejo-mcp {args.forgejo_mcp}. Runtime {r['runtime_s']:.0f} s."
    )
    out.append("")
    out.append(
        f"{args.sessions} sessions over {len(r['users'])} users "
        f"({', '.join(r['users'])}), {args.concurrency} at a time; "
        f"--max-children {args.max_children}, --session-hibernate-after "
        f"{args.hibernate_after:g}s; tool {TOOL} against the stand-in."
    )
    out.append("")
    out.append("| | broker RSS KiB | anon KiB | fds | threads | children | children's RSS MiB |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    for label, s in (
        ("at start (tokens issued, no session)", start),
        (f"{n} sessions opened, called twice", peak),
        (f"{n} sessions, all hibernated", hib),
        (f"{n} sessions, after the resume calls", end),
    ):
        out.append(
            f"| {label} | {s['rss_kib']:,} | {s['anon_kib']:,} | {s['fds']} | {s['threads']} "
            f"| {s['children']} | {s['children_rss_kib'] / 1024:.0f} |"
        )
    out.append("")
    out.append(
        f"Broker memory per hibernated session: {per_session:.1f} KiB RSS "
        f"({anon_per_session:.1f} KiB anonymous), (RSS hibernated - RSS at start) / {n}; "
        f"it includes what the broker kept from running up to {args.max_children} "
        f"children. Every child hibernated {hib['waited_s']:.1f} s after the last call."
    )
    out.append("")
    out.append("| call | count | p50 ms | p90 ms | p99 ms | max ms | mean ms |")
    out.append("|---|---:|---:|---:|---:|---:|---:|")
    rows = (
        ("forgejo-mcp alone: posix_spawn + initialize over stdio", r["direct_spawn"]),
        ("initialize through the broker (new session, spawn)", r["open"]["initialize"]),
        ("first tools/call (fresh child)", r["open"]["first_call"]),
        ("second tools/call (awake)", r["open"]["awake_call"]),
        ("**resume**: tools/call on a hibernated session", r["resume"]["resume_call"]),
        ("tools/call right after the resume (awake)", r["resume"]["awake_call"]),
    )
    for label, s in rows:
        out.append(
            f"| {label} | {s['count']} | {s['p50_ms']:.1f} | {s['p90_ms']:.1f} "
            f"| {s['p99_ms']:.1f} | {s['max_ms']:.1f} | {s['mean_ms']:.1f} |"
        )
    ser = r["serial"]
    for label, sr in (
        ("resume, one session at a time", ser["resume_call"]),
        ("awake, right after it, one at a time", ser["awake_call"]),
    ):
        out.append(
            f"| {label} | {sr['count']} | {sr['p50_ms']:.1f} | {sr['p90_ms']:.1f} "
            f"| {sr['p99_ms']:.1f} | {sr['max_ms']:.1f} | {sr['mean_ms']:.1f} |"
        )
    rc, ac = r["resume"]["resume_call"], r["resume"]["awake_call"]
    sc, sa = ser["resume_call"], ser["awake_call"]
    out.append("")
    out.append(
        f"What a wake costs the client (resume - awake): {rc['p50_ms'] - ac['p50_ms']:.1f} ms "
        f"at p50, {rc['p99_ms'] - ac['p99_ms']:.1f} ms at p99 with {args.concurrency} at a "
        f"time; {sc['p50_ms'] - sa['p50_ms']:.1f} ms at p50 one at a time "
        f"(forgejo-mcp's own start-up: {r['direct_spawn']['p50_ms']:.1f} ms)."
    )
    c0, c1 = r["counters_hibernated"], r["counters_end"]
    ca = r["counters_after_open"]
    out.append(
        f"Opening took {r['open']['seconds']:.1f} s ({n} of {args.sessions} sessions opened, "
        f"{r['open']['refusals_retried']} 503/429 retried); the resume pass "
        f"{r['resume']['seconds']:.1f} s ({r['resume']['refusals_retried']} retried), "
        f"at most {r['resume']['peak_children']} children seen at once."
    )
    out.append(
        f"Broker counters: sessions started {counter(c1, 'fjmcp_sessions_started'):.0f}, "
        f"hibernated {counter(ca, 'fjmcp_sessions_hibernated'):.0f} while opening and "
        f"{counter(c0, 'fjmcp_sessions_hibernated'):.0f} by the end of the wait, "
        f"{counter(c1, 'fjmcp_sessions_hibernated'):.0f} in all; woken "
        f"{counter(c1, 'fjmcp_sessions_woken'):.0f}; child spawns "
        f"{counter(c1, 'fjmcp_child_spawns'):.0f}; sessions ended "
        f"{counter(c1, 'fjmcp_sessions_ended'):.0f}."
    )
    statuses = {
        k.split('status="')[1].split('"')[0]: v
        for k, v in c1.items()
        if k.startswith("fjmcp_http_requests_total") and 'status="' in k
    }
    if statuses:
        by_status: dict[str, float] = {}
        for k, v in statuses.items():
            by_status[k] = by_status.get(k, 0) + v
        out.append(
            "/mcp answers by status: "
            + ", ".join(f"{k}: {v:.0f}" for k, v in sorted(by_status.items()))
            + "."
        )
    errs = r["resume"]["errors_all_phases"]
    out.append(
        f"Errors: {sum(errs.values())}"
        + (" (" + ", ".join(f"{k}: {v}" for k, v in sorted(errs.items())) + ")" if errs else "")
        + f"; broker log: {r['log_problems']['count']} lines about errors or failures."
    )
    for line in r["refusal_examples"][:3]:
        out.append(f"    refused, retried: {line}")
    for line in r["error_examples"][:5]:
        out.append(f"    {line}")
    for line in r["log_problems"]["first"][:5]:
        out.append(f"    {line[:300]}")
    return "\n".join(out)


# --------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=200, help="sessions to open")
    parser.add_argument(
        "--users",
        type=int,
        default=3,
        choices=range(1, len(USERS) + 1),
        help="stand-in users the sessions are spread over (it seeds three)",
    )
    parser.add_argument("--max-children", type=int, default=100, help="the broker's cap")
    parser.add_argument(
        "--hibernate-after",
        type=parse_seconds,
        default=5.0,
        help="the broker's --session-hibernate-after (5s)",
    )
    parser.add_argument("--concurrency", type=int, default=20, help="sessions worked at once")
    parser.add_argument(
        "--serial-samples", type=int, default=20, help="sessions woken one at a time at the end"
    )
    parser.add_argument(
        "--spawn-samples", type=int, default=10, help="direct forgejo-mcp start-ups to time"
    )
    parser.add_argument("--phase-seconds", type=float, default=900.0, help="deadline of each phase")
    parser.add_argument("--forgejo-mcp", help="the binary (default: as the tests find it)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.forgejo_mcp is None:
        args.forgejo_mcp = find_forgejo_mcp()

    per_user = math.ceil(args.sessions / args.users) + args.concurrency
    broker_options = [
        f"--max-sessions={args.sessions + args.concurrency}",
        f"--max-sessions-per-user={per_user}",
        f"--max-children={args.max_children}",
        # Three logins stand for many users: no per-user cap below the broker's.
        f"--max-children-per-user={args.max_children}",
        f"--session-hibernate-after={args.hibernate_after:g}s",
    ]
    info = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="bench-sessions-"))
    stack = SessionsStack(workdir, args.forgejo_mcp, broker_options)
    started = time.monotonic()
    # A SIGTERM (e.g. a CI timeout) still stops the broker and the stand-in.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        stack.prepare()
        stack.start()
        results = asyncio.run(run(args, stack))
    finally:
        stack.stop()
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    results["machine"] = info
    results["runtime_s"] = time.monotonic() - started
    results["broker_options"] = broker_options
    results["forgejo_mcp"] = args.forgejo_mcp
    print(report(info, args, results))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
