"""
Which addresses a client ID metadata document may be fetched from, and how a
host name becomes addresses.  The SSRF guard's rules live here: every
address a name resolves to must be public (L{blocked_address_reason}); the
fetcher then connects to those vetted addresses only (see
L{fjmcp.oauth.cimd.transport}).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]


def _networks(*rows: tuple[str, str]) -> tuple[tuple[Any, str], ...]:
    return tuple((ipaddress.ip_network(net), reason) for net, reason in rows)


# First match wins, so specific blocks come before the ranges holding them.
_IPV4_BLOCKED = _networks(
    ("169.254.169.254/32", "the cloud metadata address"),
    ("0.0.0.0/32", "the unspecified address"),
    ("0.0.0.0/8", "a this-network address"),
    ("10.0.0.0/8", "a private address"),
    ("100.64.0.0/10", "a shared (carrier-grade NAT) address"),
    ("127.0.0.0/8", "a loopback address"),
    ("169.254.0.0/16", "a link-local address"),
    ("172.16.0.0/12", "a private address"),
    ("192.0.0.0/24", "an IETF protocol assignment address"),
    ("192.0.2.0/24", "a documentation address"),
    ("192.88.99.0/24", "a 6to4 relay anycast address"),
    ("192.168.0.0/16", "a private address"),
    ("198.18.0.0/15", "a benchmarking address"),
    ("198.51.100.0/24", "a documentation address"),
    ("203.0.113.0/24", "a documentation address"),
    ("224.0.0.0/4", "a multicast address"),
    ("240.0.0.0/4", "a reserved address"),
)
_IPV6_BLOCKED = _networks(
    ("::/128", "the unspecified address"),
    ("::1/128", "the loopback address"),
    ("64:ff9b:1::/48", "a local-use NAT64 address"),
    ("100::/64", "a discard-only address"),
    ("2001::/23", "an IETF protocol assignment address"),
    ("2001:db8::/32", "a documentation address"),
    ("3fff::/20", "a documentation address"),
    ("5f00::/16", "a segment routing address"),
    ("fc00::/7", "a unique local address"),
    ("fe80::/10", "a link-local address"),
    ("fec0::/10", "a site-local address"),
    ("ff00::/8", "a multicast address"),
)
_IPV4_LOOPBACK = ipaddress.IPv4Network("127.0.0.0/8")
_IPV6_LOOPBACK = ipaddress.IPv6Address("::1")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")


def _ipv4_reason(address: ipaddress.IPv4Address, allow_loopback: bool) -> str | None:
    if allow_loopback and address in _IPV4_LOOPBACK:
        return None
    for network, reason in _IPV4_BLOCKED:
        if address in network:
            return reason
    if not address.is_global:  # whatever the standard library knows and we forgot
        return "a non-public address"
    return None


def blocked_address_reason(address: str | IPAddress, *, allow_loopback: bool = False) -> str | None:
    """
    Why a metadata document must not be fetched from C{address} (a phrase
    like C{"a private address"}), or L{None} when it is a public unicast
    address.  Private, loopback, link-local, shared, multicast, reserved,
    documentation, unspecified and cloud metadata addresses are refused, in
    IPv6 too; an address embedding an IPv4 address (IPv4-mapped, NAT64,
    6to4) is judged by that IPv4 address; IPv6 outside 2000::/3 is
    reserved.  C{allow_loopback} (tests only) admits 127.0.0.0/8 and ::1,
    nothing else.
    """
    if isinstance(address, str):
        try:
            address = ipaddress.ip_address(address)
        except ValueError:
            return "not an IP address"
    if isinstance(address, ipaddress.IPv4Address):
        return _ipv4_reason(address, allow_loopback)
    if address.scope_id:
        return "a scoped address"
    embedded = address.ipv4_mapped or address.sixtofour
    if embedded is None and address in _NAT64:
        embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if embedded is not None:
        reason = _ipv4_reason(embedded, allow_loopback)
        return None if reason is None else f"{reason} embedded in IPv6"
    if allow_loopback and address == _IPV6_LOOPBACK:
        return None
    for network, reason in _IPV6_BLOCKED:
        if address in network:
            return reason
    if address not in _GLOBAL_UNICAST:
        return "a reserved address"
    return None


def connect_address(address: IPAddress) -> IPAddress:
    """
    The address to dial: an IPv4-mapped IPv6 address is dialled as IPv4.
    """
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def system_resolver(reactor: object) -> Resolver:
    """
    The default resolver: C{getaddrinfo} in the reactor's thread pool,
    returning every address for the name, in the system's order.

    @param reactor: an L{IReactorThreads}.  Every real reactor is one, but
        Twisted's annotation of its global reactor leaves that interface
        out, so the reactor is adapted to it (which returns the reactor
        itself) when a name is resolved, as Twisted advises for the
        interfaces its annotation does not promise.
    """

    async def resolve(host: str, port: int) -> list[str]:
        threads = IReactorThreads(reactor)
        infos = await deferToThreadPool(
            threads,
            threads.getThreadPool(),
            socket.getaddrinfo,
            host,
            port,
            0,
            socket.SOCK_STREAM,
            socket.IPPROTO_TCP,
        )
        return [str(info[4][0]) for info in infos]

    return resolve
