"""
The option table: every option of C{twistd fjmcp} with its help text and
default, each also read from the environment variable C{FJMCP_<NAME>}, and
the other C{FJMCP_*} variables that are not options but are no mistake
either.
"""

from __future__ import annotations

import attrs

ENV_PREFIX = "FJMCP_"


@attrs.frozen
class Option:
    name: str
    doc: str
    default: str | None = None
    secret: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper().replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option(
        "public-url",
        "Public origin of the broker, e.g. https://mcp.example.org "
        "(http only on loopback). Required.",
    ),
    Option("forgejo-url", "Base URL of the Forgejo instance. Required."),
    Option(
        "forgejo-client-id",
        "Client ID of the broker's confidential OAuth2 application in Forgejo. Required.",
    ),
    Option(
        "forgejo-client-secret",
        "Client secret of that application (prefer --forgejo-client-secret-file).",
        secret=True,
    ),
    Option("forgejo-client-secret-file", "File holding the client secret."),
    Option(
        "forgejo-scopes",
        "Scopes the broker asks Forgejo for (space or comma separated).",
        "read:user write:repository write:issue read:organization read:notification",
    ),
    Option("forgejo-mcp", "Path or name (on PATH) of the forgejo-mcp binary.", "forgejo-mcp"),
    Option("data-dir", "Directory for broker.db and its -wal/-shm files.", "fjmcp-data"),
    Option(
        "database",
        "Empty: SQLite (broker.db in --data-dir). Or postgresql://USER@HOST:PORT/DBNAME, "
        "one database shared by several broker nodes (docs/deploy-cluster.md).",
        "",
    ),
    Option(
        "database-password-file",
        "File holding the PostgreSQL password (default: the systemd credential "
        "database-password in $CREDENTIALS_DIRECTORY, if there is one).",
    ),
    Option(
        "secret-key-file",
        "File with the base64 32-byte key that encrypts upstream tokens at rest "
        "(one key per line after a rotation, the first one current). Required.",
    ),
    Option("max-sessions", "Most MCP sessions at once, hibernating ones included.", "1000"),
    Option(
        "max-sessions-per-user",
        "Most MCP sessions per Forgejo user, hibernating ones included; at the cap the "
        "user's least recently used session ends.",
        "20",
    ),
    Option(
        "max-children",
        "Most forgejo-mcp processes running at once; at the cap the least recently "
        "used idle session hibernates to make room.",
        "100",
    ),
    Option(
        "max-children-per-user",
        "Most forgejo-mcp processes running at once for one Forgejo user (never more "
        "than --max-children); at the cap that user's least recently used idle session "
        "hibernates to make room.",
        "5",
    ),
    Option(
        "session-hibernate-after",
        "Stop an idle session's forgejo-mcp process after this long without activity; "
        "the session stays and its next request starts a new one (0: never).",
        "2m",
    ),
    Option(
        "session-idle-timeout",
        "End a session after this long without requests (900, 15m, 1h30m).",
        "30m",
    ),
    Option(
        "session-unused-timeout",
        "End a session that got no request after initialize after this long "
        "(clients that open sessions they never use).",
        "2m",
    ),
    Option(
        "request-timeout",
        "Deadline of every MCP request: the client then gets a JSON-RPC error, and a "
        "forgejo-mcp process that wrote nothing meanwhile is ended.",
        "300s",
    ),
    Option(
        "max-requests-per-user",
        "Most MCP requests in flight and GET streams one user may hold open at once "
        "(more get 429).",
        "64",
    ),
    Option(
        "trusted-proxies",
        "Proxy addresses/networks whose X-Forwarded-* headers are believed "
        "(space or comma separated).",
        "",
    ),
    Option(
        "allowed-origins",
        "Browser origins (besides the public URL's) allowed to call /mcp, e.g. "
        "http://localhost:6274 for MCP Inspector (space or comma separated).",
        "",
    ),
    Option("max-request-body", "Largest request body /mcp accepts, in bytes.", "1048576"),
    Option("access-token-lifetime", "Lifetime of the access tokens fjmcp issues.", "1h"),
    Option("refresh-token-lifetime", "Lifetime of the refresh tokens fjmcp issues.", "30d"),
    Option(
        "refresh-grace-period",
        "How long a just-rotated refresh token still works, to absorb clients that "
        "refresh concurrently; reuse after it revokes the whole grant.",
        "60s",
    ),
    Option(
        "metrics-listen",
        "Twisted endpoint of a separate listener serving only /metrics (Prometheus), "
        "e.g. tcp:9108:interface=127.0.0.1; empty: no metrics.",
        "",
    ),
    Option("log-format", "Log as 'text' or 'json' lines.", "text"),
    Option("log-level", "Lowest level logged: debug, info, warn, error.", "info"),
)

DEFAULT_LISTEN = "tcp:8080:interface=127.0.0.1"
# FJMCP_* variables other parts read: build info (fjmcp.buildinfo), Caddy's
# host name (deploy/caddy/Caddyfile), the demo's and the tests' own.
OTHER_VARIABLES = frozenset(
    {
        "FJMCP_BUILD_REVISION",
        "FJMCP_BUILD_DATE",
        "FJMCP_VERSION",
        "FJMCP_HOST",
        "FJMCP_DEMO_DIR",
        "FJMCP_TEST_FORGEJO_MCP",
    }
)
