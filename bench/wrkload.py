"""
Closed-loop load from wrk (a C load generator that costs little CPU), for
the benchmarks whose Python load generator would share the 2 cores with the
bridge it measures.

One wrk thread per session, one connection each, one request in flight per
connection (bench/wrk_mcp.lua); the sessions are opened beforehand by the
caller and handed to wrk by id.  wrk's own latency histogram gives the
percentiles; the Lua script checks every answer (status 200, the request's
id in the body).
"""

from __future__ import annotations

import asyncio
import json
import resource
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.mcpload import HOST, PROTOCOL, Meter

SCRIPT = Path(__file__).resolve().parent / "wrk_mcp.lua"


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit(
            "wrk is not installed: apt-get install wrk (Debian's package), or use --driver python"
        )
    return path


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def wrk_closed_loop(
    port: int,
    token: str | None,
    session_ids: Sequence[str],
    seconds: float,
    warmup: float,
    bridge_pid: int | None,
    path: str = "/mcp",
    protocol: str = PROTOCOL,
) -> dict[str, Any]:
    """
    C{warmup} seconds of unrecorded load, then C{seconds} recorded; the
    same keys as L{bench.mcpload.closed_loop}'s result, plus wrk's own CPU
    share and its error counts.  C{protocol} is the sessions' MCP version,
    or L{bench.mcpload.STATELESS} for stateless requests (then each of
    C{session_ids} is a placeholder, one per client).
    """
    n = len(session_ids)
    url = f"http://{HOST}:{port}{path}"

    async def wrk(duration: float) -> tuple[dict[str, Any], float]:
        argv = [
            wrk_path(),
            f"-t{n}",
            f"-c{n}",
            f"-d{max(1, round(duration))}s",
            "--timeout=10s",
            "-s",
            str(SCRIPT),
            url,
            "--",
            protocol,
            token or "-",
            *session_ids,
        ]
        before = _children_cpu()
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(proc.communicate(), duration + 60)
        if proc.returncode != 0:
            raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode()[-1000:]}")
        line = [x for x in out.decode().splitlines() if x.startswith("{")][-1:]
        if not line:
            raise RuntimeError(f"wrk printed no result: {out.decode()[-1000:]}")
        return json.loads(line[0]), _children_cpu() - before

    if warmup > 0:
        await wrk(warmup)
    meter = Meter(bridge_pid)
    started = time.perf_counter()
    result, wrk_cpu = await wrk(seconds)
    wall = time.perf_counter() - started
    cpu = meter.read()
    # The meter counts this (idle) script as the load generator: wrk is it.
    cpu["loadgen_cpu_share"] = wrk_cpu / wall
    elapsed = result["duration_us"] / 1e6
    errors = (
        result["bad"] + result["connect"] + result["read"] + result["write"] + result["timeout"]
    )
    requests = result["requests"]
    if "broker_cpu_share" in cpu and requests:
        cpu["broker_cpu_us_per_request"] = cpu["broker_cpu_share"] * wall / requests * 1e6
    return cpu | {
        "requests": requests,
        "errors": errors,
        "seconds": elapsed,
        "rps": requests / elapsed if elapsed > 0 else float("nan"),
        "p50_ms": result["p50_us"] / 1000,
        "p90_ms": result["p90_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "p999_ms": result["p999_us"] / 1000,
        "max_ms": result["max_us"] / 1000,
        "mean_ms": result["mean_us"] / 1000,
        "first_bad": result["first_bad"],
    }
