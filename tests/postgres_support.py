"""
A throwaway PostgreSQL cluster for the tests that need a real database: one
cluster per Python process (so each worker of trial -j gets its own, on its
own loopback port), made on first use in a fresh temporary directory and
stopped and removed when the process exits.  It listens on 127.0.0.1 only,
with durability off (fsync, synchronous_commit, full_page_writes) for speed.
Each test gets a database and a login role of its own from
L{postgres_database}, dropped when the test ends.

PostgreSQL refuses to run as root; under root the cluster's programs run as
the C{postgres} system user (or C{nobody}) through runuser or setpriv.
"""

from __future__ import annotations

import atexit
import os
import pwd
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

if TYPE_CHECKING:
    import psycopg

DEBIAN_VERSIONS = Path("/usr/lib/postgresql")
PROGRAMS = ("initdb", "pg_ctl", "postgres")
SUPERUSER = "fjmcp_super"
HOST = "127.0.0.1"
START_TIMEOUT = 30.0
# Users to run the cluster as when this process is root, in order of preference.
UNPRIVILEGED_USERS = ("postgres", "nobody")
SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "300",
    "shared_buffers": "32MB",
    # Nothing replicates from a test cluster: the least WAL will do.
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "logging_collector": "off",
}


def _program_dir() -> Path | None:
    """
    The directory of the newest PostgreSQL server programs: Debian's
    /usr/lib/postgresql/VERSION/bin, else C{pg_config --bindir}, else that of
    the initdb on PATH.
    """
    candidates: list[Path] = []
    if DEBIAN_VERSIONS.is_dir():
        versions = [p for p in DEBIAN_VERSIONS.iterdir() if re.fullmatch(r"\d+(\.\d+)?", p.name)]
        versions.sort(key=lambda p: tuple(int(n) for n in p.name.split(".")), reverse=True)
        candidates += [p / "bin" for p in versions]
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        try:
            bindir = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
        else:
            if bindir:
                candidates.append(Path(bindir))
    initdb = shutil.which("initdb")
    if initdb is not None:
        candidates.append(Path(initdb).resolve().parent)
    for directory in candidates:
        if all(os.access(directory / name, os.X_OK) for name in PROGRAMS):
            return directory
    return None


def _run_as() -> tuple[list[str], int, int] | None:
    """
    The command prefix that runs a program as the cluster's user, and that
    user's uid and gid; None if this process is root and cannot switch.
    """
    if os.geteuid() != 0:
        return [], os.geteuid(), os.getegid()
    for name in UNPRIVILEGED_USERS:
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        if shutil.which("runuser"):
            return ["runuser", "-u", name, "--"], user.pw_uid, user.pw_gid
        if shutil.which("setpriv"):
            prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}"]
            return [*prefix, "--init-groups", "--"], user.pw_uid, user.pw_gid
        return None
    return None


def postgres_missing() -> str | None:
    """
    Why a PostgreSQL cluster cannot run here, or None; under CI=true its
    absence fails.
    """
    reason = None
    try:
        import psycopg  # noqa: F401
    except ImportError as e:
        reason = f"psycopg cannot be imported ({e}; pip install 'psycopg[binary]')"
    if reason is None and _program_dir() is None:
        reason = "PostgreSQL is not installed (apt-get install postgresql)"
    if reason is None and _run_as() is None:
        reason = (
            "running as root, and there is no postgres or nobody user to run PostgreSQL as"
            " through runuser or setpriv"
        )
    if reason is not None and os.environ.get("CI") == "true":
        raise AssertionError(f"{reason}; CI must run these tests")
    return reason


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def _environment() -> dict[str, str]:
    # The PG* variables of whoever runs the tests must not steer the cluster.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    return env


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(no server log: {e.strerror})"
    return "\n".join(text.splitlines()[-lines:])


class ClusterError(Exception):
    """
    The cluster could not be made or started.
    """


@attrs.define
class Cluster:
    """
    A running cluster: its directory (data, socket and log), its loopback
    port and its superuser's password.
    """

    directory: Path
    programs: Path
    prefix: list[str]
    port: int
    password: str = attrs.field(repr=False)
    pid: int = attrs.field(factory=os.getpid)

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    def run(self, program: str, *args: str, timeout: float = START_TIMEOUT + 10) -> None:
        """
        Run one of the cluster's programs as the cluster's user; a failure
        raises L{ClusterError} with its output and the server log's tail.
        """
        command = [*self.prefix, str(self.programs / program), *args]
        try:
            done = subprocess.run(
                command,
                cwd=self.directory,
                env=_environment(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            raise ClusterError(
                f"{program} did not finish in {timeout} s\n"
                f"server log ({self.log}):\n{_tail(self.log)}"
            ) from e
        if done.returncode != 0:
            raise ClusterError(
                f"{program} failed ({done.returncode}): {done.stdout}{done.stderr}\n"
                f"server log ({self.log}):\n{_tail(self.log)}"
            )

    def conninfo(self, dbname: str = "postgres") -> str:
        from psycopg.conninfo import make_conninfo

        return make_conninfo(
            host=HOST,
            port=self.port,
            dbname=dbname,
            user=SUPERUSER,
            password=self.password,
            sslmode="disable",
            connect_timeout=10,
        )

    def stop(self) -> None:
        """
        Stop the server at once (no checkpoint: nothing here is kept) and
        remove the cluster's directory.  Only the process that made the
        cluster does so, not a child forked from it.
        """
        if os.getpid() != self.pid:
            return
        try:
            if (self.data / "postmaster.pid").exists():
                self.run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w")
        except ClusterError:
            pass
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def _start(directory: Path) -> Cluster:
    programs = _program_dir()
    run_as = _run_as()
    if programs is None or run_as is None:
        raise ClusterError(postgres_missing() or "PostgreSQL cannot run here")
    prefix, uid, gid = run_as
    if os.geteuid() == 0:
        # mkdtemp made it 0700 for root; the cluster's user owns it instead.
        os.chown(directory, uid, gid)
    cluster = Cluster(directory, programs, prefix, port=0, password=secrets.token_urlsafe(24))
    pwfile = directory / "superuser-password"
    fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(cluster.password + "\n")
    os.chown(pwfile, uid, gid)
    try:
        cluster.run(
            "initdb",
            "--pgdata",
            str(cluster.data),
            "--username",
            SUPERUSER,
            "--pwfile",
            str(pwfile),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        )
    finally:
        pwfile.unlink()
    with (cluster.data / "postgresql.conf").open("a") as conf:
        conf.write("\n# tests/postgres_support.py\n")
        for name, value in SETTINGS.items():
            conf.write(f"{name} = {value}\n")
        conf.write(f"unix_socket_directories = '{directory}'\n")
    try:
        _run_server(cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _run_server(cluster: Cluster) -> None:
    # The port is free when picked but another process may take it before
    # the server binds it: try a few.
    for attempt in range(5):
        cluster.port = free_port()
        try:
            cluster.run(
                "pg_ctl",
                "start",
                "-D",
                str(cluster.data),
                "-l",
                str(cluster.log),
                "-w",
                "-t",
                str(int(START_TIMEOUT)),
                "-o",
                f"-p {cluster.port}",
            )
        except ClusterError:
            if attempt < 4 and "could not bind" in _tail(cluster.log):
                continue
            raise
        break
    _wait_for_connections(cluster)


def _wait_for_connections(cluster: Cluster) -> None:
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            psycopg.connect(cluster.conninfo(), autocommit=True).close()
        except psycopg.OperationalError as e:
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"PostgreSQL on {HOST}:{cluster.port} accepts no connections after"
                    f" {START_TIMEOUT} s ({e})\nserver log ({cluster.log}):\n{_tail(cluster.log)}"
                ) from e
            time.sleep(0.05)
        else:
            return


_lock = threading.Lock()
_cluster: Cluster | None = None
_failure: str | None = None


def _the_cluster() -> Cluster:
    """
    This process's cluster, made and started on first use.  A cluster that
    failed to start is not tried again: every later test fails at once with
    the first failure's message.
    """
    global _cluster, _failure
    with _lock:
        if _cluster is not None and _cluster.pid == os.getpid():
            return _cluster
        if _failure is not None:
            raise ClusterError(_failure)
        directory = Path(tempfile.mkdtemp(prefix="fjmcp-postgres-")).resolve()
        try:
            cluster = _start(directory)
        except BaseException as e:
            _failure = f"the test PostgreSQL cluster did not start: {e}"
            shutil.rmtree(directory, ignore_errors=True)
            raise
        atexit.register(cluster.stop)
        _cluster = cluster
        return cluster


def cluster_port() -> int:
    """
    The loopback port of this process's cluster (starting it if need be).
    """
    return _the_cluster().port


def superuser_connect(dbname: str = "postgres") -> psycopg.Connection[Any]:
    """
    A new autocommit connection to C{dbname} as the cluster's superuser,
    over TCP to 127.0.0.1; the caller closes it.
    """
    import psycopg

    return psycopg.connect(_the_cluster().conninfo(dbname), autocommit=True)


@attrs.frozen
class PostgresDatabase:
    """
    A test's own database and the login role that owns it.  C{url} is what
    the broker's C{--database} takes (no password in it); C{password_file}
    holds the password, mode 0600; C{conninfo} has everything, password
    included, for tests that connect themselves.
    """

    url: str
    name: str
    role: str
    port: int
    password: str = attrs.field(repr=False)
    password_file: Path
    conninfo: str = attrs.field(repr=False)

    def connect(self) -> psycopg.Connection[Any]:
        """
        A new autocommit connection as C{role}; the caller closes it.
        """
        import psycopg

        return psycopg.connect(self.conninfo, autocommit=True)


def postgres_database(test: SynchronousTestCase) -> PostgresDatabase:
    """
    A fresh database and a fresh login role owning it, with a random
    password, in this process's cluster; both are dropped when C{test} ends,
    its connections cut first.  Only its role (and the superuser) may
    connect to it.
    """
    from psycopg import sql
    from psycopg.conninfo import make_conninfo

    cluster = _the_cluster()
    name = f"t_{secrets.token_hex(8)}"
    password = secrets.token_urlsafe(24)
    ident = sql.Identifier(name)
    with superuser_connect() as admin:
        admin.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(ident, sql.Literal(password))
        )
        try:
            admin.execute(
                sql.SQL("CREATE DATABASE {} OWNER {} TEMPLATE template0 ENCODING 'UTF8'").format(
                    ident, ident
                )
            )
        except BaseException:
            admin.execute(sql.SQL("DROP ROLE {}").format(ident))
            raise
        admin.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident))
    test.addCleanup(_drop, name)

    home = Path(test.mktemp()).resolve()
    home.mkdir(parents=True)
    password_file = home / "postgres-password"
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")

    return PostgresDatabase(
        url=f"postgresql://{name}@{HOST}:{cluster.port}/{name}",
        name=name,
        role=name,
        port=cluster.port,
        password=password,
        password_file=password_file,
        conninfo=make_conninfo(
            host=HOST,
            port=cluster.port,
            dbname=name,
            user=name,
            password=password,
            sslmode="disable",
            connect_timeout=10,
        ),
    )


def _drop(name: str) -> None:
    from psycopg import sql

    ident = sql.Identifier(name)
    with superuser_connect() as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,)
        )
        # FORCE: a backend that was still starting when the query above ran.
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
        admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(ident))
