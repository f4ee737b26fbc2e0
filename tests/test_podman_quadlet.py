"""
Quadlet on deploy/podman/fjmcp-broker.container: the generator from Debian
13's podman (tests/podman_support.py fetches it; Debian 12's podman has
none) turns the shipped unit into a service, and the `podman run` line of
its ExecStart=, split as systemd splits it (not by a shell model), runs the
image: healthy by the unit's own health command, the client address as
docs/deploy-podman.md says for this podman mode.

Skipped when podman or the generator cannot be set up here; under CI=true
that fails instead.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests import podman_support as support
from tests.test_deploy import containerfile, healthcheck_command
from tests.test_podman_image import client_addresses

UNIT = "fjmcp-broker"


def option(argv: list[str], name: str) -> list[str]:
    """
    The values of C{name} in C{argv}, as `--name value` or `--name=value`.
    """
    found = []
    for i, word in enumerate(argv):
        if word == name:
            found.append(argv[i + 1])
        elif word.startswith(name + "="):
            found.append(word[len(name) + 1 :])
    return found


class QuadletTests(TestCase):
    timeout = 900

    def setUp(self) -> None:
        self.podman = support.podman()
        self.quadlet = support.quadlet()
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir(parents=True)
        self.specifiers = {
            "t": str(self.dir),
            "N": UNIT,
            "n": f"{UNIT}.service",
            "h": str(Path.home()),
        }

    def generate(self, unit_text: str) -> str:
        """
        The service Quadlet makes of C{unit_text} as a rootless (-user) unit,
        as the deploy doc installs it.
        """
        units = self.dir / "units"
        units.mkdir(exist_ok=True)
        (units / f"{UNIT}.container").write_text(unit_text)
        result = support.run(
            [str(self.quadlet), "-dryrun", "-user"],
            env=dict(os.environ, QUADLET_UNIT_DIRS=str(units)),
            check=False,
        )
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertNotIn("error", result.stderr.lower(), result.stderr)
        (service,) = re.findall(
            rf"^---{UNIT}\.service---\n(.*?)(?=^---|\Z)", result.stdout, re.M | re.S
        )
        return service

    def test_shipped_unit(self) -> None:
        """
        The generator accepts the unit as shipped, and its `podman run` line
        says what the unit says: the image's own health command intact, no
        privileges, state on the named volume, loopback-only port.
        """
        service = self.generate(support.QUADLET_UNIT.read_text())
        argv = support.exec_start_argv(service, self.specifiers)
        self.assertEqual(argv[:2], ["/usr/bin/podman", "run"])
        self.assertEqual(argv[-1], "localhost/fjmcp:latest")
        (health,) = option(argv, "--health-cmd")
        self.assertEqual(json.loads(health), healthcheck_command(containerfile()))
        self.assertEqual(option(argv, "--user"), ["65532:65532"])
        self.assertEqual(option(argv, "--cap-drop"), ["all"])
        self.assertEqual(option(argv, "--security-opt"), ["no-new-privileges"])
        self.assertEqual(option(argv, "-v"), ["fjmcp-state:/data"])
        self.assertEqual(option(argv, "--publish"), ["127.0.0.1:8080:8080"])
        self.assertEqual(
            option(argv, "--env-file"), [f"{Path.home()}/.config/fjmcp/fjmcp-broker.env"]
        )
        self.assertEqual(option(argv, "--stop-timeout"), ["30"])

    def test_generated_run_line(self) -> None:
        """
        The generated ExecStart=, run: the container serves, `podman
        healthcheck run` passes with the unit's health command (a mangled
        one fails: "Unterminated quoted string"), the broker sees requests
        through the published port from the address docs/deploy-podman.md
        gives for this mode and, with the setting it gives, believes the
        proxy's X-Forwarded-For; the generated ExecStop= removes it.
        """
        self.assertFalse(self.podman.rootless)
        peer, trusted = support.proxy_row("rootful, default bridge network")
        image = support.fjmcp_image()
        name = support.unique("fjmcp-test")
        volume = support.unique("fjmcp-test-state")
        port = support.free_port()
        env_file = self.dir / "fjmcp-broker.env"
        support.write_env_file(
            env_file,
            {
                "FJMCP_PUBLIC_URL": f"http://127.0.0.1:{port}",
                "FJMCP_FORGEJO_URL": "http://127.0.0.1:3000",
                "FJMCP_TRUSTED_PROXIES": trusted,
            },
        )
        # Only the names change: image, container, volume, host port, env file.
        text = support.QUADLET_UNIT.read_text()
        for key, value in (
            ("Image", image),
            ("ContainerName", name),
            ("Volume", f"{volume}:/data"),
            ("PublishPort", f"127.0.0.1:{port}:8080"),
            ("EnvironmentFile", str(env_file)),
        ):
            text, count = re.subn(rf"^{key}=.*$", f"{key}={value}", text, flags=re.M)
            self.assertEqual(count, 1, key)
        service = self.generate(text)
        argv = support.exec_start_argv(service, self.specifiers)
        sections = support.unit_sections(service)
        environment = dict(v.split("=", 1) for k, v in sections["Service"] if k == "Environment")
        env = {**self.podman.env, **environment}
        stop = [
            support.resolve_specifiers(w, self.specifiers)
            for w in support.split_command_line(
                next(v for k, v in sections["Service"] if k == "ExecStop")
            )
        ]
        self.addCleanup(self.podman.remove_volume, volume)
        self.addCleanup(self.podman.remove_container, name)

        block = support.doc_block(support.PODMAN_DOC, "> /data/secret.key'")
        support.run(
            [
                "bash",
                "-euo",
                "pipefail",
                "-c",
                block.replace("fjmcp-state:", f"{volume}:").replace(
                    "localhost/fjmcp:latest", image
                ),
            ],
            env=self.podman.env,
        )
        # What this machine needs besides (tests/podman_support.py): its
        # nproc hard limit, and no --cgroups=split, which wants the cgroup
        # of its own that systemd gives each service (there is no systemd
        # here, and no cgroup2 mount to split).
        argv.remove("--cgroups=split")
        run_index = argv.index("run")
        argv[run_index + 1 : run_index + 1] = self.podman.machine_run_args
        started = support.run(argv, env=env, check=False, timeout=300)
        self.assertEqual(started.returncode, 0, started.stderr)
        try:
            support.wait_for_http([], f"http://127.0.0.1:{port}/healthz")
        except AssertionError:
            raise AssertionError(self.podman.logs(name)) from None

        health = self.podman("healthcheck", "run", name, check=False)
        self.assertEqual(health.returncode, 0, health.stdout + health.stderr)

        seen = client_addresses(self, self.podman, name, [], f"http://127.0.0.1:{port}/healthz")
        self.assertEqual(seen, (peer, "203.0.113.7"))

        stopped = support.run(stop, env=env, check=False, timeout=120)
        self.assertEqual(stopped.returncode, 0, stopped.stderr)
        self.assertNotEqual(self.podman("container", "exists", name, check=False).returncode, 0)
