"""
The image, built from the unchanged Containerfile and run as
deploy/podman/fjmcp-broker.container runs it (uid 65532, no capabilities,
no-new-privileges, the volume at /data, the env file, its limits and health
check), against the Forgejo stand-in, with the real forgejo-mcp as each
session's child.

The container shares a network namespace of the test's own with the
stand-in and the clients (--network=ns:...): a stand-in on the host's
loopback, as with --network=host, but with nothing taken on the host's
ports, and the same namespace for a second container on the same volume.

Skipped when podman cannot be set up here (tests/podman_support.py says
why); under CI=true that fails instead.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.trial.unittest import TestCase

from tests import podman_support as support
from tests.test_deploy import one, parse_unit

BROKER = "http://127.0.0.1:8080"
FJMCP_TRY = str(Path(sys.executable).parent / "fjmcp-try")
# The [Container] keys of the unit and how `podman run` says them; the
# ones not here are replaced for the test (see run_argv).
FLAGS = {
    "User": "--user",
    "Volume": "--volume",
    "EnvironmentFile": "--env-file",
    "StopTimeout": "--stop-timeout",
    "Ulimit": "--ulimit",
    "PidsLimit": "--pids-limit",
    "HealthCmd": "--health-cmd",
    "HealthInterval": "--health-interval",
    "HealthTimeout": "--health-timeout",
    "HealthStartPeriod": "--health-start-period",
    "HealthRetries": "--health-retries",
}


class ImageTests(TestCase):
    timeout = 1800

    def setUp(self) -> None:
        self.podman = support.podman()
        self.image = support.fjmcp_image()
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)
        self.volume = support.unique("fjmcp-test-state")
        self.addCleanup(self.podman.remove_volume, self.volume)
        self.netns = support.NetNS()
        self.addCleanup(self.netns.remove)

    def create_key(self) -> None:
        """
        The volume and its secret key, made by docs/deploy-podman.md's own
        command (section 3).
        """
        block = support.doc_block(support.PODMAN_DOC, "> /data/secret.key'")
        command = block.replace("fjmcp-state:", f"{self.volume}:").replace(
            "localhost/fjmcp:latest", self.image
        )
        support.run(["bash", "-euo", "pipefail", "-c", command], env=self.podman.env)

    def run_argv(self, name: str, env_file: Path) -> list[str]:
        """
        `podman run` as the Quadlet unit's [Container] section says, but for
        the names (container, volume, image, env file) and the network: the
        test's namespace instead of a published port.
        """
        unit = parse_unit(support.QUADLET_UNIT)
        argv = ["run", "--detach", "--name", name]
        for key, value in unit["Container"]:
            if key in ("Image", "ContainerName", "PublishPort"):
                continue
            if key == "Group":
                continue  # with User=, below
            if key == "User":
                value = f"{value}:{one(unit, 'Container', 'Group')}"
            elif key == "Volume":
                value = value.replace("fjmcp-state:", f"{self.volume}:")
            elif key == "EnvironmentFile":
                value = str(env_file)
            if key == "DropCapability":
                argv += ["--cap-drop", value.lower()]
            elif key == "NoNewPrivileges":
                self.assertEqual(value, "true")
                argv += ["--security-opt=no-new-privileges"]
            else:
                self.assertIn(key, FLAGS, "a [Container] key this test does not know")
                argv += [FLAGS[key], value]
        return [
            *argv,
            *self.podman.machine_run_args,
            f"--network=ns:{self.netns.path}",
            self.image,
        ]

    def start(self, name: str, env_file: Path) -> None:
        self.addCleanup(self.podman.remove_container, name)
        self.podman(*self.run_argv(name, env_file))
        try:
            support.wait_for_http(self.netns.argv(), f"{BROKER}/healthz")
        except AssertionError:
            raise AssertionError(self.podman.logs(name)) from None

    def env_file(self, **overrides: str) -> Path:
        path = self.dir / "fjmcp-broker.env"
        support.write_env_file(
            path,
            {
                "FJMCP_PUBLIC_URL": BROKER,
                "FJMCP_FORGEJO_URL": "http://127.0.0.1:3000",
                "FJMCP_FORGEJO_CLIENT_ID": support.STANDIN_CLIENT_ID,
                "FJMCP_FORGEJO_CLIENT_SECRET": support.STANDIN_CLIENT_SECRET,
                **overrides,
            },
        )
        return path

    def fjmcp_try(self, token_file: Path) -> subprocess.CompletedProcess[str]:
        return support.run(
            self.netns.argv(
                FJMCP_TRY,
                "--headless",
                "--user",
                "alice",
                "--token-file",
                str(token_file),
                "--call",
                "get_my_user_info",
                f"{BROKER}/mcp",
            ),
            check=False,
            timeout=180,
        )

    def test_login_tool_call_restart_and_volume(self) -> None:
        """
        The SDK's OAuth client logs in through the container and calls
        get_my_user_info on the real forgejo-mcp; the unit's health command
        passes; a new container on the same volume keeps the client
        registrations and the tokens (a client with kept tokens calls again
        without logging in); the volume's files are 65532's and private.
        """
        self.create_key()
        standin, url = support.standin(self.netns.argv(), self.dir, f"{BROKER}/oauth/callback")
        self.addCleanup(standin.stop)
        self.assertEqual(url, "http://127.0.0.1:3000")
        env_file = self.env_file()
        first = support.unique("fjmcp-test")
        self.start(first, env_file)

        summary = support.sdk_login(self.netns.argv(), f"{BROKER}/mcp")
        self.assertEqual(summary["error"], None, summary)
        (call,) = summary["initialize"]["calls"]
        self.assertEqual((call["tool"], call["is_error"]), ("get_my_user_info", False), call)
        self.assertIn('"login":"alice"', "".join(call["text"]).replace(" ", ""), call)
        self.assertIn("get_my_user_info", summary["initialize"]["tools"])

        # The unit's own health command, as podman runs it.
        health = self.podman("healthcheck", "run", first, check=False)
        self.assertEqual(health.returncode, 0, health.stdout + health.stderr)

        # A second client keeps its registration and tokens in a file.
        tokens = self.dir / "tokens.json"
        logged_in = self.fjmcp_try(tokens)
        self.assertEqual(logged_in.returncode, 0, logged_in.stderr)
        self.assertIn("the broker's consent page", logged_in.stderr)
        self.assertIn("alice", logged_in.stdout)

        # A new container on the same volume.
        started = time.monotonic()
        self.podman("stop", first, timeout=120)
        stop_took = time.monotonic() - started
        state = json.loads(self.podman("inspect", "--format", "{{json .State}}", first).stdout)
        self.assertEqual(state["ExitCode"], 0, self.podman.logs(first))
        self.assertLess(stop_took, 25, "the broker ends on SIGTERM, well before podman's kill")
        self.podman("rm", first)
        second = support.unique("fjmcp-test")
        self.start(second, env_file)

        again = self.fjmcp_try(tokens)
        self.assertEqual(again.returncode, 0, again.stderr)
        self.assertIn("using the tokens kept in", again.stderr)
        self.assertNotIn("consent page", again.stderr)
        self.assertIn("alice", again.stdout)
        listing = self.podman("exec", second, "fjmcp-admin", "--json", "clients", "list")
        clients = json.loads(listing.stdout)
        names = {c.get("client_name") for c in _items(clients)}
        self.assertIn("SDK Test Client", names, clients)

        self.check_volume()

    def check_volume(self) -> None:
        """
        Everything on the volume belongs to 65532 and is private to it: the
        database with its -wal and -shm, the key, the directory.
        """
        mountpoint = Path(
            self.podman(
                "volume", "inspect", "--format", "{{.Mountpoint}}", self.volume
            ).stdout.strip()
        )
        info = mountpoint.stat()
        self.assertEqual((info.st_uid, info.st_gid), (65532, 65532))
        self.assertEqual(stat.S_IMODE(info.st_mode), 0o700)
        names = {p.name for p in mountpoint.iterdir()}
        self.assertLessEqual({"broker.db", "secret.key"}, names)
        for path in mountpoint.iterdir():
            info = path.stat()
            self.assertEqual((path.name, info.st_uid), (path.name, 65532))
            self.assertEqual(
                (path.name, stat.S_IMODE(info.st_mode) & 0o077), (path.name, 0), "private"
            )

    def test_host_network_trusts_loopback(self) -> None:
        """
        Sharing the clients' network namespace (the "host network" row of
        docs/deploy-podman.md's table), the broker sees requests from
        127.0.0.1, and with the setting that row gives it believes the
        X-Forwarded-For of a proxy there.
        """
        peer, trusted = support.proxy_row("host network")
        self.create_key()
        name = support.unique("fjmcp-test")
        self.start(name, self.env_file(FJMCP_TRUSTED_PROXIES=trusted))
        seen = client_addresses(self, self.podman, name, self.netns.argv(), f"{BROKER}/healthz")
        self.assertEqual(seen, (peer, "203.0.113.7"))


def _items(listing: Any) -> list[dict[str, Any]]:
    if isinstance(listing, dict):
        for value in listing.values():
            if isinstance(value, list):
                return value
    return listing if isinstance(listing, list) else []


def client_addresses(
    test: TestCase, podman: support.Podman, name: str, argv_prefix: list[str], url: str
) -> tuple[str, str]:
    """
    The client addresses the broker logs for a request to C{url} without
    X-Forwarded-For (the peer it sees) and one with X-Forwarded-For:
    203.0.113.7 (that address when it believes the peer).
    """
    marks = []
    for forwarded in ("", "203.0.113.7"):
        mark = support.unique("fjmcp-podman-test")
        headers = {"User-Agent": mark}
        if forwarded:
            headers["X-Forwarded-For"] = forwarded
        fetch = (
            "import json, sys, urllib.request\n"
            "request = urllib.request.Request(sys.argv[1], headers=json.loads(sys.argv[2]))\n"
            "sys.exit(0 if urllib.request.urlopen(request, timeout=10).status == 200 else 1)\n"
        )
        support.run([*argv_prefix, sys.executable, "-c", fetch, url, json.dumps(headers)])
        marks.append(mark)
    found: list[str] = []
    deadline = time.monotonic() + 10
    while len(found) < 2 and time.monotonic() < deadline:
        logs = podman.logs(name)
        found = []
        for mark in marks:
            lines = [line for line in logs.splitlines() if f'"{mark}"' in line]
            if lines:
                found.append(lines[0].split('"')[1])
        time.sleep(0.2)
    test.assertEqual(len(found), 2, podman.logs(name))
    return found[0], found[1]
