#!/usr/bin/env python3
"""
Benchmark of the MCP session bridge (issue 4): the same trivial stdio MCP
server (C{tests/scripted_child.py}) reached through the broker over HTTP and
straight over stdio, in one run, so the numbers compare as ratios on a noisy
shared machine.  Results and how to read them: docs/benchmarks.md.

    /tmp/venv/bin/python bench/bench_bridge.py [--requests 4000] [--sessions 1,16]
        [--rounds 3] [--idle 100] [--setup-samples 20] [--json out.json]
        [--profile out.pyisession]

What it does, all on 127.0.0.1:

  1. starts the Forgejo stand-in and the broker (C{twistd fjmcp}, default
     log level) as their own processes, from a throw-away directory; the
     broker's forgejo-mcp is a wrapper that runs the scripted child with this
     interpreter;
  2. gets an access token through the real OAuth flow (registration,
     consent, the stand-in's login, the callback, the token endpoint);
  3. memory, on the fresh broker: its RSS before and after opening C{--idle}
     sessions (initialize + notifications/initialized, connections closed
     again), per session; the children's own RSS separately;
  4. load, C{--rounds} times: for each concurrency C, C sessions each with
     one C{tools/call echo} outstanding at a time (closed loop), first
     straight to C children over stdio, then through the broker; requests/s,
     p50, p99, and where the CPU went (broker, load generator, machine);
  5. session set-up: initialize through the broker (spawn included) against
     posix_spawn + initialize of the child directly, interleaved; medians.

Every loop is bounded by a count and a deadline.  C{--profile} runs the
broker under pyinstrument (installed by hand, not a project dependency);
read the file with C{pyinstrument --load FILE}.  Numbers from a profiled
run are distorted by the profiler.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# After the path tweak: the project's modules, and bench/ as a namespace package.
from bench.mcpload import (  # noqa: E402
    HTTPSession,
    Meter,
    Stack,
    children_of,
    closed_loop,
    direct_setup_once,
    machine_info,
    oauth_access_token,
    open_direct_sessions,
    open_http_sessions,
    proc_status,
    rss_kib,
    settle,
)
from fjmcp.mcp.children import child_environment  # noqa: E402

TARGET_P50_OVERHEAD_MS = 1.0
TARGET_RPS_16 = 1500.0
TARGET_KIB_PER_IDLE = 64.0


# --------------------------------------------------------------------------
# The phases


async def load_phase(
    stack: Stack, token: str, env: dict[str, str], concurrency: int, args: argparse.Namespace
) -> dict[str, Any]:
    per_session = max(1, args.requests // concurrency)
    result: dict[str, Any] = {"sessions": concurrency}

    direct = await open_direct_sessions(stack.wrapper, env, concurrency)
    try:
        result["direct"] = await closed_loop(
            [s.call for s in direct],
            per_session,
            args.warmup,
            args.phase_seconds,
            lambda: Meter(None),
        )
    finally:
        await asyncio.gather(*(s.close() for s in direct))

    brokered = await open_http_sessions(stack.broker_port, token, concurrency)
    try:
        result["broker"] = await closed_loop(
            [s.call for s in brokered],
            per_session,
            args.warmup,
            args.phase_seconds,
            lambda: Meter(stack.broker_pid),
        )
    finally:
        await asyncio.gather(*(s.close() for s in brokered))
    return result


async def setup_phase(
    stack: Stack, token: str, env: dict[str, str], samples: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    direct: list[float] = []
    brokered: list[float] = []
    for _ in range(samples):
        direct.append(
            await asyncio.wait_for(
                loop.run_in_executor(None, direct_setup_once, stack.wrapper, env), 40
            )
        )
        b = HTTPSession(stack.broker_port, token)
        try:
            brokered.append(await asyncio.wait_for(b.start(), 30))
        finally:
            await b.close()
        # Let the ended child go before the next sample.
        await settle(stack.broker_pid, 0, settle_for=0.1)
    direct_ms = statistics.median(direct) * 1000
    broker_ms = statistics.median(brokered) * 1000
    return {
        "samples": samples,
        "direct_median_ms": direct_ms,
        "broker_median_ms": broker_ms,
        "overhead_ms": broker_ms - direct_ms,
        "direct_min_ms": min(direct) * 1000,
        "broker_min_ms": min(brokered) * 1000,
    }


async def memory_phase(stack: Stack, token: str, idle: int) -> dict[str, Any]:
    """
    Run first, on a fresh broker: freed memory of earlier phases would stay
    in the interpreter's arenas and hide what new sessions take.  Sessions
    open in two halves, so the cost per session is also seen as a slope.
    """
    pid = stack.broker_pid
    # Warm the paths a session takes (imports, pools, the first spawn).
    warm = await open_http_sessions(stack.broker_port, token, 4)
    await asyncio.gather(*(s.close() for s in warm))
    await settle(pid, 0)
    before = proc_status(pid)
    half = idle // 2
    first = await open_http_sessions(stack.broker_port, token, half)
    # Idle: no connection held open either.
    await asyncio.gather(*(s.close(delete=False) for s in first))
    await settle(pid, half)
    middle = proc_status(pid)
    second = await open_http_sessions(stack.broker_port, token, idle - half)
    await asyncio.gather(*(s.close(delete=False) for s in second))
    await settle(pid, idle)
    after = proc_status(pid)
    kids = children_of(pid)
    child_kib = rss_kib(kids)
    result = {
        "idle_sessions": idle,
        "rss_before_kib": before["VmRSS"],
        "rss_half_kib": middle["VmRSS"],
        "rss_after_kib": after["VmRSS"],
        "kib_per_session": (after["VmRSS"] - before["VmRSS"]) / idle,
        "anon_kib_per_session": (after.get("RssAnon", 0) - before.get("RssAnon", 0)) / idle,
        "slope_kib_per_session": (after["VmRSS"] - middle["VmRSS"]) / max(1, idle - half),
        "children": len(kids),
        "child_rss_kib_each": child_kib / len(kids) if kids else float("nan"),
    }
    # Reopen each connection only to end the session.
    await asyncio.gather(*(s.close(delete=True) for s in first + second))
    await settle(pid, 0)
    result["rss_after_end_kib"] = proc_status(pid)["VmRSS"]
    return result


# --------------------------------------------------------------------------
# Report


def summarize(rounds: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """
    Per concurrency: the median over rounds of every figure, and the median
    of each round's own broker-minus-direct p50 (the two ran back to back,
    so that difference is the least disturbed by other load on the machine).
    """
    out = []
    for i, first in enumerate(rounds[0]):
        phases = [r[i] for r in rounds]
        summary: dict[str, Any] = {"sessions": first["sessions"], "rounds": len(phases)}
        for path in ("direct", "broker"):
            merged: dict[str, Any] = {}
            for key, value in phases[0][path].items():
                values = [p[path][key] for p in phases]
                if key in ("requests", "errors"):
                    merged[key] = sum(values)
                elif isinstance(value, int | float):
                    merged[key] = statistics.median(values)
            summary[path] = merged
        summary["p50_overhead_ms"] = statistics.median(
            p["broker"]["p50_ms"] - p["direct"]["p50_ms"] for p in phases
        )
        out.append(summary)
    return out


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(info: dict[str, Any], results: dict[str, Any]) -> str:
    out = []
    out.append(
        f"Date: {info['date']}; machine: {info['nproc']} CPUs ({info['cpu']}), "
        f"{info['memory_mib']} MiB, Linux {info['kernel']}, Python {info['python']}; "
        f"load average at start {', '.join(f'{x:.2f}' for x in info['loadavg_at_start'])}; "
        f"fjmcp at {info['revision']}"
    )
    out.append("")
    rounds = len(results["rounds"])
    out.append(
        f"Load: tools/call echo, closed loop, {rounds} round{'s' if rounds != 1 else ''} "
        "(each: direct, then through the broker); figures are medians over rounds, "
        "requests and errors are totals."
    )
    out.append("")
    out.append(
        "| sessions | path | requests | errors | req/s | p50 ms | p99 ms | mean ms |"
        " broker CPU | load generator CPU | machine busy |"
    )
    out.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for phase in results["load"]:
        for path in ("direct", "broker"):
            r = phase[path]
            cpu = (
                f"{r['broker_cpu_share'] * 100:.0f}% ({r['broker_cpu_us_per_request']:.0f} µs/req)"
                if path == "broker"
                else "-"
            )
            label = "stdio, direct" if path == "direct" else "HTTP, via broker"
            out.append(
                f"| {phase['sessions']} | {label} | {r['requests']} | {r['errors']} "
                f"| {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
                f"| {r['mean_ms']:.2f} | {cpu} | {r['loadgen_cpu_share'] * 100:.0f}% "
                f"| {r['machine_busy_share'] * 100:.0f}% |"
            )
    if len(results["rounds"]) > 1:
        out.append("")
        out.append(
            "| round | sessions | direct req/s | broker req/s | direct p50 ms | broker p50 ms "
            "| broker adds at p50 | machine busy (broker phase) |"
        )
        out.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
        for n, phases in enumerate(results["rounds"], 1):
            for p in phases:
                d, b = p["direct"], p["broker"]
                out.append(
                    f"| {n} | {p['sessions']} | {d['rps']:.0f} | {b['rps']:.0f} "
                    f"| {d['p50_ms']:.2f} | {b['p50_ms']:.2f} "
                    f"| +{b['p50_ms'] - d['p50_ms']:.2f} ms "
                    f"| {b['machine_busy_share'] * 100:.0f}% |"
                )
    out.append("")
    s = results["setup"]
    out.append(
        f"Session set-up (median of {s['samples']}, interleaved): initialize through the "
        f"broker {s['broker_median_ms']:.1f} ms (fastest {s['broker_min_ms']:.1f}), "
        f"posix_spawn + initialize of the child directly {s['direct_median_ms']:.1f} ms "
        f"(fastest {s['direct_min_ms']:.1f}): the broker adds {s['overhead_ms']:.1f} ms."
    )
    m = results["memory"]
    out.append(
        f"Idle sessions: {m['idle_sessions']}; broker RSS {m['rss_before_kib']} → "
        f"{m['rss_after_kib']} KiB = {m['kib_per_session']:.1f} KiB per session "
        f"(anonymous memory {m['anon_kib_per_session']:.1f}; second half alone "
        f"{m['slope_kib_per_session']:.1f}); after ending them "
        f"{m['rss_after_end_kib']} KiB. Each child: {m['child_rss_kib_each']:.0f} KiB "
        f"({m['children']} children)."
    )
    out.append("")
    out.append("| target | result | |")
    out.append("|---|---|---|")
    for phase in results["load"]:
        over = phase["p50_overhead_ms"]
        out.append(
            f"| broker adds ≤ {TARGET_P50_OVERHEAD_MS:g} ms at p50 ({phase['sessions']} "
            f"session{'s' if phase['sessions'] != 1 else ''}) | +{over:.2f} ms "
            f"| {verdict(over <= TARGET_P50_OVERHEAD_MS)} |"
        )
        if phase["sessions"] == 16:
            rps = phase["broker"]["rps"]
            out.append(
                f"| ≥ {TARGET_RPS_16:,.0f} requests/s across 16 sessions | {rps:,.0f} "
                f"| {verdict(rps >= TARGET_RPS_16)} |"
            )
    kib = m["kib_per_session"]
    out.append(
        f"| ≤ {TARGET_KIB_PER_IDLE:g} KiB broker memory per idle session "
        f"| {kib:.1f} KiB | {verdict(kib <= TARGET_KIB_PER_IDLE)} |"
    )
    return "\n".join(out)


# --------------------------------------------------------------------------


async def run(args: argparse.Namespace, stack: Stack) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    token = await loop.run_in_executor(None, oauth_access_token, stack.broker_url)
    env = child_environment(stack.forgejo_url, "bench-direct-token")
    results: dict[str, Any] = {"rounds": []}
    print(f"memory: {args.idle} idle sessions ...", file=sys.stderr, flush=True)
    results["memory"] = await memory_phase(stack, token, args.idle)
    for round in range(args.rounds):
        phases = []
        for concurrency in args.sessions:
            print(
                f"load, round {round + 1}/{args.rounds}: {concurrency} session(s) ...",
                file=sys.stderr,
                flush=True,
            )
            phases.append(await load_phase(stack, token, env, concurrency, args))
        results["rounds"].append(phases)
    results["load"] = summarize(results["rounds"])
    print("session set-up ...", file=sys.stderr, flush=True)
    results["setup"] = await setup_phase(stack, token, env, args.setup_samples)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000, help="recorded requests per phase")
    parser.add_argument(
        "--sessions",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 16],
        help="concurrencies, comma-separated",
    )
    parser.add_argument("--idle", type=int, default=100, help="idle sessions for memory")
    parser.add_argument(
        "--rounds", type=int, default=3, help="load rounds (direct, then broker, each time)"
    )
    parser.add_argument("--setup-samples", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=20, help="unrecorded requests per session")
    parser.add_argument(
        "--phase-seconds", type=float, default=40.0, help="deadline of each load phase"
    )
    parser.add_argument("--log-level", default="info", help="the broker's --log-level")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--profile", type=Path, help="run the broker under pyinstrument, its session here"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if args.profile is not None:
        args.profile = args.profile.resolve()

    info = machine_info()
    workdir = Path(tempfile.mkdtemp(prefix="fjmcp-bench-"))
    stack = Stack(workdir, args.profile, args.log_level)
    started = time.monotonic()
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
    results["profiled"] = args.profile is not None
    print(report(info, results))
    if args.profile is not None:
        print(f"\n(profiled run: numbers distorted; profile in {args.profile})")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
