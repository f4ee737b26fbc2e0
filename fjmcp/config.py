"""
Configuration: the C{twistd fjmcp} command line, its environment fallbacks,
and the validated, immutable L{Config} the rest of the broker is built from.

Every option is a flag and an environment variable C{FJMCP_<NAME>}; a flag
wins, and an empty variable counts as unset, so one daemon runs the same from
a systemd C{EnvironmentFile}, a container's environment or a shell.  Raw
strings are turned into typed values here and nowhere else, and every mistake
is collected so an operator sees all of them in one start attempt.
"""

from __future__ import annotations

import base64
import difflib
import ipaddress
import os
import re
import shutil
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.logger import LogLevel
from twisted.python import usage

from fjmcp.secrets.crypto import SecretBox
from fjmcp.secrets.keyring import FollowingSecretBox, KeyFileError, parse_key_file

ENV_PREFIX = "FJMCP_"
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
        for key in self.secret_keys or (self.secret_key,):
            found += [
                base64.b64encode(key).decode(),
                base64.urlsafe_b64encode(key).decode(),
                key.hex(),
            ]
        return found


# --- parsing of single values; each raises ValueError with an operator-facing message


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


def parse_secret_key(data: bytes) -> bytes:
    """
    The current key of a key file: one or more lines of 32 random bytes,
    base64-encoded (standard or URL-safe alphabet), the first line current
    (see L{fjmcp.secrets.keyring} for the format and for rotation).
    """
    return parse_key_file(data)[0]


def _is_credential(path: str, environ: Mapping[str, str]) -> bool:
    """
    Whether C{path} is one of the credentials systemd handed this service.
    """
    directory = environ.get("CREDENTIALS_DIRECTORY", "")
    if not directory:
        return False
    return os.path.realpath(path).startswith(os.path.realpath(directory) + os.sep)


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


# --- the option table


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
        "secret-key-file",
        "File with the base64 32-byte key that encrypts upstream tokens at rest "
        "(one key per line after a rotation, the first one current). Required.",
    ),
    Option("max-sessions", "Most MCP sessions (child processes) at once.", "100"),
    Option("max-sessions-per-user", "Most MCP sessions per Forgejo user.", "5"),
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


def _from_environment(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name, "")
    return value if value.strip() else None


def build_config(
    flags: Mapping[str, Any],
    listen_flags: Sequence[str],
    environ: Mapping[str, str],
    which: Callable[[str], str | None] = shutil.which,
) -> Config:
    """
    Merge flags, environment and defaults, then validate everything.

    @raise ConfigError: listing every problem found, one line each.
    """
    problems: list[str] = []
    warnings: list[str] = []
    raw: dict[str, str | None] = {}
    origin: dict[str, str] = {}
    for opt in OPTIONS:
        value = flags.get(opt.name)
        where = f"--{opt.name}"
        if value is None:
            value = _from_environment(environ, opt.env)
            where = opt.env
        if value is None:
            value = opt.default
            where = f"--{opt.name}"
        raw[opt.name] = value
        origin[opt.name] = where

    def parse(name: str, parser: Callable[[str], Any], required: bool = False) -> Any:
        text = raw[name]
        if text is None:
            if required:
                problems.append(
                    f"{origin[name]}: required (or set {ENV_PREFIX}"
                    f"{name.upper().replace('-', '_')})"
                )
            return None
        try:
            return parser(text)
        except ValueError as e:
            problems.append(f"{origin[name]}: {e}")
            return None

    listen = tuple(listen_flags)
    listen_origin = "--listen"
    if not listen:
        from_env = _from_environment(environ, ENV_PREFIX + "LISTEN")
        if from_env is not None:
            listen = tuple(from_env.split())
            listen_origin = ENV_PREFIX + "LISTEN"
        else:
            listen = (DEFAULT_LISTEN,)
    for description in listen:
        try:
            validate_listen(description)
        except ValueError as e:
            problems.append(f"{listen_origin}: {e}")

    metrics_listen = (raw["metrics-listen"] or "").strip()
    if metrics_listen:
        try:
            validate_listen(metrics_listen)
        except ValueError as e:
            problems.append(f"{origin['metrics-listen']}: {e}")
        if metrics_listen in listen:
            problems.append(
                f"{origin['metrics-listen']}: {metrics_listen!r} is also a --listen endpoint; "
                "/metrics needs a listener of its own, never the public one"
            )

    public_url = parse("public-url", parse_public_url, required=True)
    forgejo_url = parse("forgejo-url", parse_forgejo_url, required=True)
    client_id = parse("forgejo-client-id", str.strip, required=True)
    scopes = parse("forgejo-scopes", parse_scopes)
    max_sessions = parse("max-sessions", parse_positive_int)
    max_per_user = parse("max-sessions-per-user", parse_positive_int)
    idle = parse("session-idle-timeout", parse_duration)
    unused = parse("session-unused-timeout", parse_duration)
    request_timeout = parse("request-timeout", parse_duration)
    max_requests = parse("max-requests-per-user", parse_positive_int)
    proxies = parse("trusted-proxies", parse_networks)
    origins = parse("allowed-origins", parse_origins)
    max_body = parse("max-request-body", parse_positive_int)
    access_lifetime = parse("access-token-lifetime", parse_duration)
    refresh_lifetime = parse("refresh-token-lifetime", parse_duration)
    grace = parse("refresh-grace-period", parse_duration)
    log_format = parse("log-format", parse_log_format)
    log_level = parse("log-level", parse_log_level)

    client_secret = raw["forgejo-client-secret"]
    secret_file = raw["forgejo-client-secret-file"]
    if client_secret is not None and secret_file is not None:
        problems.append("--forgejo-client-secret and --forgejo-client-secret-file: give only one")
    elif secret_file is not None:
        try:
            client_secret = Path(secret_file).read_text().strip()
        except OSError as e:
            problems.append(
                f"{origin['forgejo-client-secret-file']}: cannot read {secret_file}: {e.strerror}"
            )
        else:
            if not client_secret:
                problems.append(f"{origin['forgejo-client-secret-file']}: {secret_file} is empty")
    elif client_secret is None:
        problems.append(
            "--forgejo-client-secret-file (or --forgejo-client-secret): required "
            "(or set FJMCP_FORGEJO_CLIENT_SECRET_FILE)"
        )

    key: bytes | None = None
    keys: tuple[bytes, ...] = ()
    key_file = raw["secret-key-file"]
    if key_file is None:
        problems.append(
            "--secret-key-file: required (or set FJMCP_SECRET_KEY_FILE); see README "
            "for how to create one"
        )
    else:
        try:
            data = Path(key_file).read_bytes()
            mode = os.stat(key_file).st_mode
        except OSError as e:
            problems.append(f"{origin['secret-key-file']}: cannot read {key_file}: {e.strerror}")
        else:
            try:
                keys = parse_key_file(data)
            except KeyFileError as e:
                problems += [f"{origin['secret-key-file']}: {key_file} {p}" for p in e.problems]
            else:
                key = keys[0]
            # systemd's LoadCredential= makes the copy 0440 under
            # $CREDENTIALS_DIRECTORY, readable by the service alone; the
            # operator cannot change that, so it is no reason to warn.
            if mode & (stat.S_IRWXG | stat.S_IRWXO) and not _is_credential(key_file, environ):
                warnings.append(
                    f"secret key file {key_file} is readable by group or others; chmod 600 it"
                )

    binary = raw["forgejo-mcp"] or ""
    found = which(binary) if os.sep not in binary else binary
    if not found or not os.path.isfile(found):
        problems.append(
            f"{origin['forgejo-mcp']}: forgejo-mcp binary {binary!r} not found "
            "(build it with `make forgejo-mcp` or give its path)"
        )
    elif not os.access(found, os.X_OK):
        problems.append(f"{origin['forgejo-mcp']}: {found} is not executable")
    else:
        binary = os.path.abspath(found)

    data_dir = Path(raw["data-dir"] or "")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        problems.append(f"{origin['data-dir']}: cannot create {data_dir}: {e.strerror}")
    else:
        if not os.access(data_dir, os.W_OK | os.X_OK):
            problems.append(f"{origin['data-dir']}: {data_dir} is not writable")

    # A misspelt variable would otherwise be ignored without a word, and the
    # default it meant to replace silently applies.
    known = {opt.env for opt in OPTIONS} | {ENV_PREFIX + "LISTEN"} | OTHER_VARIABLES
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known:
            near = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {near[0]}?)" if near else ""
            warnings.append(f"environment variable {name} is not an fjmcp setting{hint}")

    if problems:
        raise ConfigError(problems)
    return Config(
        listen=listen,
        public_url=public_url,
        forgejo_url=forgejo_url,
        forgejo_client_id=client_id,
        forgejo_client_secret=client_secret or "",
        forgejo_scopes=scopes,
        forgejo_mcp=binary,
        data_dir=data_dir.resolve(),
        secret_key=key or b"",
        secret_keys=keys,
        # Not resolved: a symlink the operator re-points is followed too.
        secret_key_file=Path(key_file).absolute() if key_file else None,
        max_sessions=max_sessions,
        max_sessions_per_user=max_per_user,
        session_idle_timeout=idle,
        session_unused_timeout=unused,
        request_timeout=request_timeout,
        max_requests_per_user=max_requests,
        trusted_proxies=proxies,
        log_format=log_format,
        log_level=log_level,
        allowed_origins=origins,
        max_request_body=max_body,
        metrics_listen=metrics_listen,
        access_token_lifetime=access_lifetime,
        refresh_token_lifetime=refresh_lifetime,
        refresh_grace_period=grace,
        warnings=tuple(warnings),
    )


class Options(usage.Options):
    """
    C{twistd fjmcp} options.  Each option also reads C{FJMCP_<NAME>} from the
    environment when the flag is not given; an empty variable counts as unset.
    """

    synopsis = "[options]"
    optParameters = [
        [
            o.name,
            None,
            None,
            f"{o.doc} [env {o.env}"
            + (f", default: {o.default!r}" if o.default is not None else "")
            + "]",
        ]
        for o in OPTIONS
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self.environ: Mapping[str, str] = os.environ
        self.config: Config | None = None
        # twistd wants a clean exit; tests want the ConfigError itself.
        self.exit_on_error = True

    def opt_listen(self, description: str) -> None:
        """
        Twisted endpoint to listen on; repeatable [env FJMCP_LISTEN, space separated, default: tcp:8080:interface=127.0.0.1]
        """  # noqa: E501
        self["listen"].append(description)

    def opt_version(self) -> None:
        """
        Print the version, git revision and build date, and exit.
        """
        from fjmcp.buildinfo import describe

        print(describe())
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self.config = build_config(
                {o.name: self[o.name] for o in OPTIONS}, self["listen"], self.environ
            )
        except ConfigError as e:
            if not self.exit_on_error:
                raise
            # twistd would print the whole usage text and a traceback-like
            # line; an operator wants each mistake on its own line and a
            # distinct exit status (2, as for any usage error).
            for problem in e.problems:
                sys.stderr.write(f"fjmcp: configuration error: {problem}\n")
            sys.stderr.flush()
            raise SystemExit(2) from None


def secret_box(config: Config) -> SecretBox:
    """
    The daemon's box: following the key file when the configuration came
    from one, else fixed keys (tests that build a Config by hand).
    """
    keys = config.secret_keys or (config.secret_key,)
    if config.secret_key_file is not None:
        return FollowingSecretBox(config.secret_key_file, keys)
    return SecretBox(keys)
