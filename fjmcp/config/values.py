"""
Parsing single configuration values: each C{parse_*} turns one raw string
into a typed value or raises C{ValueError} with a message for the operator;
L{validate_listen} checks a Twisted endpoint description without opening it.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import parse_qs, urlsplit

from twisted.logger import LogLevel

from fjmcp.config.settings import IPNetwork
from fjmcp.secrets.keyring import parse_key_file


def parse_duration(text: str) -> float:
    """
    Parse C{"90"}, C{"90s"}, C{"15m"}, C{"2h"}, C{"1h30m"} or C{"30d"} into seconds.
    """
    text = text.strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    else:
        parts = re.findall(r"(\d+)([dhms])", text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"not a duration (use e.g. 900, 15m, 1h30m, 30d): {text!r}")
        units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
        seconds = float(sum(int(n) * units[u] for n, u in parts))
    if seconds <= 0:
        raise ValueError(f"must be longer than zero: {text!r}")
    return seconds


def parse_duration_or_off(text: str) -> float:
    """
    A duration, or C{0}/C{off} for never.
    """
    if text.strip().lower() in ("0", "off", "never"):
        return 0.0
    return parse_duration(text)


def parse_positive_int(text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise ValueError(f"must be at least 1: {text!r}")
    return value


def _is_loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_public_url(text: str) -> str:
    """
    The broker's public origin: https, or http only on a loopback host, and
    no path, because the issuer and every endpoint hang off the bare origin.
    """
    parts = urlsplit(text.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {text!r}")
    if parts.scheme == "http" and not _is_loopback_host(parts.hostname):
        raise ValueError(f"must use https (plain http is only allowed on loopback): {text!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(
            f"must be a bare origin such as https://mcp.example.org, "
            f"without path, query or fragment: {text!r}"
        )
    if parts.username or parts.password:
        raise ValueError("must not contain credentials")
    return f"{parts.scheme}://{parts.netloc}"


def parse_forgejo_url(text: str) -> str:
    parts = urlsplit(text.strip())
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {text!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"must not carry a query, fragment or credentials: {text!r}")
    return text.strip().rstrip("/")


def parse_origins(text: str) -> tuple[str, ...]:
    origins = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        parts = urlsplit(item)
        if (
            parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path not in ("", "/")
        ):
            raise ValueError(f"not an origin such as https://app.example: {item!r}")
        origins.append(f"{parts.scheme}://{parts.netloc}".lower())
    return tuple(origins)


def parse_scopes(text: str) -> tuple[str, ...]:
    scopes = tuple(s for s in re.split(r"[\s,]+", text.strip()) if s)
    if not scopes:
        raise ValueError("no scopes given")
    return scopes


def parse_networks(text: str) -> tuple[IPNetwork, ...]:
    networks = []
    for item in re.split(r"[\s,]+", text.strip()):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"not an IP address or CIDR network: {item!r}") from None
    return tuple(networks)


def parse_log_level(text: str) -> LogLevel:
    name = text.strip().lower()
    if name == "warning":
        name = "warn"
    try:
        return LogLevel.levelWithName(name)
    except Exception:
        raise ValueError(
            f"unknown log level {text!r} (use debug, info, warn, error or critical)"
        ) from None


def parse_log_format(text: str) -> str:
    value = text.strip().lower()
    if value not in ("text", "json"):
        raise ValueError(f"unknown log format {text!r} (use text or json)")
    return value


def parse_database_url(text: str) -> str:
    """
    C{--database}: empty for SQLite in the data directory, or a
    C{postgresql://USER@HOST[:PORT]/DBNAME} URL without a password (query
    parameters such as C{sslmode} pass on to libpq).
    """
    text = text.strip()
    if not text:
        return ""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises on a port that is no number
    except ValueError as e:
        raise ValueError(f"not a postgresql:// URL ({e})") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ValueError(
            "must be empty (SQLite in --data-dir) or postgresql://USER@HOST:PORT/DBNAME,"
            f" not {parts.scheme + ':' if parts.scheme else 'a URL without a scheme'}"
        )
    if parts.password is not None or "password" in parse_qs(parts.query):
        # Not even echoed back: the message may end up in a log.
        raise ValueError(
            "has a password in it: put the password in --database-password-file (or the"
            " systemd credential database-password) instead, so it shows in no process"
            " list or log"
        )
    missing = [
        what
        for what, value in (
            ("user", parts.username),
            ("host", parts.hostname),
            ("database", parts.path.strip("/")),
        )
        if not value
    ]
    if missing:
        raise ValueError(
            f"{text} names no {' and no '.join(missing)} (postgresql://USER@HOST:PORT/DBNAME)"
        )
    return text


def parse_secret_key(data: bytes) -> bytes:
    """
    The current key of a key file: one or more lines of 32 random bytes,
    base64-encoded (standard or URL-safe alphabet), the first line current
    (see L{fjmcp.secrets.keyring} for the format and for rotation).
    """
    return parse_key_file(data)[0]


def validate_listen(description: str) -> None:
    from twisted.internet import endpoints, reactor

    try:
        endpoint = endpoints.serverFromString(reactor, description)
    except (IndexError, KeyError) as e:
        if description.startswith("systemd:"):
            raise ValueError(
                f"{description!r}: systemd passed no such socket (LISTEN_FDS/LISTEN_FDNAMES); "
                "start fjmcp through its .socket unit"
            ) from None
        raise ValueError(f"not a usable endpoint description {description!r}: {e}") from None
    except Exception as e:
        raise ValueError(f"not a usable endpoint description {description!r}: {e}") from None
    # Twisted takes any integer as a tcp:, tcp6: or ssl: port and only fails
    # when the reactor binds it (OverflowError), too late to be reported
    # with the other mistakes.  Those endpoints keep the port in _port.
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise ValueError(f"{description!r}: port {port} is outside 0..65535")
