#!/usr/bin/env python3
"""
The broker's store on SQLite and on PostgreSQL: refresh-token grants/s and
C{/mcp} requests/s of one broker node on each engine, the same settings
otherwise, in one run.  Results and how to read them: docs/benchmarks.md,
"SQLite and PostgreSQL".

    python bench/bench_store.py [--rounds 3] [--seconds 5] [--warmup-seconds 1]
        [--chains 1,8] [--shared-client] [--sessions 16] [--only grants,mcp]
        [--postgres-commit off,on] [--json out.json] [--keep]

What it starts, all on 127.0.0.1: a throwaway PostgreSQL cluster of its own
(tests/postgres_support.py: a fresh directory, a free port, run as an
unprivileged user when this is root; never a system cluster), removed at
exit; then, per engine, the Forgejo stand-in and a broker (C{twistd
fjmcp}) on it: SQLite (C{broker.db} in the data directory, the default)
and PostgreSQL (C{--database postgresql://...} with
C{--database-password-file}), one database and role per PostgreSQL
variant.  C{--postgres-commit} picks the variants: C{off} runs the
database with C{synchronous_commit = off}, the durability SQLite has in
the broker (WAL, C{synchronous=NORMAL}: a commit does not wait for the
disk; a crash may lose the last commits, never corrupt); C{on} is
PostgreSQL's default (every commit waits for its WAL flush).  The cluster
runs with C{fsync} and C{full_page_writes} on (the test settings turn them
off; this script turns them back on).

The broker's per-address rate limit on C{/oauth/token} (and on
registration and authorization) has no option to turn it off: each broker
here trusts 127.0.0.1 as a proxy (C{--trusted-proxies}) and every request
to a limited endpoint carries an X-Forwarded-For address of its own, so
each gets a fresh bucket.  Each broker also serves C{/metrics} on a
listener of its own (C{--metrics-listen}), from which the store's
transactions (count, and time from call to result) are read per phase.

The phases, each C{--warmup-seconds} of unrecorded load then C{--seconds}
recorded, all driven by wrk (bench/wrk_token.lua, bench/wrk_mcp.lua):

  - refresh grants: for each count in C{--chains}, that many chains, each
    its own grant (got through the real OAuth flow at set-up) to a client
    of its own (C{--shared-client}: all to one client), one request in
    flight each; every answer must be 200 and every next request presents
    the refresh token the previous one issued.  A chain is used
    for one wrk run only (the request in flight when wrk stops is lost, so
    its last token is unknown): the warm-up and each round's recorded run
    get fresh grants;
  - /mcp: C{--sessions} MCP sessions (the scripted child,
    tests/scripted_child.py), one wrk connection each, C{tools/call echo}
    with one bearer token, as bench_peers.py's fjmcp row.

Rounds interleave the engines: each phase runs on every engine in turn,
the order rotated each round.  Figures are medians over rounds.
"""

# Every URL here is one this script built for 127.0.0.1.

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TOKEN_SCRIPT = BENCH / "wrk_token.lua"

sys.path.insert(0, str(ROOT))
# After the path tweak: the project's modules, bench/ and tests/ as packages.
from bench.mcpload import (  # noqa: E402
    HOST,
    Meter,
    OAuthFlow,
    Stack,
    cpu_seconds,
    descendants,
    free_port,
    load_and_runtime,
    machine_info,
    open_http_sessions,
    settle,
)
from bench.wrkload import wrk_closed_loop, wrk_path  # noqa: E402

# The caps of bench_peers' broker (one login opens every session).
CAPS = (
    "--max-sessions=400",
    "--max-sessions-per-user=400",
    "--max-children=400",
    "--max-children-per-user=400",
)
STORE_METRIC = "fjmcp_store_operation_duration_seconds"

# --------------------------------------------------------------------------
# The throwaway PostgreSQL cluster


def postgres_unavailable() -> str | None:
    """
    Why no PostgreSQL cluster can run here, or None.
    """
    try:
        from tests.postgres_support import postgres_missing
    except ImportError as e:
        return f"tests/postgres_support.py cannot be imported ({e})"
    return postgres_missing()


@attrs.frozen
class PostgresDatabase:
    url: str
    password_file: Path
    synchronous_commit: str


def postgres_databases(workdir: Path, variants: list[str]) -> list[PostgresDatabase]:
    """
    Start this process's throwaway cluster (stopped and removed at exit by
    tests/postgres_support.py), turn its durability back on, and make one
    database and login role per C{synchronous_commit} variant.
    """
    from psycopg import sql

    from tests.postgres_support import cluster_port, superuser_connect

    port = cluster_port()
    with superuser_connect() as admin:
        # The test settings trade durability for speed; a benchmark of the
        # store measures it as deployed.  postgresql.auto.conf overrides
        # postgresql.conf; both are reloadable without a restart.
        admin.execute("ALTER SYSTEM SET fsync = on")
        admin.execute("ALTER SYSTEM SET full_page_writes = on")
        admin.execute("SELECT pg_reload_conf()")
    # The reload reaches new backends at once, running ones at their next
    # command: check on a new connection.
    deadline = time.monotonic() + 10
    while True:
        with superuser_connect() as admin:
            row = admin.execute("SHOW fsync").fetchone()
        if row is not None and row[0] == "on":
            break
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster did not turn fsync on")
        time.sleep(0.1)
    databases = []
    for commit in variants:
        name = f"fjmcp_bench_{commit}"
        password = secrets.token_urlsafe(24)
        ident = sql.Identifier(name)
        with superuser_connect() as admin:
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(ident, sql.Literal(password))
            )
            admin.execute(
                sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0 ENCODING 'UTF8'").format(
                    ident, ident
                )
            )
            admin.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident))
            admin.execute(
                sql.SQL("ALTER DATABASE {} SET synchronous_commit = {}").format(
                    ident, sql.Literal(commit)
                )
            )
        password_file = workdir / f"{name}.password"
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(password + "\n")
        databases.append(
            PostgresDatabase(f"postgresql://{name}@{HOST}:{port}/{name}", password_file, commit)
        )
    return databases


def postgres_info() -> dict[str, Any]:
    """
    The server's version, its settings that matter here, and the
    postmaster's pid (the parent of every backend) for CPU accounting.
    """
    from tests.postgres_support import superuser_connect

    with superuser_connect() as admin:
        version = admin.execute("SHOW server_version").fetchone()
        backend = admin.execute("SELECT pg_backend_pid()").fetchone()
        settings = {
            name: str(admin.execute(f"SHOW {name}").fetchone()[0])  # type: ignore[index]
            for name in ("fsync", "full_page_writes", "wal_level", "shared_buffers")
        }
        assert version is not None and backend is not None
        # While the backend is alive: its parent is the postmaster.
        with open(f"/proc/{backend[0]}/stat") as f:
            postmaster = int(f.read().rsplit(")", 1)[1].split()[1])
    return {"version": str(version[0]), "settings": settings, "postmaster_pid": postmaster}


def tree_cpu(root: int | None) -> float:
    """
    CPU seconds of a process and all its descendants now alive (the
    cluster: the postmaster and its backends; the broker's are kept open).
    """
    if root is None:
        return 0.0
    total = 0.0
    for pid in (root, *descendants(root)):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(pid)
    return total


# --------------------------------------------------------------------------
# The OAuth flow, every request from a client address of its own


class Flow(OAuthFlow):
    """
    The OAuth flow with every request from a client address of its own (an
    X-Forwarded-For the broker believes from 127.0.0.1), so the
    per-address limits never refuse it.
    """

    def __init__(self, broker: str) -> None:
        super().__init__(broker)
        self._sent = 0

    def extra_headers(self) -> dict[str, str]:
        self._sent += 1
        n = self._sent
        return {"X-Forwarded-For": f"10.{n // 65536 % 100}.{n // 256 % 256}.{n % 256}"}


# --------------------------------------------------------------------------
# One broker per engine


@attrs.define
class Engine:
    name: str
    label: str
    stack: Stack
    metrics_port: int
    access_token: str = ""
    # (client id, refresh token) of the grants not yet used, one per chain
    # to come.
    chains: list[tuple[str, str]] = attrs.Factory(list)

    @property
    def port(self) -> int:
        return self.stack.broker_port

    def take_chains(self, n: int) -> list[tuple[str, str]]:
        taken, self.chains = self.chains[:n], self.chains[n:]
        if len(taken) < n:
            raise RuntimeError(f"{self.name}: out of grants")
        return taken

    def store_counts(self) -> dict[str, tuple[float, float]]:
        """
        The broker's store transactions so far, by operation: (count,
        seconds from call to result, summed).
        """
        url = f"http://{HOST}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        counts: dict[str, list[float]] = {}
        pattern = re.compile(
            rf'^{STORE_METRIC}_(count|sum)\{{operation="([^"]*)"\}} ([0-9.eE+-]+)$', re.M
        )
        for kind, operation, value in pattern.findall(text):
            pair = counts.setdefault(operation, [0.0, 0.0])
            pair[0 if kind == "count" else 1] = float(value)
        return {k: (v[0], v[1]) for k, v in counts.items()}


def store_delta(
    before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]
) -> dict[str, tuple[float, float]]:
    out = {}
    for operation, (count, seconds) in after.items():
        c0, s0 = before.get(operation, (0.0, 0.0))
        if count - c0 > 0:
            out[operation] = (count - c0, seconds - s0)
    return out


# --------------------------------------------------------------------------
# Load


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


async def wrk_grants(port: int, chains: list[tuple[str, str]], seconds: float) -> dict[str, Any]:
    """
    One wrk run of refresh-token chains (bench/wrk_token.lua): its JSON
    line and wrk's CPU seconds.
    """
    n = len(chains)
    argv = [
        wrk_path(),
        f"-t{n}",
        f"-c{n}",
        f"-d{max(1, round(seconds))}s",
        "--timeout=10s",
        "-s",
        str(TOKEN_SCRIPT),
        f"http://{HOST}:{port}/oauth/token",
        "--",
        *(x for chain in chains for x in chain),
    ]
    before = _children_cpu()
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), seconds + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err.decode()[-1000:]}")
    line = [x for x in out.decode().splitlines() if x.startswith("{")][-1:]
    if not line:
        raise RuntimeError(f"wrk printed no result: {out.decode()[-1000:]}")
    result: dict[str, Any] = json.loads(line[0])
    result["wrk_cpu_s"] = _children_cpu() - before
    return result


class Measure:
    """
    Around one recorded run: the broker's CPU (L{Meter}), the cluster's,
    and the broker's store transactions.
    """

    def __init__(self, engine: Engine, postmaster: int | None) -> None:
        self.engine = engine
        self.postmaster = postmaster if engine.name != "sqlite" else None

    def __enter__(self) -> Measure:
        self.store = self.engine.store_counts()
        self.pg = tree_cpu(self.postmaster)
        self.meter = Meter(self.engine.stack.broker_pid)
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.started
        self.cpu = self.meter.read()
        self.pg_share = (tree_cpu(self.postmaster) - self.pg) / self.wall
        self.transactions = store_delta(self.store, self.engine.store_counts())

    def figures(self, requests: int) -> dict[str, Any]:
        """
        Per request: broker and PostgreSQL CPU, store transactions and their
        time (call to result, pool queueing included).
        """
        count = sum(c for c, _ in self.transactions.values())
        seconds = sum(s for _, s in self.transactions.values())
        per = max(1, requests)
        return {
            "broker_cpu_share": self.cpu["broker_cpu_share"],
            "machine_busy_share": self.cpu["machine_busy_share"],
            "postgres_cpu_share": self.pg_share,
            "broker_cpu_us_per_request": self.cpu["broker_cpu_share"] * self.wall / per * 1e6,
            "postgres_cpu_us_per_request": self.pg_share * self.wall / per * 1e6,
            "store_transactions_per_request": count / per,
            "store_ms_per_transaction": seconds / count * 1000 if count else 0.0,
            "store_operations": {
                k: {"count": c, "mean_ms": s / c * 1000} for k, (c, s) in self.transactions.items()
            },
        }


async def grants_phase(
    engine: Engine, chains: int, args: argparse.Namespace, postmaster: int | None
) -> dict[str, Any]:
    if args.warmup_seconds > 0:
        await wrk_grants(engine.port, engine.take_chains(chains), args.warmup_seconds)
    taken = engine.take_chains(chains)
    with Measure(engine, postmaster) as m:
        r = await wrk_grants(engine.port, taken, args.seconds)
    elapsed = r["duration_us"] / 1e6
    errors = r["bad"] + r["connect"] + r["read"] + r["write"] + r["timeout"]
    return m.figures(r["requests"]) | {
        "requests": r["requests"],
        "grants": r["grants"],
        "errors": errors,
        "rps": r["grants"] / elapsed if elapsed > 0 else float("nan"),
        "p50_ms": r["p50_us"] / 1000,
        "p90_ms": r["p90_us"] / 1000,
        "p99_ms": r["p99_us"] / 1000,
        "max_ms": r["max_us"] / 1000,
        "loadgen_cpu_share": r["wrk_cpu_s"] / m.wall,
        "first_bad": r["first_bad"],
    }


async def mcp_phase(
    engine: Engine, args: argparse.Namespace, postmaster: int | None
) -> dict[str, Any]:
    sessions = await open_http_sessions(engine.port, engine.access_token, args.sessions)
    try:
        ids = [str(s.session_id) for s in sessions]
        pid = engine.stack.broker_pid
        if args.warmup_seconds > 0:
            await wrk_closed_loop(
                engine.port, engine.access_token, ids, args.warmup_seconds, 0, pid
            )
        with Measure(engine, postmaster) as m:
            r = await wrk_closed_loop(engine.port, engine.access_token, ids, args.seconds, 0, pid)
    finally:
        await asyncio.gather(*(s.close(delete=True) for s in sessions))
        await settle(engine.stack.broker_pid, 0, settle_for=0.2)
    keys = ("requests", "errors", "rps", "p50_ms", "p90_ms", "p99_ms", "max_ms")
    return (
        m.figures(r["requests"])
        | {k: r[k] for k in keys}
        | {
            "loadgen_cpu_share": r["loadgen_cpu_share"],
            "first_bad": r["first_bad"],
        }
    )


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {"rounds": len(runs), "rps_rounds": [r["rps"] for r in runs]}
    for key, value in runs[0].items():
        values = [r[key] for r in runs if key in r]
        if key in ("requests", "errors", "grants"):
            merged[key] = sum(values)
        elif isinstance(value, int | float):
            merged[key] = statistics.median(values)
        elif key == "first_bad":
            merged[key] = next((v for v in values if v), "")
    return merged


def phases(args: argparse.Namespace) -> list[str]:
    out = [f"grants-{c}" for c in args.chains] if "grants" in args.only else []
    return out + (["mcp"] if "mcp" in args.only else [])


async def run(
    args: argparse.Namespace,
    engines: list[Engine],
    postmaster: int | None,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    rounds: dict[str, dict[str, list[dict[str, Any]]]] = {
        e.name: {p: [] for p in phases(args)} for e in engines
    }
    for n in range(args.rounds):
        order = engines[n % len(engines) :] + engines[: n % len(engines)]
        for phase in phases(args):
            for e in order:
                progress(f"round {n + 1}/{args.rounds}: {phase} on {e.name}")
                if phase == "mcp":
                    result = await mcp_phase(e, args, postmaster)
                else:
                    result = await grants_phase(e, int(phase.split("-")[1]), args, postmaster)
                rounds[e.name][phase].append(result)
    return {
        "rounds": rounds,
        "median": {
            name: {p: median_of(runs) for p, runs in per.items()} for name, per in rounds.items()
        },
    }


# --------------------------------------------------------------------------
# Report


def _f(value: float, digits: int = 0) -> str:
    return f"{value:,.{digits}f}"


def phase_label(phase: str, args: argparse.Namespace) -> str:
    if phase == "mcp":
        return f"/mcp tools/call, {args.sessions} sessions"
    chains = int(phase.split("-")[1])
    return f"refresh grants, {chains} chain{'s' if chains != 1 else ''}"


def report(
    info: dict[str, Any], results: dict[str, Any], engines: list[Engine], args: argparse.Namespace
) -> str:
    med = results["median"]
    pg = info.get("postgres")
    out = [
        f"Date: {info['date']}; machine: {info['nproc']} CPUs ({info['cpu']}), "
        f"{info['memory_mib']} MiB, Linux {info['kernel']}; Python {info['python']}; "
        f"fjmcp at {info['revision']}; "
        + (
            f"PostgreSQL {pg['version']} (throwaway cluster: "
            + ", ".join(f"{k} {v}" for k, v in pg["settings"].items())
            + ")."
            if pg
            else f"no PostgreSQL ({info.get('postgres_missing')})."
        ),
        load_and_runtime(info),
        "",
        f"{args.rounds} round(s), engines interleaved (order rotated each round); each phase "
        f"{args.warmup_seconds:g} s unrecorded then {args.seconds:g} s recorded, driven by wrk "
        "(one thread and connection per chain or session, one request in flight each). "
        + (
            "Every chain's grant is to one shared client. "
            if args.shared_client
            else "Each chain's grant is to a client of its own. "
        )
        + "Medians over rounds (errors: totals).",
        "",
    ]
    sqlite = "sqlite" if "sqlite" in med else None
    head = "| | " + " | ".join(e.label for e in engines)
    rule = "|---|" + "---:|" * len(engines)
    others = [e for e in engines if e.name != "sqlite"] if sqlite else []
    for e in others:
        head += f" | {e.label} ÷ SQLite"
        rule += "---:|"
    out += [head + " |", rule]
    for phase in phases(args):
        unit = "req/s" if phase == "mcp" else "grants/s"
        rows = [
            (f"{phase_label(phase, args)}: {unit}", "rps", 0),
            ("  p50 ms", "p50_ms", 2),
            ("  p99 ms", "p99_ms", 2),
        ]
        for label, key, digits in rows:
            cells = [_f(med[e.name][phase][key], digits) for e in engines]
            if sqlite:
                base = med[sqlite][phase][key]
                cells += [f"{med[e.name][phase][key] / base:.2f}" if base else "-" for e in others]
            out.append(f"| {label} | " + " | ".join(cells) + " |")
    out += [
        "",
        "Per phase (medians over rounds; CPU per request: the broker process with all its "
        "threads, SQLite included; PostgreSQL: the postmaster and its backends; wrk: the load "
        "generator, share of one CPU; store transactions and their mean time from call to "
        "result, pool queueing included, from the broker's /metrics):",
        "",
        "| engine | phase | requests | errors | rate, rounds | broker µs/req | PostgreSQL µs/req "
        "| broker CPU | PostgreSQL CPU | wrk CPU | machine busy | store txn/req | store ms/txn |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for e in engines:
        for phase in phases(args):
            r = med[e.name][phase]
            is_pg = e.name != "sqlite"
            pg_share = f"{r['postgres_cpu_share'] * 100:.0f}%" if is_pg else "-"
            out.append(
                f"| {e.label} | {phase_label(phase, args)} | {r['requests']:,} | {r['errors']} "
                f"| {' / '.join(_f(x) for x in r['rps_rounds'])} "
                f"| {_f(r['broker_cpu_us_per_request'])} "
                f"| {_f(r['postgres_cpu_us_per_request']) if is_pg else '-'} "
                f"| {r['broker_cpu_share'] * 100:.0f}% "
                f"| {pg_share} "
                f"| {r['loadgen_cpu_share'] * 100:.0f}% | {r['machine_busy_share'] * 100:.0f}% "
                f"| {r['store_transactions_per_request']:.3f} "
                f"| {r['store_ms_per_transaction']:.2f} |"
            )
    bad = [
        f"{e.name} {phase}: {med[e.name][phase]['first_bad']}"
        for e in engines
        for phase in phases(args)
        if med[e.name][phase]["errors"]
    ]
    if bad:
        out += ["", "First bad answers:", *(f"  {b}" for b in bad)]
    return "\n".join(out)


# --------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (engines interleaved)")
    parser.add_argument("--seconds", type=float, default=5.0, help="recorded seconds per phase")
    parser.add_argument(
        "--warmup-seconds", type=float, default=1.0, help="unrecorded load before each phase"
    )
    parser.add_argument(
        "--chains",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 8],
        help="concurrent refresh-token chains, comma-separated",
    )
    parser.add_argument(
        "--shared-client",
        action="store_true",
        help="every chain's grant to one client (as with a client metadata document every "
        "user shares), instead of a registered client per chain",
    )
    parser.add_argument("--sessions", type=int, default=16, help="MCP sessions on /mcp")
    parser.add_argument(
        "--only",
        type=lambda s: s.split(","),
        default=["grants", "mcp"],
        help="which phases, comma-separated (grants,mcp)",
    )
    parser.add_argument(
        "--postgres-commit",
        type=lambda s: s.split(","),
        default=["off", "on"],
        help="PostgreSQL variants by synchronous_commit, comma-separated (off: SQLite's "
        "durability in the broker; on: PostgreSQL's default); empty: SQLite only",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    variants = [v for v in args.postgres_commit if v]
    for v in variants:
        if v not in ("off", "on"):
            parser.error(f"--postgres-commit: {v!r} is neither off nor on")
    if not args.rounds > 0 or not args.seconds > 0 or not args.chains:
        parser.error("--rounds, --seconds and --chains must be positive")
    if max(args.chains) > 150:
        parser.error("at most 150 chains")
    if not args.only or set(args.only) - {"grants", "mcp"}:
        parser.error("--only: grants, mcp or both")

    wrk_path()
    info = machine_info()
    missing = postgres_unavailable() if variants else "--postgres-commit is empty"
    if missing is not None:
        if variants:
            print(f"bench_store: no PostgreSQL: {missing}; SQLite only", file=sys.stderr)
        info["postgres_missing"] = missing
        variants = []
    workdir = Path(tempfile.mkdtemp(prefix="fjmcp-bench-store-"))
    started = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - started:5.0f} s] {message} ...", file=sys.stderr, flush=True)

    # The cluster and the brokers are stopped on the way out of a SIGTERM too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    engines: list[Engine] = []
    postmaster: int | None = None
    try:
        databases = []
        if variants:
            progress("starting a throwaway PostgreSQL cluster")
            databases = postgres_databases(workdir, variants)
            info["postgres"] = postgres_info()
            postmaster = info["postgres"]["postmaster_pid"]
        specs: list[tuple[str, str, list[str]]] = [("sqlite", "SQLite", [])]
        for db in databases:
            name = "postgresql" if db.synchronous_commit == "off" else "postgresql-sync"
            label = f"PostgreSQL, synchronous_commit {db.synchronous_commit}"
            options = [f"--database={db.url}", f"--database-password-file={db.password_file}"]
            specs.append((name, label, options))
        for name, label, options in specs:
            progress(f"starting the stand-in and the broker on {name}")
            home = workdir / name
            home.mkdir()
            metrics_port = free_port()
            stack = Stack(
                home,
                None,
                "info",
                broker_options=[
                    *CAPS,
                    f"--trusted-proxies={HOST}",
                    f"--metrics-listen=tcp:{metrics_port}:interface={HOST}",
                    *options,
                ],
            )
            engine = Engine(name, label, stack, metrics_port)
            engines.append(engine)
            stack.prepare()
            stack.start()
        chains = 0
        if "grants" in args.only:
            chains = args.rounds * sum(args.chains) * (2 if args.warmup_seconds > 0 else 1)
        for e in engines:
            progress(f"{chains + 1} grants through the OAuth flow on {e.name}")
            flow = Flow(e.stack.broker_url)
            shared = flow.register("bench_store")
            e.access_token, _ = flow.grant(shared)
            for _ in range(chains):
                client = shared if args.shared_client else flow.register("bench_store")
                e.chains.append((client, flow.grant(client)[1]))
        results = asyncio.run(run(args, engines, postmaster, progress))
    finally:
        for e in engines:
            e.stack.stop()
        if args.keep:
            print(f"work directory kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    info["runtime_s"] = time.monotonic() - started
    info["loadavg_at_end"] = os.getloadavg()
    results["machine"] = info
    results["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    print(report(info, results, engines, args))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
