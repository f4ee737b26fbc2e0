"""
Prometheus metrics: what fjmcp counts and the labels it allows.  Serving
them, and measuring HTTP requests, is L{fjmcp.http.metrics}'.

Enabled by C{--metrics-listen} (env C{FJMCP_METRICS_LISTEN}), a Twisted
endpoint description such as C{tcp:9108:interface=127.0.0.1} or
C{unix:/run/fjmcp/metrics.sock}; empty (the default) means no metrics
listener at all.  That listener answers only C{GET /metrics} (404 for any
other path) and writes no access log (a scrape every 15 s would drown the
log).  The public listener never serves C{/metrics}: Caddy forwards
everything there, and session counts and per-route traffic are nobody
else's business.

Who counts what:

 - event counters and histograms live here as module-level objects, and
   the module that sees the event increments them through the small
   functions below (one line at the spawn, exit, grant ... site);
 - live state (sessions, children) is read at scrape time by
   L{fjmcp.http.metrics.BrokerCollector}, so L{fjmcp.mcp.sessions} and L{fjmcp.mcp.children} keep no
   gauge of their own that could drift;
 - HTTP requests are measured at the twisted.web level by
   L{fjmcp.http.metrics.MeasuredRequest}, so every answer counts: Klein's 404 and 405, error
   pages, 401s from the gate, rate-limit 429s.  A request counts when it
   finishes or its connection drops (status C{aborted} if nothing was sent
   yet).  A session's GET event stream on C{/mcp} lasts as long as the
   client listens, minutes to hours: its length says nothing about how fast
   the broker answers, so it is timed in its own histogram
   (C{fjmcp_http_stream_duration_seconds}) and kept out of the latency one.
   A POST answered as an event stream stays in the latency histogram: it
   ends with the answer, so its length is the time the call took.

The registry is fjmcp's own, not prometheus_client's global C{REGISTRY}:
the event metrics are created unregistered, and L{fjmcp.http.metrics.broker_registry} builds
one registry per broker holding them, that broker's live gauges and the
process collector.  So importing fjmcp registers nothing globally, and
tests can run several brokers in one process, each with its own gauges,
without "duplicated timeseries" errors.  The counters themselves are
process-wide (they count what this process did), which is what a scrape of
one daemon means; tests compare two scrapes instead of absolute values.

Cardinality is bounded by construction, never by the traffic: routes are
the Klein app's route templates (fixed when the module is imported) or
C{other}, methods a fixed set or C{other}, statuses an HTTP code or
C{aborted}, session end reasons and grant outcomes fixed sets or C{other},
and store operation names (fixed strings in L{fjmcp.store}) are capped at
L{MAX_STORE_OPERATIONS} distinct values.
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

from prometheus_client import Counter, Histogram
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")

NAMESPACE = "fjmcp"
OTHER = "other"
MAX_STORE_OPERATIONS = 64

METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SESSION_END_REASONS = (
    "idle",  # no request for --session-idle-timeout
    "evicted",  # the user's least recently used session made room (per-user cap)
    "deleted",  # the client sent DELETE /mcp
    "revoked",  # the grant behind it was revoked
    "crashed",  # the child exited while its session was live
    "misbehaved",  # the child wrote something that is not JSON-RPC framing
    "initialize_failed",  # the child never answered initialize properly
    "unused",  # no request after initialize for --session-unused-timeout
    "unresponsive",  # the child wrote nothing while a request waited out its deadline
    "abandoned",  # the client went away before it learnt the session id
    "shutdown",  # the broker stopped
    OTHER,
)
CHILD_EXITS = ("clean", "error", "signal")
UPSTREAM_OUTCOMES = ("ok", "rejected", "unavailable")
GRANT_TYPES = ("authorization_code", "refresh_token")
GRANT_OUTCOMES = frozenset(
    {
        "invalid_request",
        "invalid_client",
        "invalid_grant",
        "unauthorized_client",
        "unsupported_grant_type",
        "invalid_scope",
        "invalid_target",
        "server_error",
    }
)
REUSE_KINDS = ("refresh_token", "authorization_code")

# Seconds.  Most answers take milliseconds; a tool call may take up to the
# 300 s a client waits for it.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# How long GET /mcp event streams stay open: seconds to hours.
STREAM_BUCKETS = (1, 10, 60, 300, 900, 1800, 3600, 4 * 3600, 12 * 3600)
# SQLite in WAL mode: sub-millisecond reads, up to the 5 s busy timeout.
STORE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


# --- the event metrics (process-wide, registered in each broker's registry)

CHILD_SPAWNS = Counter(
    "fjmcp_child_spawns",
    "forgejo-mcp children started (result=ok) or that could not be started (result=failed)",
    ["result"],
    registry=None,
)
CHILD_EXITED = Counter(
    "fjmcp_child_exits",
    "forgejo-mcp children that ended: clean (status 0), error (other status), "
    "signal (killed by a signal)",
    ["how"],
    registry=None,
)
SESSIONS_STARTED = Counter(
    "fjmcp_sessions_started", "MCP sessions started (one child each)", registry=None
)
SESSIONS_ENDED = Counter(
    "fjmcp_sessions_ended", "MCP sessions that ended, by why", ["reason"], registry=None
)
SESSIONS_HIBERNATED = Counter(
    "fjmcp_sessions_hibernated",
    "Times an idle MCP session's child was stopped, the session kept",
    registry=None,
)
SESSIONS_WOKEN = Counter(
    "fjmcp_sessions_woken",
    "Times a hibernating MCP session got a child again for a request",
    registry=None,
)
HTTP_REQUESTS = Counter(
    "fjmcp_http_requests",
    "HTTP requests answered on the public listener, counted when they finish",
    ["route", "method", "status"],
    registry=None,
)
HTTP_DURATION = Histogram(
    "fjmcp_http_request_duration_seconds",
    "Time from a request being read to its last byte sent (GET event streams excluded)",
    ["route", "status"],
    buckets=HTTP_BUCKETS,
    registry=None,
)
HTTP_STREAM_DURATION = Histogram(
    "fjmcp_http_stream_duration_seconds",
    "How long GET event streams (the session's stream on /mcp) stayed open",
    ["route"],
    buckets=STREAM_BUCKETS,
    registry=None,
)
TOKEN_REQUESTS = Counter(
    "fjmcp_token_requests",
    "Token endpoint requests by grant type and outcome (ok or the OAuth error code)",
    ["grant_type", "outcome"],
    registry=None,
)
TOKEN_REUSE = Counter(
    "fjmcp_token_reuse_detections",
    "Replayed authorization codes and refresh tokens reused after the grace period; "
    "each revoked its whole grant",
    ["kind"],
    registry=None,
)
UPSTREAM_REFRESHES = Counter(
    "fjmcp_upstream_refreshes",
    "Renewals of users' Forgejo tokens: ok, rejected (the user must log in again), "
    "unavailable (Forgejo unreachable or failing)",
    ["outcome"],
    registry=None,
)
STORE_DURATION = Histogram(
    "fjmcp_store_operation_duration_seconds",
    "Database transactions, from the call to the result (pool queueing included)",
    ["operation"],
    buckets=STORE_BUCKETS,
    registry=None,
)
STORE_ERRORS = Counter(
    "fjmcp_store_operation_errors",
    "Database transactions that failed",
    ["operation"],
    registry=None,
)

EVENT_METRICS = (
    CHILD_SPAWNS,
    CHILD_EXITED,
    SESSIONS_STARTED,
    SESSIONS_ENDED,
    SESSIONS_HIBERNATED,
    SESSIONS_WOKEN,
    HTTP_REQUESTS,
    HTTP_DURATION,
    HTTP_STREAM_DURATION,
    TOKEN_REQUESTS,
    TOKEN_REUSE,
    UPSTREAM_REFRESHES,
    STORE_DURATION,
    STORE_ERRORS,
)

# Known label values start at zero, so rate() and alerts see them from the
# first scrape rather than from the first event.
for _result in ("ok", "failed"):
    CHILD_SPAWNS.labels(_result)
for _how in CHILD_EXITS:
    CHILD_EXITED.labels(_how)
for _reason in SESSION_END_REASONS:
    SESSIONS_ENDED.labels(_reason)
for _outcome in UPSTREAM_OUTCOMES:
    UPSTREAM_REFRESHES.labels(_outcome)
for _kind in REUSE_KINDS:
    TOKEN_REUSE.labels(_kind)
for _grant in GRANT_TYPES:
    TOKEN_REQUESTS.labels(_grant, "ok")


# --- what the rest of fjmcp calls (one line at each event)


def child_spawned(ok: bool) -> None:
    CHILD_SPAWNS.labels("ok" if ok else "failed").inc()


def child_exited(code: int | None, signal: int | None) -> None:
    CHILD_EXITED.labels("signal" if signal is not None else "clean" if code == 0 else "error").inc()


def session_started() -> None:
    SESSIONS_STARTED.inc()


def session_hibernated() -> None:
    SESSIONS_HIBERNATED.inc()


def session_woken() -> None:
    SESSIONS_WOKEN.inc()


def session_ended(reason: str) -> None:
    SESSIONS_ENDED.labels(reason if reason in SESSION_END_REASONS else OTHER).inc()


def token_request(grant_type: str | None, status: int, body: Any) -> None:
    """
    One answer of the token endpoint: C{ok} for a 200, else its OAuth
    C{error} code.
    """
    grant = grant_type if grant_type in GRANT_TYPES else OTHER
    error = body.get("error") if isinstance(body, dict) else None
    outcome = "ok" if status == 200 else error if error in GRANT_OUTCOMES else OTHER
    TOKEN_REQUESTS.labels(grant, outcome).inc()


def token_reused(kind: str) -> None:
    """
    Safe from the database thread (the counters take a lock).
    """
    TOKEN_REUSE.labels(kind if kind in REUSE_KINDS else OTHER).inc()


def upstream_refresh(outcome: str) -> None:
    UPSTREAM_REFRESHES.labels(outcome if outcome in UPSTREAM_OUTCOMES else OTHER).inc()


_store_operations: set[str] = set()


def timed_store_operation(operation: str, d: Deferred[T]) -> Deferred[T]:
    """
    Observe how long the transaction behind C{d} takes, and whether it
    fails; C{d}'s result passes through untouched.
    """
    if operation not in _store_operations:
        if len(_store_operations) >= MAX_STORE_OPERATIONS:
            operation = OTHER
        else:
            _store_operations.add(operation)
    started = time.monotonic()

    def observe(result: Any) -> Any:
        STORE_DURATION.labels(operation).observe(time.monotonic() - started)
        if isinstance(result, Failure):
            # Counted here, and passed on to the caller.
            STORE_ERRORS.labels(operation).inc()
        return result

    d.addBoth(observe)
    return d
