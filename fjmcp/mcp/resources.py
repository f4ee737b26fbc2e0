"""
What the broker's process may hold: file descriptors (how many it holds,
its limit, whether another child fits) and the tasks (threads) it and its
children need, from which the units' C{LimitNOFILE=} and C{TasksMax=} are
sized.

Every running child costs the broker three pipe descriptors, and every
open HTTP exchange one socket; when the process runs out, accept() and
spawnProcess fail for everybody (health checks and the token endpoint
included).  So new sessions are refused while the process is within a
reserve of its limit, which leaves room for requests that need no child.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable

import attrs
from twisted.logger import Logger

# stdin, stdout and stderr pipes, the broker's ends.
PER_CHILD = 3
# Kept free for everything that is not a new child: the database, the log,
# HTTP connections of users who already have their sessions, health checks.
RESERVE = 64

log = Logger()


def in_use() -> int:
    """
    How many descriptors this process holds now.
    """
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder))
        except OSError:
            continue
    return 0


def limit() -> int:
    """
    The soft limit on open descriptors (RLIMIT_NOFILE).
    """
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_limit() -> int:
    """
    Lift the soft limit to the hard one (the soft default of 1,024 is a
    relic of select(); the operator's hard limit, e.g. systemd's
    C{LimitNOFILE=}, is what was meant).  Returns the limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warn("cannot raise the open-files limit to {hard}: {e}", hard=hard, e=e)
    return limit()


def descriptors_needed(
    max_sessions: int, max_children: int, max_requests_per_user: int, max_children_per_user: int
) -> int:
    """
    Descriptors a broker at its caps may hold: every session's GET stream
    (a hibernating session keeps its stream), and for each running child its
    pipes and, at most, its share of its user's requests in flight; plus the
    reserve.
    """
    share = max(1, max_requests_per_user // max(1, max_children_per_user))
    return max_sessions + max_children * (PER_CHILD + share) + RESERVE


# forgejo-mcp (Go) runs 6 OS threads idle and starts more for blocking
# system calls; the broker itself has the reactor, Twisted's thread pool
# (10) and the database pool.
THREADS_PER_CHILD = 16
BROKER_THREADS = 32


def tasks_needed(max_children: int, max_children_per_user: int) -> int:
    """
    Tasks (threads of every process) a broker at its caps may run: at most
    C{max_children + max_children_per_user} children exist, those still
    stopping included (L{fjmcp.mcp.session_children.SessionChildren}).
    """
    return (max_children + max_children_per_user) * THREADS_PER_CHILD + BROKER_THREADS


@attrs.frozen
class Budget:
    """
    Whether the process can afford another child now.  The counting
    functions are parameters so tests can pretend to be short.
    """

    count: Callable[[], int] = in_use
    cap: Callable[[], int] = limit

    def room_for_child(self) -> bool:
        return self.count() + PER_CHILD + RESERVE <= self.cap()
