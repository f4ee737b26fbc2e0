"""
`twistd fjmcp` as an operator runs it: a real process, real sockets (TCP,
UNIX, systemd socket activation), exit statuses, and what lands in the log.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent
from twisted.web.http_headers import Headers

from tests.helpers import http_client

# The twistd script installed beside this interpreter, as an operator runs it.
TWISTD = str(Path(sys.executable).parent / "twistd")
CLIENT_SECRET = "gto_clientsecretthatmustneverbelogged"


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)


class Daemon:
    """
    One `twistd -n fjmcp` process with its own data dir, key and log file.
    """

    def __init__(
        self, test: TestCase, extra: list[str] | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.dir = Path(test.mktemp()).resolve()
        self.dir.mkdir()
        self.key = os.urandom(32)
        (self.dir / "secret.key").write_text(base64.b64encode(self.key).decode())
        (self.dir / "secret.key").chmod(0o600)
        (self.dir / "client-secret").write_text(CLIENT_SECRET)
        fake = self.dir / "forgejo-mcp"
        fake.write_text("#!/bin/sh\nexec cat\n")
        fake.chmod(0o755)
        self.log = self.dir / "fjmcp.log"
        self.argv = [
            TWISTD,
            "--nodaemon",
            "--pidfile=",
            f"--logfile={self.log}",
            "fjmcp",
            "--public-url=http://127.0.0.1:8080",
            "--forgejo-url=http://127.0.0.1:3000",
            "--forgejo-client-id=fjmcp-test",
            f"--forgejo-client-secret-file={self.dir / 'client-secret'}",
            f"--secret-key-file={self.dir / 'secret.key'}",
            f"--forgejo-mcp={fake}",
            f"--data-dir={self.dir / 'data'}",
            *(extra if extra is not None else ["--listen=tcp:0:interface=127.0.0.1"]),
        ]
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FJMCP_")}
        self.env.update(env or {})
        self.proc: subprocess.Popen[str] | None = None
        test.addCleanup(self.kill)

    def start(self, argv: list[str] | None = None, **popen: Any) -> subprocess.Popen[str]:
        self.proc = subprocess.Popen(
            argv or self.argv,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **popen,
        )
        return self.proc

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    async def wait_for_log(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(pattern, self.log_text())
            if match:
                return match
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"daemon exited {self.proc.returncode} before {pattern!r}:\n"
                    f"{self.log_text()}\n{self.proc.stderr.read() if self.proc.stderr else ''}"
                )
            await sleep(0.05)
        raise AssertionError(f"{pattern!r} not logged in {timeout}s:\n{self.log_text()}")

    async def port(self) -> int:
        return int((await self.wait_for_log(r"Site starting on (\d+)")).group(1))

    async def start_socket_activated(self, listener: socket.socket, name: str) -> Any:
        """
        Start as systemd does for a socket unit: C{listener} as fd 3, with
        LISTEN_PID (the shell's pid, which exec hands on to twistd),
        LISTEN_FDS and LISTEN_FDNAMES; return the response of /healthz on it.
        """
        fd = listener.fileno()
        script = f"exec 3<&{fd}; LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES={name} exec " + " ".join(
            _shell_quote(a) for a in self.argv
        )
        # bash, not sh: dash takes only one-digit descriptors in a redirection,
        # and a busy test process has the listener above 9.
        self.start(["/bin/bash", "-c", script], pass_fds=(fd,))
        await self.wait_for_log("fjmcp .* for ")
        port = listener.getsockname()[1]
        for _ in range(100):
            try:
                return await http_client().get(f"http://127.0.0.1:{port}/healthz")
            except Exception:
                await sleep(0.05)
        raise AssertionError(f"nothing answered on the activated socket:\n{self.log_text()}")

    async def wait_exit(self, timeout: float = 15.0) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon still running after {timeout}s")
            await sleep(0.05)
        return self.proc.returncode

    async def terminate(self) -> tuple[int, float]:
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = await self.wait_exit()
        return code, time.monotonic() - started


class LifecycleTests(TestCase):
    async def test_serves_health_and_exits_0_on_sigterm(self) -> None:
        daemon = Daemon(self)
        daemon.start()
        port = await daemon.port()
        response = await http_client().get(f"http://127.0.0.1:{port}/healthz")
        self.assertEqual(response.code, 200)
        body = await response.json()
        self.assertEqual((body["status"], body["store"], body["sessions"]), ("ok", "ok", 0))
        code, took = await daemon.terminate()
        self.assertEqual(code, 0)
        self.assertLess(took, 10)
        log = daemon.log_text()
        self.assertIn("received SIGTERM, shutting down", log)
        self.assertIn("Server Shut Down", log)
        self.assertNotIn("Traceback", log)
        data = daemon.dir / "data"
        self.assertTrue((data / "broker.db").exists())

    async def test_ctrl_c_then_sigterm_is_a_clean_stop(self) -> None:
        """
        Ctrl-C reaches the whole process group (SIGINT), and fjmcp-demo then
        sends SIGTERM too: the second stop request is no traceback.
        """
        daemon = Daemon(self)
        daemon.start()
        port = await daemon.port()
        await (await http_client().get(f"http://127.0.0.1:{port}/healthz")).content()
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGINT)
        daemon.proc.send_signal(signal.SIGTERM)
        code = await daemon.wait_exit()
        # twistd ends by its Ctrl-C signal, as a shell expects of Ctrl-C.
        self.assertIn(code, (0, -signal.SIGINT), daemon.log_text())
        self.assertIn("Server Shut Down", daemon.log_text())
        self.assertNotIn("ReactorNotRunning", daemon.log_text())
        self.assertNotIn("Traceback", daemon.log_text())

    async def test_state_is_private_whatever_the_umask(self) -> None:
        """
        Started with umask 022 (a container has no UMask=), the data
        directory and the database files are the broker's user's alone.
        """
        daemon = Daemon(self)
        daemon.start(umask=0o022)
        await daemon.port()
        data = daemon.dir / "data"
        for path in (data, *data.glob("broker.db*")):
            self.assertEqual(path.stat().st_mode & 0o077, 0, f"{path} is {path.stat().st_mode:o}")
        self.assertTrue((data / "broker.db").exists())

    async def test_broken_config_exits_2_listing_every_problem(self) -> None:
        daemon = Daemon(self)
        argv = [
            a
            for a in daemon.argv
            if not a.startswith(("--forgejo-url", "--secret-key-file", "--public-url"))
        ] + ["--public-url=http://mcp.example.org", "--max-sessions=none"]
        proc = daemon.start(argv)
        code = await daemon.wait_exit()
        stderr = proc.stderr.read() if proc.stderr else ""
        self.assertEqual(code, 2)
        lines = stderr.strip().splitlines()
        self.assertEqual(len(lines), 4, stderr)
        self.assertTrue(all(line.startswith("fjmcp: configuration error:") for line in lines))
        self.assertIn("--public-url", stderr)
        self.assertIn("--max-sessions", stderr)
        self.assertIn("--forgejo-url: required", stderr)
        self.assertIn("--secret-key-file: required", stderr)
        self.assertNotIn("Traceback", stderr)

    async def test_config_from_environment(self) -> None:
        """
        The same daemon configured only through FJMCP_* variables, as from a
        systemd EnvironmentFile.
        """
        daemon = Daemon(self)
        env = {}
        flags: list[str] = []
        for arg in daemon.argv[daemon.argv.index("fjmcp") + 1 :]:
            name, _, value = arg[2:].partition("=")
            env["FJMCP_" + name.upper().replace("-", "_")] = value
        daemon.env.update(env)
        daemon.start(daemon.argv[: daemon.argv.index("fjmcp") + 1] + flags)
        port = await daemon.port()
        response = await http_client().get(f"http://127.0.0.1:{port}/healthz")
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertEqual((await daemon.terminate())[0], 0)

    async def test_refuses_newer_database(self) -> None:
        daemon = Daemon(self)
        data = daemon.dir / "data"
        data.mkdir()
        conn = sqlite3.connect(data / "broker.db")
        conn.execute(
            "CREATE TABLE schema_migrations"
            " (version INTEGER PRIMARY KEY, name TEXT, applied_at REAL)"
        )
        conn.execute("INSERT INTO schema_migrations VALUES (999, 'future', 0)")
        conn.commit()
        conn.close()
        proc = daemon.start()
        code = await daemon.wait_exit()
        stderr = proc.stderr.read() if proc.stderr else ""
        self.assertEqual(code, 1)
        self.assertIn("schema version 999", stderr)
        self.assertNotIn("Traceback", stderr)


class ListenTests(TestCase):
    async def test_unix_socket(self) -> None:
        daemon = Daemon(self, extra=[])
        sock = daemon.dir / "fjmcp.sock"
        daemon.argv.append(f"--listen=unix:{sock}")
        daemon.start()
        await daemon.wait_for_log("Site starting on")
        agent = Agent.usingEndpointFactory(reactor, _UnixEndpoints(str(sock)))
        response = await HTTPClient(agent).get("http://localhost/healthz")
        self.assertEqual(response.code, 200)
        self.assertEqual((await response.json())["status"], "ok")
        self.assertEqual((await daemon.terminate())[0], 0)

    async def test_systemd_socket_activation(self) -> None:
        """
        systemd hands over a listening socket as fd 3 with LISTEN_PID and
        LISTEN_FDS; `--listen systemd:domain=INET:index=0` serves on it.
        """
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        self.addCleanup(listener.close)
        daemon = Daemon(self, extra=["--listen=systemd:domain=INET:index=0"])
        response = await daemon.start_socket_activated(listener, "fjmcp.socket")
        self.assertEqual(response.code, 200)
        await response.content()
        self.assertEqual((await daemon.terminate())[0], 0)

    async def test_taken_port_exits_3_with_one_line(self) -> None:
        """
        A --listen or --metrics-listen port held by another process: one
        line naming the endpoint and the reason, no traceback, and exit
        status 3 within seconds, so systemd sees the failure and restarts
        (the daemon used to log a CannotListenError and run on, listening
        on nothing).
        """
        taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        self.addCleanup(taken.close)
        endpoint = f"tcp:{taken.getsockname()[1]}:interface=127.0.0.1"
        for flags in (
            [f"--listen={endpoint}"],
            ["--listen=tcp:0:interface=127.0.0.1", f"--metrics-listen={endpoint}"],
        ):
            daemon = Daemon(self, extra=flags)
            proc = daemon.start()
            code = await daemon.wait_exit(timeout=10)
            stderr = proc.stderr.read() if proc.stderr else ""
            self.assertEqual(code, 3, f"{flags}\n{daemon.log_text()}\n{stderr}")
            log = daemon.log_text()
            lines = [line for line in log.splitlines() if "cannot listen" in line]
            self.assertEqual(len(lines), 1, log)
            self.assertIn(f"cannot listen on {endpoint}: address already in use", lines[0])
            self.assertNotIn("Traceback", log + stderr)
            self.assertNotIn("Unhandled", log + stderr)

    async def test_port_out_of_range_exits_2(self) -> None:
        """
        ``--listen tcp:80800`` is a configuration mistake (exit 2, one
        line), not an OverflowError from a daemon that keeps running.
        """
        daemon = Daemon(self, extra=["--listen=tcp:80800"])
        proc = daemon.start()
        code = await daemon.wait_exit(timeout=10)
        stderr = proc.stderr.read() if proc.stderr else ""
        self.assertEqual(code, 2, stderr)
        self.assertEqual(
            stderr.strip().splitlines(),
            ["fjmcp: configuration error: --listen: 'tcp:80800': port 80800 is outside 0..65535"],
        )


class LogTests(TestCase):
    async def test_no_secret_in_log(self) -> None:
        """
        At debug level, in both formats, with tokens in headers and OAuth
        parameters in URLs: the client secret, the key and the tokens never
        reach the log.
        """
        for log_format in ("text", "json"):
            daemon = Daemon(self)
            daemon.argv += ["--log-level=debug", f"--log-format={log_format}"]
            daemon.start()
            port = await daemon.port()
            client = http_client()
            for path in (
                "/healthz?code=authcode-must-not-be-logged&state=st",
                "/oauth/callback?code=authcode-must-not-be-logged",
                "/nope?access_token=bearer-token-must-not-be-logged",
            ):
                response = await client.get(
                    f"http://127.0.0.1:{port}{path}",
                    headers=Headers({"Authorization": ["Bearer bearer-token-must-not-be-logged"]}),
                )
                await response.content()
            self.assertEqual((await daemon.terminate())[0], 0)
            log = daemon.log_text()
            self.assertIn("/healthz", log)
            for secret in (
                CLIENT_SECRET,
                base64.b64encode(daemon.key).decode(),
                base64.urlsafe_b64encode(daemon.key).decode(),
                daemon.key.hex(),
                "authcode-must-not-be-logged",
                "bearer-token-must-not-be-logged",
            ):
                self.assertNotIn(secret, log)
            if log_format == "json":
                records = [json.loads(line) for line in log.splitlines()]
                self.assertTrue(all({"time", "level", "message"} <= set(r) for r in records))
                self.assertIn("debug", {r["level"] for r in records})

    async def test_log_level_filters(self) -> None:
        daemon = Daemon(self)
        daemon.argv += ["--log-level=error"]
        daemon.start()
        # Nothing at info is written, so wait on the socket instead of the log.
        await sleep(0.1)
        for _ in range(200):
            if daemon.proc and daemon.proc.poll() is not None:
                break
            if (daemon.dir / "data" / "broker.db-wal").exists():
                break
            await sleep(0.05)
        await sleep(0.3)
        self.assertEqual((await daemon.terminate())[0], 0)
        self.assertEqual(daemon.log_text().strip(), "")


class _UnixEndpoints:
    def __init__(self, path: str) -> None:
        self.path = path

    def endpointForURI(self, uri: Any) -> UNIXClientEndpoint:
        return UNIXClientEndpoint(reactor, self.path)


def _shell_quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"
