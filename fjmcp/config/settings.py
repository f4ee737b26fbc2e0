"""
The validated, immutable L{Config} the rest of the broker is built from, the
L{ConfigError} listing every mistake found, and the daemon's secret box
built from a configuration (L{secret_box}).
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Sequence
from pathlib import Path

import attrs
from twisted.logger import LogLevel

from fjmcp.secrets.crypto import SecretBox
from fjmcp.secrets.keyring import FollowingSecretBox

DB_FILENAME = "broker.db"
KEY_BYTES = 32

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """
    The configuration is unusable.  C{problems} holds one line per mistake.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@attrs.frozen
class Config:
    """
    A complete, validated broker configuration.  Secrets are kept out of
    C{repr} so a logged or printed config never leaks them.
    """

    listen: tuple[str, ...]
    public_url: str
    forgejo_url: str
    forgejo_client_id: str
    forgejo_client_secret: str = attrs.field(repr=False)
    forgejo_scopes: tuple[str, ...]
    forgejo_mcp: str
    data_dir: Path
    secret_key: bytes = attrs.field(repr=False)
    max_sessions: int
    max_sessions_per_user: int
    session_idle_timeout: float
    trusted_proxies: tuple[IPNetwork, ...]
    log_format: str
    log_level: LogLevel
    allowed_origins: tuple[str, ...] = ()
    max_request_body: int = 1024 * 1024
    # Endpoint of the separate /metrics listener; empty: no metrics.
    metrics_listen: str = ""
    access_token_lifetime: float = 3600.0
    refresh_token_lifetime: float = 30 * 86400.0
    refresh_grace_period: float = 60.0
    # Test-only: lets client ID metadata documents be fetched from loopback.
    cimd_allow_loopback: bool = False
    warnings: tuple[str, ...] = ()
    # Every key of the key file, current (= secret_key) first; the daemon
    # follows the file itself for rotations (fjmcp.secrets.keyring).
    secret_keys: tuple[bytes, ...] = attrs.field(default=(), repr=False)
    secret_key_file: Path | None = None
    # Every request ends: its deadline, how long an unused session lives,
    # and how many requests and streams one user may hold open.
    request_timeout: float = 300.0
    session_unused_timeout: float = 120.0
    max_requests_per_user: int = 64
    # Children running at once, and how long an idle session keeps its
    # child (0: until the session ends).
    max_children: int = 100
    max_children_per_user: int = 5
    session_hibernate_after: float = 120.0
    # Empty: SQLite at db_path.  Else a postgresql:// URL (no password in it)
    # and the password read from its file.
    database: str = ""
    database_password: str | None = attrs.field(default=None, repr=False)

    @property
    def db_path(self) -> Path:
        return self.data_dir / DB_FILENAME

    @property
    def mcp_url(self) -> str:
        return self.public_url + "/mcp"

    def secrets(self) -> list[str]:
        """
        Every configured secret, in the forms it could appear in a log line.
        """
        found = [self.forgejo_client_secret]
        if self.database_password:
            found.append(self.database_password)
        for key in self.secret_keys or (self.secret_key,):
            found += [
                base64.b64encode(key).decode(),
                base64.urlsafe_b64encode(key).decode(),
                key.hex(),
            ]
        return found


def secret_box(config: Config) -> SecretBox:
    """
    The daemon's box: following the key file when the configuration came
    from one, else fixed keys (tests that build a Config by hand).
    """
    keys = config.secret_keys or (config.secret_key,)
    if config.secret_key_file is not None:
        return FollowingSecretBox(config.secret_key_file, keys)
    return SecretBox(keys)
