"""
Building a L{Config}: flags, environment and defaults merged (a flag wins,
an empty variable counts as unset), every value parsed and checked, files
read (the client secret, the key file) and the binary and data directory
looked at, with every mistake collected into one L{ConfigError} so an
operator sees all of them in one start attempt.
"""

from __future__ import annotations

import difflib
import os
import shutil
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fjmcp.config.options import DEFAULT_LISTEN, ENV_PREFIX, OPTIONS, OTHER_VARIABLES
from fjmcp.config.settings import Config, ConfigError
from fjmcp.config.values import (
    parse_database_url,
    parse_duration,
    parse_duration_or_off,
    parse_forgejo_url,
    parse_log_format,
    parse_log_level,
    parse_networks,
    parse_origins,
    parse_positive_int,
    parse_public_url,
    parse_scopes,
    validate_listen,
)
from fjmcp.secrets.keyring import KeyFileError, parse_key_file


def _is_credential(path: str, environ: Mapping[str, str]) -> bool:
    """
    Whether C{path} is one of the credentials systemd handed this service.
    """
    directory = environ.get("CREDENTIALS_DIRECTORY", "")
    if not directory:
        return False
    return os.path.realpath(path).startswith(os.path.realpath(directory) + os.sep)


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
    max_children = parse("max-children", parse_positive_int)
    max_children_per_user = parse("max-children-per-user", parse_positive_int)
    hibernate_after = parse("session-hibernate-after", parse_duration_or_off)
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

    database = parse("database", parse_database_url) or ""
    database_password = read_database_password(
        raw["database-password-file"], origin["database-password-file"], environ, problems
    )
    if database_password is not None and not database:
        if raw["database-password-file"]:
            warnings.append(
                f"{origin['database-password-file']}: ignored, --database is empty (SQLite)"
            )
        database_password = None

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
        max_children=max_children,
        max_children_per_user=min(max_children, max_children_per_user),
        session_hibernate_after=hibernate_after,
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
        database=database,
        database_password=database_password,
        warnings=tuple(warnings),
    )


# The systemd credential (LoadCredential=database-password:FILE) read when
# no --database-password-file is given.
DATABASE_CREDENTIAL = "database-password"


def read_database_password(
    path: str | None, where: str, environ: Mapping[str, str], problems: list[str]
) -> str | None:
    """
    The PostgreSQL password from its file, or from the service's systemd
    credential; None when neither is there (libpq then tries its own ways:
    a ~/.pgpass, peer or certificate authentication).
    """
    if path is None:
        directory = environ.get("CREDENTIALS_DIRECTORY", "")
        if not directory or not os.path.isfile(os.path.join(directory, DATABASE_CREDENTIAL)):
            return None
        path = os.path.join(directory, DATABASE_CREDENTIAL)
        where = f"$CREDENTIALS_DIRECTORY/{DATABASE_CREDENTIAL}"
    try:
        text = Path(path).read_text().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{where}: cannot read {path}: {getattr(e, 'strerror', None) or e}")
        return None
    if not text:
        problems.append(f"{where}: {path} is empty")
        return None
    return text
