"""
A broker cluster as an operator runs one (docs/deploy-cluster.md), for the
tests: one PostgreSQL database (L{tests.postgres_support}), the Forgejo
stand-in in its own process, several C{twistd -n fjmcp} nodes (each its
own process, data directory and loopback port; all with the same database,
secret key, public URL and Forgejo app, the real forgejo-mcp as their
child) and the real Caddy running the shipped multi-node Caddyfile
(deploy/caddy/Caddyfile.cluster) changed only in its site addresses, its
upstream addresses and TLS (L{cluster_caddyfile}).

Every process is started with its own process group and killed, with
everything it started, when the test ends, whatever the test did.  Node
logs and Caddy's output stay in files, whose tails L{Cluster.tails} gives
for a failure message.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.trial.unittest import TestCase

from tests.caddy_support import TEST_GLOBALS, free_port, loopback_sites, run_caddy_config
from tests.helpers import http_client, sleep
from tests.postgres_support import PostgresDatabase, postgres_database

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_CADDYFILE = ROOT / "deploy" / "caddy" / "Caddyfile.cluster"
# The shipped file's upstream lines (its comment asks to keep them so).
UPSTREAMS = "reverse_proxy 127.0.0.1:8081 127.0.0.1:8082 127.0.0.1:8083 {"
TWISTD = str(Path(sys.executable).parent / "twistd")
STANDIN_ANNOUNCEMENT = "forgejo-standin listening on "
FORGEJO_CLIENT_ID = "fjmcp-cluster"
FORGEJO_CLIENT_SECRET = "gto_clusterclientsecret"
START_TIMEOUT = 30.0
# The loopback address every node trusts X-Forwarded-For from: Caddy's.
TRUSTED_PROXIES = "127.0.0.1/32"


def cluster_caddyfile(shipped: str, port: int, upstream_ports: Sequence[int]) -> str:
    """
    The shipped multi-node Caddyfile with only its sites (plain HTTP on
    127.0.0.1:C{port}), its upstreams (C{upstream_ports} on 127.0.0.1) and
    TLS changed, plus the tests' global options (no admin endpoint, a short
    grace period).
    """
    # One by session id, one for the rest (by bearer token).
    if shipped.count(UPSTREAMS) != 2:
        raise AssertionError(
            f"the shipped Caddyfile.cluster no longer has exactly two {UPSTREAMS!r}"
        )
    adapted = loopback_sites(shipped, port)
    upstreams = " ".join(f"127.0.0.1:{p}" for p in upstream_ports)
    adapted = adapted.replace(UPSTREAMS, f"reverse_proxy {upstreams} {{")
    if adapted == shipped or "{$FJMCP_HOST}" in adapted or "http:// {" in adapted:
        raise AssertionError("the shipped Caddyfile.cluster's site lines changed")
    return TEST_GLOBALS + adapted


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"({path}: {e.strerror})"
    return "\n".join(text.splitlines()[-lines:])


async def _healthy(
    url: str, failed: Callable[[str], str], alive: Callable[[], None] = lambda: None
) -> None:
    """
    Until C{url}/healthz answers 200; C{alive} raises when waiting is
    pointless, C{failed} makes the message of a deadline passed.
    """
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        alive()
        try:
            response = await http_client().get(url + "/healthz")
            answer = f"{response.code}: {(await response.content())!r}"
        except Exception as e:
            answer = f"no answer ({e!r})"
        else:
            if response.code == 200:
                return
        if time.monotonic() > deadline:
            raise AssertionError(failed(answer))
        await sleep(0.1)


class Process:
    """
    A subprocess in a process group of its own, its output in a file;
    killed with its group when the test ends.
    """

    def __init__(
        self,
        test: TestCase,
        argv: Sequence[str],
        log: Path,
        env: dict[str, str],
        stderr: Path | None = None,
        cwd: Path = ROOT,
    ) -> None:
        self.log = log
        self.stderr = stderr
        self._out = log.open("ab")
        self._err = stderr.open("ab") if stderr is not None else None
        self.proc = subprocess.Popen(
            list(argv),
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err if self._err is not None else subprocess.STDOUT,
            start_new_session=True,
        )
        self.pid = self.proc.pid
        test.addCleanup(self.kill_group)

    def running(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """
        SIGKILL to the process itself only (what its children then do is up
        to them).
        """
        if self.running():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def kill_group(self) -> None:
        """
        SIGKILL to the process and everything in its group (its children,
        orphaned or not), then reap it.
        """
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self._out.close()
        if self._err is not None:
            self._err.close()

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


@attrs.define
class Node:
    """
    One broker node: its name (node1 ...), port, log file and process.
    """

    name: str
    port: int
    log: Path
    process: Process

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


class Cluster:
    """
    The stand-in, the nodes and Caddy (L{start}); C{url} is the public URL
    (Caddy's), C{mcp_url} its MCP endpoint.
    """

    def __init__(self, test: TestCase, forgejo_mcp: str, nodes: int = 3) -> None:
        self.test = test
        self.forgejo_mcp = forgejo_mcp
        self.count = nodes
        self.home = Path(test.mktemp()).resolve()
        self.home.mkdir(parents=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mcp_url = self.url + "/mcp"
        self.nodes: list[Node] = []
        self.standin: Process | None = None
        self.forgejo_url = ""
        self.caddy_log: Path | None = None
        self.database: PostgresDatabase | None = None
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FJMCP_")}
        self.env["PYTHONUNBUFFERED"] = "1"

    async def start(self, node_options: Sequence[str] = ()) -> None:
        """
        Start the database, the stand-in, every node and Caddy, and return
        once each answers.  C{node_options} go to every node.
        """
        self.database = postgres_database(self.test)
        await self._start_standin()
        key = self.home / "secret.key"
        key.write_text(base64.b64encode(os.urandom(32)).decode())
        key.chmod(0o600)
        secret = self.home / "forgejo-client-secret"
        secret.write_text(FORGEJO_CLIENT_SECRET)
        secret.chmod(0o600)
        for i in range(1, self.count + 1):
            port = free_port()
            directory = self.home / f"node{i}"
            directory.mkdir()
            log = directory / "fjmcp.log"
            argv = [
                TWISTD,
                "--nodaemon",
                "--pidfile=",
                f"--logfile={log}",
                "fjmcp",
                f"--listen=tcp:{port}:interface=127.0.0.1",
                f"--public-url={self.url}",
                f"--forgejo-url={self.forgejo_url}",
                f"--forgejo-client-id={FORGEJO_CLIENT_ID}",
                f"--forgejo-client-secret-file={secret}",
                f"--secret-key-file={key}",
                f"--forgejo-mcp={self.forgejo_mcp}",
                f"--data-dir={directory / 'data'}",
                f"--database={self.database.url}",
                f"--database-password-file={self.database.password_file}",
                f"--trusted-proxies={TRUSTED_PROXIES}",
                *node_options,
            ]
            process = Process(self.test, argv, directory / "twistd.out", self.env)
            self.nodes.append(Node(f"node{i}", port, log, process))
        # Started together, as a cluster's nodes may be (migrations run once).
        for node in self.nodes:
            await self._wait_healthy(node)
        config = cluster_caddyfile(
            CLUSTER_CADDYFILE.read_text(), self.port, [n.port for n in self.nodes]
        )
        _, self.caddy_log = await run_caddy_config(self.test, self.port, config)
        await self._wait_through_caddy()

    async def _start_standin(self) -> None:
        log = self.home / "standin.log"
        self.standin = Process(
            self.test,
            [
                sys.executable,
                "-m",
                "fjmcp_dev.standin",
                "--listen",
                "tcp:0:interface=127.0.0.1",
                "--client",
                f"{FORGEJO_CLIENT_ID}:{FORGEJO_CLIENT_SECRET}:{self.url}/oauth/callback",
                "--test-login",
                "--quiet",
            ],
            log,
            self.env,
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            match = re.search(re.escape(STANDIN_ANNOUNCEMENT) + r"(\S+)\n", self.standin.text())
            if match:
                self.forgejo_url = match.group(1)
                return
            if not self.standin.running() or time.monotonic() > deadline:
                raise AssertionError(f"the Forgejo stand-in did not start:\n{self.standin.text()}")
            await sleep(0.05)

    async def _wait_healthy(self, node: Node) -> None:
        """
        Until the node answers /healthz with 200 (its database too).
        """

        def alive() -> None:
            if not node.process.running():
                raise AssertionError(
                    f"{node.name} exited ({node.process.proc.returncode}):\n"
                    f"{node.process.text()}\n{_tail(node.log, 60)}"
                )

        await _healthy(
            node.url,
            lambda answer: f"{node.name}'s /healthz: {answer}\n{_tail(node.log, 60)}",
            alive,
        )

    async def _wait_through_caddy(self) -> None:
        """
        Until /healthz answers 200 through Caddy.
        """
        await _healthy(self.url, lambda answer: f"/healthz through Caddy: {answer}\n{self.tails()}")

    def tails(self, lines: int = 40) -> str:
        """
        The last lines of every node's log and of Caddy's output, for a
        failure message.
        """
        parts = []
        for node in self.nodes:
            state = (
                "running" if node.process.running() else f"exited {node.process.proc.returncode}"
            )
            parts.append(f"--- {node.name} ({state}), {node.log}:\n{_tail(node.log, lines)}")
            out = node.process.text().strip()
            if out:
                parts.append(f"--- {node.name} stdout/stderr:\n{out[-2000:]}")
        if self.caddy_log is not None:
            parts.append(f"--- caddy, {self.caddy_log}:\n{_tail(self.caddy_log, lines)}")
        if self.standin is not None:
            parts.append(f"--- stand-in:\n{_tail(self.standin.log, 10)}")
        return "\n".join(parts)


def json_lines(text: str) -> list[dict[str, Any]]:
    """
    The JSON objects among C{text}'s lines (others, like an SDK warning, are
    skipped).
    """
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                out.append(value)
    return out
