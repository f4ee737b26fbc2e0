#!/usr/bin/env python3
"""
Side-by-side benchmark of fjmcp and the stdio-to-HTTP bridges people use
today (issue 6): the same stdio MCP server (C{tests/scripted_child.py}) and
the same closed-loop client load, in one run, reached

  - directly over its stdio (no bridge: the floor);
  - through fjmcp (C{twistd fjmcp}), authentication on: a bearer token from
    its real OAuth flow on every request, one child per session;
  - through supergateway (npm), stdio to Streamable HTTP, C{--stateful}:
    one child per session;
  - through mcp-proxy (PyPI), stdio to Streamable HTTP (its default,
    stateful mode): one child started with the proxy and shared by every
    session, the MCP session ended and re-made in the proxy.

Results and how to read them: docs/benchmarks.md.

    python bench/bench_peers.py [--sessions 1,16,64] [--rounds 3]
        [--requests 2000] [--idle 100] [--setup-samples 10]
        [--plot docs/benchmarks-peers.png] [--json out.json]

The peers are installed apart from the project's virtualenv, at the
versions pinned in bench/peers/: supergateway with C{npm ci} into
bench/peers/node_modules, mcp-proxy into its own virtualenv
bench/.venv-peers (both git-ignored, both re-installed when their pins
change).  Everything listens on 127.0.0.1 only; every loop is bounded by a
count and a deadline.

Per bridge, in this order: memory (fresh processes; RSS and PSS summed over
the bridge and all its descendants, before and with C{--idle} idle
sessions), then C{--rounds} rounds of load (for each concurrency, every
bridge in turn, the order rotated each round), then session set-up
(interleaved samples).  The plot needs matplotlib (the project's C{bench}
extra); without it the plot is skipped.
"""

# Every URL here is one this script built for 127.0.0.1.
# ruff: noqa: S310

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS = BENCH / "peers"
PEERS_VENV = BENCH / ".venv-peers"
SUPERGATEWAY = PEERS / "node_modules" / "supergateway" / "dist" / "index.js"
DEFAULT_PLOT = ROOT / "docs" / "benchmarks-peers.png"

sys.path.insert(0, str(ROOT))
# After the path tweak: the project's modules, and bench/ as a namespace package.
from bench.mcpload import (  # noqa: E402
    CHILD_SCRIPT,
    HOST,
    PROTOCOL,
    STATELESS,
    DirectSession,
    HTTPSession,
    Meter,
    Stack,
    StatelessHTTPSession,
    children_of,
    closed_loop,
    descendants,
    direct_setup_once,
    free_port,
    load_and_runtime,
    machine_info,
    oauth_access_token,
    open_direct_sessions,
    open_http_sessions,
    rss_kib,
    settle,
    tree_memory,
)
from bench.wrkload import wrk_closed_loop, wrk_path  # noqa: E402
from fjmcp.mcp.children import child_environment  # noqa: E402

# --------------------------------------------------------------------------
# Installing the peers, apart from the project's virtualenv


def _stale(stamp: Path, *sources: Path) -> bool:
    if not stamp.exists():
        return True
    return any(s.stat().st_mtime > stamp.stat().st_mtime for s in sources)


def install_peers() -> None:
    """
    supergateway from bench/peers/package-lock.json (C{npm ci}), mcp-proxy
    from bench/peers/requirements.txt into bench/.venv-peers; each only when
    missing or when its pins changed since the last install.
    """
    stamp = PEERS / "node_modules" / ".installed"
    if _stale(stamp, PEERS / "package.json", PEERS / "package-lock.json"):
        if shutil.which("npm") is None:
            raise SystemExit("bench_peers: npm is needed to install supergateway")
        print("installing supergateway (npm ci in bench/peers) ...", file=sys.stderr)
        subprocess.run(
            ["npm", "ci", "--prefix", str(PEERS), "--no-audit", "--no-fund", "--loglevel=error"],
            check=True,
            timeout=600,
        )
        stamp.touch()
    stamp = PEERS_VENV / ".installed"
    if _stale(stamp, PEERS / "requirements.txt"):
        print("installing mcp-proxy into bench/.venv-peers ...", file=sys.stderr)
        if not (PEERS_VENV / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True, timeout=300)
        subprocess.run(
            [
                str(PEERS_VENV / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
                str(PEERS / "requirements.txt"),
            ],
            check=True,
            timeout=600,
        )
        stamp.touch()


def versions() -> dict[str, str]:
    def out(cmd: list[str]) -> str:
        try:
            return (
                subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
                or "unknown"
            )
        except (OSError, subprocess.TimeoutExpired):
            return "unknown"

    meta = (
        "import importlib.metadata as m, sys; print(' '.join(m.version(p) for p in sys.argv[1:]))"
    )
    fjmcp = out([sys.executable, "-c", meta, "fjmcp", "twisted", "klein"]).split()
    proxy = out([str(PEERS_VENV / "bin" / "python"), "-c", meta, "mcp-proxy", "mcp"]).split()
    package = json.loads((SUPERGATEWAY.parent.parent / "package.json").read_text())
    return {
        "node": out(["node", "--version"]),
        "fjmcp": fjmcp[0] if fjmcp else "unknown",
        "twisted": fjmcp[1] if len(fjmcp) > 1 else "unknown",
        "klein": fjmcp[2] if len(fjmcp) > 2 else "unknown",
        "supergateway": str(package.get("version", "unknown")),
        "mcp-proxy": proxy[0] if proxy else "unknown",
        "mcp_sdk": proxy[1] if len(proxy) > 1 else "unknown",
    }


# --------------------------------------------------------------------------
# The peers as processes


class PeerProcess:
    """
    A bridge started as its own process, its output to a log file, ready
    once C{health} answers.
    """

    def __init__(
        self,
        argv: list[str],
        env: dict[str, str],
        log: Path,
        health: str,
        child_markers: tuple[bytes, ...],
    ) -> None:
        self.argv = argv
        self.child_markers = child_markers
        self.env = env
        self.log = log
        self.health = health
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: set[int] = set()

    def start(self) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=BENCH
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.argv[0]} exited: {self.log.read_text(errors='replace')[-2000:]}"
                )
            try:
                with urllib.request.urlopen(self.health, timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"{self.health} did not answer within 60 s")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        """
        SIGTERM, bounded wait, SIGKILL; then any child it left behind (the
        peers put theirs in process groups of their own), by pid.
        """
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(OSError):
            self.seen.update(descendants(self.proc.pid))
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for pid in self.seen:
            with contextlib.suppress(OSError):
                # Only what is still the child it started (pids are reused).
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
                if not any(m in cmdline for m in self.child_markers):
                    continue
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------
# The four ways to the child, behind one interface


class Session(Protocol):
    async def call(self) -> None: ...


class Target(Protocol):
    name: str
    label: str
    pid: int | None

    async def open(self, n: int) -> Sequence[Session]: ...

    async def idle(self, n: int) -> Sequence[Session]: ...

    async def end(self, sessions: Sequence[Session]) -> None: ...

    async def setup_once(self) -> float: ...

    def memory_roots(self, sessions: Sequence[Session]) -> list[int]: ...

    def children(self, sessions: Sequence[Session]) -> int: ...


class Direct:
    """
    The children spawned by this script and spoken to over their stdio.
    """

    name = "direct"
    label = "stdio, direct"
    pid: int | None = None

    def __init__(self, wrapper: Path, env: dict[str, str]) -> None:
        self.wrapper = wrapper
        self.env = env

    async def open(self, n: int) -> Sequence[Session]:
        return await open_direct_sessions(self.wrapper, self.env, n)

    async def idle(self, n: int) -> Sequence[Session]:
        return await self.open(n)

    async def end(self, sessions: Sequence[Session]) -> None:
        await asyncio.gather(*(s.close() for s in sessions if isinstance(s, DirectSession)))

    async def setup_once(self) -> float:
        loop = asyncio.get_running_loop()
        return await asyncio.wait_for(
            loop.run_in_executor(None, direct_setup_once, self.wrapper, self.env), 40
        )

    def memory_roots(self, sessions: Sequence[Session]) -> list[int]:
        return [s.proc.pid for s in sessions if isinstance(s, DirectSession) and s.proc is not None]

    def children(self, sessions: Sequence[Session]) -> int:
        return len(sessions)


class Bridge:
    """
    A bridge serving Streamable HTTP at C{/mcp} on C{port}; C{baseline} is
    how many children it has with no session open.
    """

    def __init__(
        self, name: str, label: str, port: int, pid: int, token: str | None, baseline: int
    ) -> None:
        self.name = name
        self.label = label
        self.port = port
        self.pid: int | None = pid
        self.token = token
        self.baseline = baseline

    async def open(self, n: int) -> Sequence[Session]:
        return await open_http_sessions(self.port, self.token, n)

    async def idle(self, n: int) -> Sequence[Session]:
        sessions = await self.open(n)
        # Idle: no connection held open either.
        await asyncio.gather(
            *(s.close(delete=False) for s in sessions if isinstance(s, HTTPSession))
        )
        return sessions

    async def settle(self, settle_for: float) -> None:
        assert self.pid is not None
        await settle(self.pid, self.baseline, settle_for=settle_for)

    async def end(self, sessions: Sequence[Session]) -> None:
        await asyncio.gather(
            *(s.close(delete=True) for s in sessions if isinstance(s, HTTPSession))
        )
        await self.settle(0.2)

    async def setup_once(self) -> float:
        s = HTTPSession(self.port, self.token)
        try:
            return await asyncio.wait_for(s.start(), 30)
        finally:
            await s.close()
            await self.settle(0.05)

    def memory_roots(self, sessions: Sequence[Session]) -> list[int]:
        assert self.pid is not None
        return [self.pid]

    def children(self, sessions: Sequence[Session]) -> int:
        assert self.pid is not None
        return len(children_of(self.pid))


class StatelessBridge(Bridge):
    """
    fjmcp serving stateless (MCP 2026-07-28) clients: nothing to open or
    end, every request served by the user's warm child.  Load only: it has
    no sessions whose memory or set-up could be measured.
    """

    async def open(self, n: int) -> Sequence[Session]:
        sessions = [StatelessHTTPSession(self.port, self.token) for _ in range(n)]
        await asyncio.gather(*(s.start() for s in sessions))
        return sessions

    async def end(self, sessions: Sequence[Session]) -> None:
        await asyncio.gather(*(s.close() for s in sessions if isinstance(s, StatelessHTTPSession)))


# --------------------------------------------------------------------------
# The phases


async def memory_phase(target: Target, idle: int) -> dict[str, Any]:
    """
    On fresh processes: the tree's memory before and with C{idle} idle
    sessions (for the direct path: C{idle} children and nothing else).
    """
    warm = await target.open(4)
    await target.end(warm)
    await asyncio.sleep(0.5)
    pid = target.pid
    before = tree_memory(target.memory_roots([])) if pid is not None else {}
    bridge_before = rss_kib([pid]) if pid is not None else 0
    sessions = await target.idle(idle)
    await asyncio.sleep(1.0)
    with_idle = tree_memory(target.memory_roots(sessions))
    bridge_idle = rss_kib([pid]) if pid is not None else 0
    children = target.children(sessions)
    await target.end(sessions)
    return {
        "idle_sessions": idle,
        "before": before,
        "idle": with_idle,
        "children": children,
        # The bridge process alone, its children left out.
        "bridge_kib_per_session": (bridge_idle - bridge_before) / idle,
    }


def driver_of(target: Target, args: argparse.Namespace) -> str:
    """
    wrk drives the bridges unless told otherwise; the direct path (stdio,
    no HTTP) is always driven from Python.
    """
    return args.driver if isinstance(target, Bridge) else "python"


async def load_once(target: Target, concurrency: int, args: argparse.Namespace) -> dict[str, Any]:
    sessions = await target.open(concurrency)
    try:
        children = target.children(sessions)
        if isinstance(target, Bridge) and args.driver == "wrk":
            # Stateless clients have no session: a placeholder each.
            ids = [getattr(s, "session_id", None) for s in sessions]
            assert None not in ids
            result = await wrk_closed_loop(
                target.port,
                target.token,
                [str(i) for i in ids],
                args.phase_seconds,
                args.warmup_seconds,
                target.pid,
                protocol=STATELESS if isinstance(target, StatelessBridge) else PROTOCOL,
            )
        else:
            calls: list[Callable[[], Awaitable[None]]] = [s.call for s in sessions]
            result = await closed_loop(
                calls,
                max(1, args.requests // concurrency),
                args.warmup,
                args.phase_seconds,
                lambda: Meter(target.pid),
            )
    finally:
        await target.end(sessions)
    result["children"] = children
    result["driver"] = driver_of(target, args)
    return result


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"rounds": len(runs)}
    for key, value in runs[0].items():
        values = [r[key] for r in runs if key in r]
        if key in ("requests", "errors"):
            merged[key] = sum(values)
        elif isinstance(value, int | float):
            merged[key] = statistics.median(values)
        elif key == "driver":
            merged[key] = value
    return merged


async def run(
    args: argparse.Namespace, targets: list[Target], progress: Callable[[str], None]
) -> dict[str, Any]:
    results: dict[str, Any] = {"memory": {}, "rounds": {}, "load": {}, "setup": {}}
    for t in targets:
        if isinstance(t, StatelessBridge):
            continue
        progress(f"memory: {t.name}, {args.idle} idle sessions")
        results["memory"][t.name] = await memory_phase(t, args.idle)
    rounds: dict[str, dict[int, list[dict[str, Any]]]] = {
        t.name: {c: [] for c in args.sessions} for t in targets
    }
    for n in range(args.rounds):
        order = targets[n % len(targets) :] + targets[: n % len(targets)]
        for c in args.sessions:
            for t in order:
                progress(f"load, round {n + 1}/{args.rounds}: {t.name}, {c} session(s)")
                rounds[t.name][c].append(await load_once(t, c, args))
    results["rounds"] = {name: {str(c): r for c, r in per.items()} for name, per in rounds.items()}
    results["load"] = {
        name: {str(c): median_of(r) for c, r in per.items()} for name, per in rounds.items()
    }
    progress(f"session set-up: {args.setup_samples} samples each")
    with_sessions = [t for t in targets if not isinstance(t, StatelessBridge)]
    samples: dict[str, list[float]] = {t.name: [] for t in with_sessions}
    for _ in range(args.setup_samples):
        for t in with_sessions:
            samples[t.name].append(await t.setup_once())
    results["setup"] = {
        name: {
            "samples": len(s),
            "median_ms": statistics.median(s) * 1000,
            "min_ms": min(s) * 1000,
        }
        for name, s in samples.items()
    }
    return results


# --------------------------------------------------------------------------
# Report


def _f(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def report(
    info: dict[str, Any], results: dict[str, Any], targets: list[Target], args: argparse.Namespace
) -> str:
    v = info["versions"]
    load = results["load"]
    names = [t.name for t in targets]
    labels = {t.name: t.label for t in targets}
    bridges = [n for n in names if n != "direct"]
    out = [
        f"Date: {info['date']}; machine: {info['nproc']} CPUs ({info['cpu']}), "
        f"{info['memory_mib']} MiB, Linux {info['kernel']}; Python {info['python']}, "
        f"Node {v['node']}; fjmcp {v['fjmcp']} at {info['revision']} (Twisted {v['twisted']}, "
        f"Klein {v['klein']}); supergateway {v['supergateway']}; mcp-proxy {v['mcp-proxy']} "
        f"(mcp SDK {v['mcp_sdk']}).",
        load_and_runtime(info),
        "",
        f"Load: tools/call echo, closed loop (one request in flight per session), "
        f"{args.rounds} round(s); "
        + (
            f"the bridges driven by wrk (one thread and connection per session, "
            f"{args.warmup_seconds:g} s unrecorded, then {args.phase_seconds:g} s recorded; "
            "wrk's latency histogram), "
            if args.driver == "wrk"
            else ""
        )
        + f"the Python driver (this script) up to {args.requests} recorded requests per phase "
        f"({args.warmup} unrecorded per session first)"
        + (" for the direct path only" if args.driver == "wrk" else "")
        + ". Figures are medians over rounds, requests and errors totals. Bridge CPU: "
        "the bridge process alone (all its threads), children not included; load generator "
        "CPU: wrk's, or this script's.",
        "",
        "| sessions | path | driver | requests | errors | req/s | p50 ms | p99 ms | bridge CPU "
        "| load generator CPU | children during load |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in args.sessions:
        for n in names:
            r = load[n][str(c)]
            cpu = (
                f"{r['broker_cpu_share'] * 100:.0f}% ({r['broker_cpu_us_per_request']:.0f} µs/req)"
                if "broker_cpu_share" in r
                else "-"
            )
            out.append(
                f"| {c} | {labels[n]} | {r.get('driver', 'python')} | {r['requests']} "
                f"| {r['errors']} | {_f(r['rps'])} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
                f"| {cpu} | {r.get('loadgen_cpu_share', 0) * 100:.0f}% | {r['children']:.0f} |"
            )
    out += [
        "",
        "How each grows with concurrency (req/s, then p99 ms; x is against 1 session):",
        "",
        "| path | "
        + " | ".join(f"req/s at {c}" for c in args.sessions)
        + " | "
        + " | ".join(f"p99 at {c}" for c in args.sessions)
        + " |",
        "|---|" + "---:|" * (2 * len(args.sessions)),
    ]
    for n in names:
        rps = [load[n][str(c)]["rps"] for c in args.sessions]
        p99 = [load[n][str(c)]["p99_ms"] for c in args.sessions]
        cells = [_f(rps[0])] + [f"{_f(x)} (x{x / rps[0]:.1f})" for x in rps[1:]]
        cells += [f"{p99[0]:.2f}"] + [f"{x:.1f} (x{x / p99[0]:.0f})" for x in p99[1:]]
        out.append(f"| {labels[n]} | " + " | ".join(cells) + " |")
    out += [
        "",
        f"Session set-up (median of {args.setup_samples}, interleaved; fastest in brackets) "
        f"and memory with {args.idle} idle sessions (RSS and PSS summed over the bridge and "
        "all its descendants; the direct path: the children alone):",
        "",
        "| path | set-up ms | processes | RSS MiB, 0 sessions | RSS MiB, idle | "
        "RSS KiB per session | PSS MiB, idle | bridge process alone, KiB per session |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in names:
        if n not in results["setup"]:
            continue
        s = results["setup"][n]
        m = results["memory"][n]
        before = m["before"].get("rss_kib", 0)
        idle = m["idle"]
        out.append(
            f"| {labels[n]} | {s['median_ms']:.1f} ({s['min_ms']:.1f}) | {idle['processes']} "
            f"| {before / 1024:.1f} | {idle['rss_kib'] / 1024:.1f} "
            f"| {(idle['rss_kib'] - before) / m['idle_sessions']:.0f} "
            f"| {idle['pss_kib'] / 1024:.1f} "
            f"| {'-' if n == 'direct' else _f(m['bridge_kib_per_session'], 1)} |"
        )
    if "fjmcp" in bridges and str(16) in load.get("fjmcp", {}):
        f = load["fjmcp"]["16"]
        out += ["", "Goal: fjmcp ahead of every peer on throughput and p99 at 16 sessions.", ""]
        out.append("| against | fjmcp req/s ÷ peer req/s | peer p99 ÷ fjmcp p99 | |")
        out.append("|---|---:|---:|---|")
        for n in bridges:
            if n.startswith("fjmcp"):
                continue
            p = load[n]["16"]
            ahead = f["rps"] > p["rps"] and f["p99_ms"] < p["p99_ms"]
            out.append(
                f"| {labels[n]} | {f['rps'] / p['rps']:.2f} | {p['p99_ms'] / f['p99_ms']:.2f} "
                f"| {'ahead' if ahead else 'NOT ahead'} |"
            )
    return "\n".join(out)


def plot(
    results: dict[str, Any], targets: list[Target], sessions: list[int], path: Path, driver: str
) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install '.[bench]')", file=sys.stderr)
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {
        "direct": "k--",
        "fjmcp": "C0-o",
        "fjmcp-stateless": "C0:d",
        "supergateway": "C1-s",
        "mcp-proxy": "C2-^",
    }
    for t in targets:
        per = results["load"][t.name]
        rps = [per[str(c)]["rps"] for c in sessions]
        p99 = [per[str(c)]["p99_ms"] for c in sessions]
        style = styles.get(t.name, "-")
        left.plot(sessions, rps, style, label=t.label)
        right.plot(sessions, p99, style, label=t.label)
    for ax, title, unit in (
        (left, "Throughput", "requests/s"),
        (right, "p99 latency", "ms (log scale)"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sessions, [str(c) for c in sessions])
        ax.set_xlabel("concurrent sessions (one request outstanding each)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    right.set_yscale("log")
    left.set_ylim(bottom=0)
    left.legend(fontsize=8)
    fig.suptitle(
        "tools/call echo on the scripted stdio child: direct, fjmcp (auth on), "
        "supergateway --stateful, mcp-proxy; "
        + (
            "bridges driven by wrk, the direct path by a Python client"
            if driver == "wrk"
            else "all driven by a Python client"
        ),
        fontsize=9,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


# --------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sessions",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 16, 64],
        help="concurrencies, comma-separated",
    )
    parser.add_argument("--rounds", type=int, default=3, help="load rounds")
    parser.add_argument("--requests", type=int, default=2000, help="recorded requests per phase")
    parser.add_argument(
        "--driver",
        choices=["wrk", "python"],
        default="wrk",
        help="load generator for the bridges: wrk (little CPU; the default) or this script",
    )
    parser.add_argument(
        "--warmup", type=int, default=10, help="unrecorded requests per session (python driver)"
    )
    parser.add_argument(
        "--warmup-seconds", type=float, default=1.0, help="unrecorded load first (wrk driver)"
    )
    parser.add_argument(
        "--phase-seconds",
        type=float,
        default=6.0,
        help="length of each load phase (wrk) or its deadline (python)",
    )
    parser.add_argument("--idle", type=int, default=100, help="idle sessions for memory")
    parser.add_argument("--setup-samples", type=int, default=10)
    parser.add_argument(
        "--only",
        type=lambda s: s.split(","),
        default=["direct", "fjmcp", "fjmcp-stateless", "supergateway", "mcp-proxy"],
        help="which paths, comma-separated (direct,fjmcp,fjmcp-stateless,supergateway,mcp-proxy)",
    )
    parser.add_argument(
        "--quiet-peers",
        action="store_true",
        help="run the peers at their quietest log level instead of their default",
    )
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="the PNG to write")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--profile", type=Path, help="run fjmcp under pyinstrument, its session here"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()

    install_peers()
    if args.driver == "wrk":
        wrk_path()
    info = machine_info()
    info["versions"] = versions()
    workdir = Path(tempfile.mkdtemp(prefix="fjmcp-bench-peers-"))
    started = time.monotonic()
    stack = Stack(workdir, args.profile.resolve() if args.profile else None, "info")
    peers: list[PeerProcess] = []

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:5.0f} s] {message} ...", file=sys.stderr, flush=True)

    try:
        stack.prepare()
        stack.start()
        env = child_environment(stack.forgejo_url, "bench-direct-token")
        targets: list[Target] = []
        if "direct" in args.only:
            targets.append(Direct(stack.wrapper, env))
        if "fjmcp" in args.only or "fjmcp-stateless" in args.only:
            token = oauth_access_token(stack.broker_url)
        if "fjmcp" in args.only:
            targets.append(
                Bridge("fjmcp", "fjmcp (auth on)", stack.broker_port, stack.broker_pid, token, 0)
            )
        if "fjmcp-stateless" in args.only:
            targets.append(
                StatelessBridge(
                    "fjmcp-stateless",
                    "fjmcp stateless (2026-07-28, auth on)",
                    stack.broker_port,
                    stack.broker_pid,
                    token,
                    0,
                )
            )
        child_cmd = f"{stack.wrapper} --transport stdio"
        if "supergateway" in args.only:
            port = free_port()
            node = shutil.which("node") or "node"
            sg = PeerProcess(
                [
                    node,
                    str(SUPERGATEWAY),
                    "--stdio",
                    child_cmd,
                    "--outputTransport",
                    "streamableHttp",
                    "--stateful",
                    "--port",
                    str(port),
                    "--healthEndpoint",
                    "/healthz",
                    *(["--logLevel", "none"] if args.quiet_peers else []),
                ],
                # Its children inherit its environment: give it the child's.
                env | {"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                workdir / "supergateway.log",
                f"http://{HOST}:{port}/healthz",
                (bytes(stack.wrapper), bytes(CHILD_SCRIPT)),
            )
            peers.append(sg)
            sg.start()
            targets.append(Bridge("supergateway", "supergateway --stateful", port, sg.pid, None, 0))
        if "mcp-proxy" in args.only:
            port = free_port()
            child_env = [a for k, v in env.items() for a in ("-e", k, v)]
            mp = PeerProcess(
                [
                    str(PEERS_VENV / "bin" / "mcp-proxy"),
                    "--host",
                    HOST,
                    "--port",
                    str(port),
                    *(["--log-level", "WARNING"] if args.quiet_peers else []),
                    *child_env,
                    "--",
                    str(stack.wrapper),
                    "--transport",
                    "stdio",
                ],
                {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
                workdir / "mcp-proxy.log",
                f"http://{HOST}:{port}/status",
                (bytes(stack.wrapper), bytes(CHILD_SCRIPT)),
            )
            peers.append(mp)
            mp.start()
            # Its one child is started with it and shared by every session.
            targets.append(Bridge("mcp-proxy", "mcp-proxy", port, mp.pid, None, 1))
        results = asyncio.run(run(args, targets, progress))
    finally:
        for peer in peers:
            peer.stop()
        stack.stop()
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    info["runtime_s"] = time.monotonic() - started
    info["loadavg_at_end"] = os.getloadavg()
    results["machine"] = info
    results["quiet_peers"] = args.quiet_peers
    print(report(info, results, targets, args))
    if args.profile is not None:
        print(f"\n(profiled run: fjmcp's numbers distorted; profile in {args.profile})")
    if not args.no_plot and plot(results, targets, args.sessions, args.plot, args.driver):
        print(f"\nplot: {args.plot}", file=sys.stderr)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
