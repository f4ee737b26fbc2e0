"""
Who is asking, and how often: the client address behind trusted proxies, and
per-address token buckets for the endpoints anyone can call without a token
(registration, authorize, token).

In memory on purpose: limits protect this process; they reset on restart.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Sequence

import attrs
from twisted.internet.interfaces import IReactorTime

from fjmcp.config import IPNetwork

MAX_TRACKED = 10_000


@attrs.frozen
class Limit:
    """
    C{burst} requests at once, refilled at C{per_minute}.
    """

    per_minute: float
    burst: int


# Generous for people and real clients (Claude re-registers and re-authorizes
# often), tight enough that a loop or a scanner is slowed down at once.
DEFAULT_LIMITS = {
    "register": Limit(per_minute=20, burst=20),
    "authorize": Limit(per_minute=60, burst=30),
    "token": Limit(per_minute=120, burst=60),
    # Revocation checks a client's credentials like the token endpoint.
    "revoke": Limit(per_minute=120, burst=60),
}


def _in(address: str, networks: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IPNetwork]
) -> str:
    """
    The address of whoever is really asking.  C{peer} is the socket's peer
    (None for a UNIX socket, which only local processes such as the reverse
    proxy can reach, so it is trusted).  X-Forwarded-For is read right to
    left and only while each hop is a trusted proxy; the first untrusted
    address is the client.  A peer we do not trust gets no say at all.
    """
    if peer is not None and (not trusted or not _in(peer, trusted)):
        return peer
    hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            # A forged or garbled entry: stop trusting the chain here.
            return peer or "unix"
        if not _in(hop, trusted):
            return hop
    return hops[0] if hops else (peer or "unix")


class RateLimiter:
    """
    Token buckets keyed by (endpoint, address), oldest forgotten first.
    """

    def __init__(self, clock: IReactorTime, limits: dict[str, Limit] | None = None) -> None:
        self._clock = clock
        self._limits = limits or DEFAULT_LIMITS
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()

    def check(self, endpoint: str, address: str) -> float:
        """
        Take one request from the bucket: 0.0 if allowed, else the seconds
        until the next request would be.
        """
        limit = self._limits[endpoint]
        now = self._clock.seconds()
        rate = limit.per_minute / 60.0
        key = (endpoint, address)
        tokens, last = self._buckets.pop(key, (float(limit.burst), now))
        tokens = min(float(limit.burst), tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            wait = 0.0
        else:
            self._buckets[key] = (tokens, now)
            wait = (1.0 - tokens) / rate
        while len(self._buckets) > MAX_TRACKED:
            self._buckets.popitem(last=False)
        return wait
