"""
The shipped deployment files, checked as far as this machine allows: no
container engine runs here, so the Containerfile and the Quadlet unit are
checked at parser level (and their health check command against a real
daemon); the systemd units go through C{systemd-analyze verify}; the env
examples go through the broker's own configuration parser; and the daemon
is run the way the systemd unit runs it, build info and all.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
from collections.abc import Mapping
from pathlib import Path

import attrs
from twisted.trial.unittest import SkipTest, TestCase

from fjmcp import __version__
from fjmcp.buildinfo import BuildInfo, git_revision, read_build_info
from fjmcp.config import ENV_PREFIX, OPTIONS, Config, build_config
from fjmcp.mcp import resources
from tests.helpers import http_client
from tests.podman_support import unit_sections
from tests.test_daemon import TWISTD, Daemon

ROOT = Path(__file__).resolve().parent.parent
CONTAINERFILE = ROOT / "Containerfile"
PIN_FILE = ROOT / "deploy" / "forgejo-mcp.version"
QUADLET = ROOT / "deploy" / "podman" / "fjmcp-broker.container"
PODMAN_ENV = ROOT / "deploy" / "podman" / "fjmcp-broker.env.example"
SERVICE = ROOT / "deploy" / "systemd" / "fjmcp.service"
SOCKET = ROOT / "deploy" / "systemd" / "fjmcp.socket"
SYSUSERS = ROOT / "deploy" / "systemd" / "fjmcp.sysusers"
SYSTEMD_ENV = ROOT / "deploy" / "systemd" / "fjmcp.env.example"

# What `make image` stamps in, as the image's ENV carries it.
REVISION = "3f2c9a1b7d0e-dirty"
BUILD_DATE = "2026-11-26T19:00:00Z"
STAMPED = {"FJMCP_BUILD_REVISION": REVISION, "FJMCP_BUILD_DATE": BUILD_DATE}


def pin() -> str:
    return PIN_FILE.read_text().strip()


def tool_missing(name: str) -> str | None:
    """
    Why a test needing C{name} cannot run here; under CI (where it is
    installed) its absence is a failure instead.
    """
    if shutil.which(name):
        return None
    if os.environ.get("CI") == "true":
        raise AssertionError(f"{name} is not installed; CI must run these tests")
    return f"{name} is not installed (it comes with systemd)"


# --- the Containerfile, parsed


@attrs.frozen
class Instruction:
    keyword: str
    args: str
    stage: str


def parse_containerfile(text: str) -> list[Instruction]:
    """
    Instructions with continuation lines joined and comments dropped; each
    tagged with the name of the stage it belongs to.
    """
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "the Containerfile ends in a continuation line"
    result = []
    stage = ""
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+)\s+AS\s+(\S+)", args.strip(), re.IGNORECASE)
            assert match, f"every FROM names its stage: {line!r}"
            stage = match.group(2)
        result.append(Instruction(keyword, args.strip(), stage))
    return result


def containerfile() -> list[Instruction]:
    return parse_containerfile(CONTAINERFILE.read_text())


def stage_names(instructions: list[Instruction]) -> list[str]:
    return [i.stage for i in instructions if i.keyword == "FROM"]


def final(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    last = stage_names(instructions)[-1]
    return [i for i in instructions if i.stage == last and i.keyword == keyword]


def image_env(instructions: list[Instruction]) -> dict[str, str]:
    """
    The runtime stage's ENV, in the KEY=VALUE form (values kept unexpanded).
    """
    env: dict[str, str] = {}
    for instruction in final(instructions, "ENV"):
        for item in shlex.split(instruction.args):
            name, sep, value = item.partition("=")
            assert sep, f"ENV in the KEY=VALUE form: {instruction.args!r}"
            env[name] = value
    return env


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def healthcheck_command(instructions: list[Instruction]) -> list[str]:
    (check,) = final(instructions, "HEALTHCHECK")
    _, _, command = check.args.partition("CMD ")
    return exec_form(Instruction("CMD", command, check.stage))


# --- systemd unit files and env files, parsed


def parse_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """
    A systemd-style unit (also Quadlet's): sections of (key, value) pairs in
    order, keys repeatable, comments and continuation lines as systemd reads
    them (L{tests.podman_support.unit_sections}).
    """
    try:
        return unit_sections(path.read_text())
    except ValueError as e:
        raise AssertionError(f"{path.name}: {e}") from None


def values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    found = values(unit, section, key)
    assert len(found) == 1, f"[{section}] {key}= should be set once, found {found}"
    return found[0]


ENV_LINE = re.compile(r"#?\s*(FJMCP_[A-Z0-9_]+)=(.*)")


def parse_env_file(path: Path) -> dict[str, str]:
    """
    The settings an env file sets (podman --env-file and systemd read the
    same simple KEY=VALUE lines here: no quotes, no expansion).
    """
    env = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name), f"{path.name}: {line!r}"
        assert not value.startswith(("'", '"')), f"{path.name}: quotes are taken literally"
        env[name] = value
    return env


def mentioned_settings(path: Path) -> dict[str, str]:
    """
    Every FJMCP_ setting an example sets or shows commented out.
    """
    found = {}
    for raw in path.read_text().splitlines():
        match = ENV_LINE.fullmatch(raw.strip())
        if match:
            found[match.group(1)] = match.group(2)
    return found


def socket_listen_example() -> str:
    """
    The FJMCP_LISTEN the systemd env example gives for socket activation.
    """
    (listen,) = re.findall(r"^#?FJMCP_LISTEN=(systemd:\S+)$", SYSTEMD_ENV.read_text(), re.M)
    return listen


KNOWN_SETTINGS = {o.env for o in OPTIONS} | {ENV_PREFIX + "LISTEN"}


def make_image_command() -> list[str]:
    """
    The build command `make image` would run with podman.
    """
    out = subprocess.run(
        ["make", "-s", "-n", "image", "CONTAINER_ENGINE=/usr/bin/podman"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (build,) = [line for line in out.replace("\\\n", " ").splitlines() if " build " in line]
    return shlex.split(build)


class Placeholders:
    """
    Stand-ins for the files a deployment has (key, client secret,
    forgejo-mcp) in a temporary directory, and a mapping of the deployed
    paths onto them.
    """

    def __init__(self, test: TestCase) -> None:
        self.dir = Path(test.mktemp()).resolve()
        self.dir.mkdir()
        self.key = self.dir / "secret.key"
        self.key.write_text("wq3WkW9H1fWl0s0m3xKJdQW3Q0QWRz0p2h8r1vB4d1E=\n")
        self.key.chmod(0o600)
        self.client_secret = self.dir / "client-secret"
        self.client_secret.write_text("gto_placeholder_secret\n")
        self.forgejo_mcp = self.dir / "forgejo-mcp"
        self.forgejo_mcp.write_text("#!/bin/sh\nexec cat\n")
        self.forgejo_mcp.chmod(0o755)

    def config(self, environ: Mapping[str, str]) -> Config:
        return build_config({}, [], environ, which=lambda name: None)


# --- the tests


class ContainerfileTests(TestCase):
    def test_three_named_stages(self) -> None:
        """
        forgejo-mcp is built in a Go stage, the broker's wheels in a Python
        stage, and the runtime takes only their results.
        """
        instructions = containerfile()
        self.assertEqual(stage_names(instructions), ["forgejo-mcp", "wheels", "runtime"])
        froms = [i.args.split()[0] for i in instructions if i.keyword == "FROM"]
        self.assertTrue(froms[0].startswith("docker.io/library/golang:"), froms[0])
        self.assertTrue(froms[1].startswith("docker.io/library/python:3.11"), froms[1])
        self.assertEqual(froms[1], froms[2], "wheels are built for the runtime's Python")
        copies = [i.args for i in final(instructions, "COPY")]
        self.assertIn("--from=forgejo-mcp /out/forgejo-mcp /usr/local/bin/forgejo-mcp", copies)
        self.assertIn("--from=wheels /wheels /wheels", copies)

    def test_go_stage_installs_the_pinned_module(self) -> None:
        """
        The Go stage installs the module the Makefile installs, at the
        build argument, and the Go image is new enough for it.
        """
        instructions = containerfile()
        runs = " ".join(i.args for i in instructions if i.stage == "forgejo-mcp")
        module = re.search(r"^FORGEJO_MCP_MODULE := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
        assert module is not None
        self.assertIn(f'"{module.group(1)}@${{FORGEJO_MCP_VERSION}}"', runs)
        # forgejo-mcp v2.18.0's go.mod says `go 1.25.0`; with GOTOOLCHAIN=local
        # an older Go image would fail the build rather than fetch a toolchain.
        go_image = instructions[0].args.split()[0]
        match = re.search(r"golang:(\d+)\.(\d+)", go_image)
        assert match is not None
        self.assertGreaterEqual((int(match.group(1)), int(match.group(2))), (1, 25))
        self.assertIn("GOTOOLCHAIN=local", runs)

    def test_version_arg_defaults_to_the_pin(self) -> None:
        """
        Every stage that declares FORGEJO_MCP_VERSION defaults it to
        deploy/forgejo-mcp.version, the one place the version lives.
        """
        args = [
            i for i in containerfile() if i.keyword == "ARG" and "FORGEJO_MCP_VERSION" in i.args
        ]
        self.assertTrue(args)
        for arg in args:
            self.assertEqual(arg.args, f"FORGEJO_MCP_VERSION={pin()}", arg.stage)

    def test_runtime_runs_as_65532_with_state_on_data(self) -> None:
        instructions = containerfile()
        (user,) = final(instructions, "USER")
        self.assertEqual(user.args.split(":")[0], "65532")
        (volume,) = final(instructions, "VOLUME")
        self.assertEqual(volume.args, "/data")
        self.assertEqual(image_env(instructions)["FJMCP_DATA_DIR"], "/data")
        # The volume's mount point belongs to that user, so a new named
        # volume is created writable for it.
        runs = " ".join(i.args for i in final(instructions, "RUN"))
        self.assertIn("chown 65532:65532 /data", runs)

    def test_healthcheck_and_entrypoint(self) -> None:
        instructions = containerfile()
        command = healthcheck_command(instructions)
        listen = image_env(instructions)["FJMCP_LISTEN"]
        port = re.match(r"tcp:(\d+):", listen)
        assert port is not None
        self.assertIn(f"http://127.0.0.1:{port.group(1)}/healthz", command[-1])
        (expose,) = final(instructions, "EXPOSE")
        self.assertEqual(expose.args, port.group(1))
        (entrypoint,) = final(instructions, "ENTRYPOINT")
        self.assertEqual(exec_form(entrypoint), ["twistd", "--nodaemon", "--pidfile=", "fjmcp"])
        # twistd is the virtualenv's: its bin directory leads PATH.
        self.assertTrue(image_env(instructions)["PATH"].startswith("/opt/fjmcp/bin:"))
        self.assertIn("python -m venv /opt/fjmcp", " ".join(i.args for i in instructions))

    def test_build_info_is_stamped(self) -> None:
        """
        The build arguments `make image` passes are the ones the
        Containerfile declares, and the revision and date reach the
        runtime's environment, where fjmcp.buildinfo reads them.
        """
        command = make_image_command()
        passed = {
            command[i + 1].partition("=")[0] for i, a in enumerate(command) if a == "--build-arg"
        }
        declared = {i.args.partition("=")[0] for i in containerfile() if i.keyword == "ARG"}
        self.assertEqual(passed, declared)
        self.assertIn(f"FORGEJO_MCP_VERSION={pin()}", command)
        env = image_env(containerfile())
        self.assertEqual(env["FJMCP_BUILD_REVISION"], "${FJMCP_BUILD_REVISION}")
        self.assertEqual(env["FJMCP_BUILD_DATE"], "${FJMCP_BUILD_DATE}")
        # HEALTHCHECK survives only in docker format; podman needs telling.
        self.assertIn("--format", command)
        self.assertEqual(command[command.index("--format") + 1], "docker")

    def test_image_env_and_example_make_a_valid_config(self) -> None:
        """
        The image's environment plus the Quadlet env example, with the
        deployed paths mapped onto placeholder files, is a configuration the
        broker accepts.
        """
        files = Placeholders(self)
        environ = {
            k: v for k, v in image_env(containerfile()).items() if k in KNOWN_SETTINGS
        } | parse_env_file(PODMAN_ENV)
        mapped = {
            k: v.replace("/data/secret.key", str(files.key))
            .replace("/data", str(files.dir / "data"))
            .replace("/usr/local/bin/forgejo-mcp", str(files.forgejo_mcp))
            for k, v in environ.items()
        }
        config = files.config(mapped)
        self.assertEqual(config.listen, ("tcp:8080:interface=0.0.0.0",))
        self.assertEqual(config.data_dir, files.dir / "data")
        self.assertEqual(config.public_url, "https://mcp.example.org")
        self.assertEqual(config.secret_key_file, files.key)
        self.assertIn(ipaddress.ip_network("127.0.0.1/32"), config.trusted_proxies)
        self.assertEqual(config.warnings, ())

    def test_examples_mention_only_settings_the_broker_reads(self) -> None:
        """
        A misspelt variable in an env file is silently ignored by the
        broker, so the examples must not teach one.
        """
        for example in (PODMAN_ENV, SYSTEMD_ENV):
            for name in mentioned_settings(example):
                self.assertIn(name, KNOWN_SETTINGS, f"{example.name}: {name}")


class QuadletTests(TestCase):
    def setUp(self) -> None:
        self.unit = parse_unit(QUADLET)

    def test_state_on_the_named_volume(self) -> None:
        (volume,) = final(containerfile(), "VOLUME")
        self.assertEqual(values(self.unit, "Container", "Volume"), [f"fjmcp-state:{volume.args}"])

    def test_port_published_on_loopback_only(self) -> None:
        (expose,) = final(containerfile(), "EXPOSE")
        ports = values(self.unit, "Container", "PublishPort")
        self.assertEqual(ports, [f"127.0.0.1:8080:{expose.args}"])
        self.assertEqual(values(self.unit, "Container", "Network"), [])

    def test_settings_in_an_env_file_outside_the_unit(self) -> None:
        """
        Secrets are in a 0600 env file in the user's config directory, not
        in the unit (which lives in ~/.config/containers/systemd/), and the
        example says where to put it and with which mode.
        """
        env_file = one(self.unit, "Container", "EnvironmentFile")
        self.assertEqual(env_file, "%h/.config/fjmcp/fjmcp-broker.env")
        self.assertEqual(values(self.unit, "Container", "Environment"), [])
        self.assertNotIn("SECRET", QUADLET.read_text().replace("secret key", ""))
        example = PODMAN_ENV.read_text()
        self.assertIn(
            "install -m 600 deploy/podman/fjmcp-broker.env.example "
            "~/.config/fjmcp/fjmcp-broker.env",
            example,
        )

    def test_image_is_what_make_image_builds(self) -> None:
        command = make_image_command()
        tag = command[command.index("-t") + 1]
        self.assertEqual(one(self.unit, "Container", "Image"), tag)

    def test_health_command_matches_the_image(self) -> None:
        """
        The same command as the image's HEALTHCHECK, in the JSON form: Quadlet
        drops the closing quote of a shell-form value that ends in one
        (tests/test_podman_quadlet.py runs what Quadlet makes of it).
        """
        health = one(self.unit, "Container", "HealthCmd")
        self.assertEqual(json.loads(health), healthcheck_command(containerfile()))

    def test_podman_waits_as_long_as_systemd(self) -> None:
        """
        podman's own stop timeout (10 s unless told) would kill the broker
        before the unit's TimeoutStopSec= lets it end its children.
        """
        self.assertEqual(
            one(self.unit, "Container", "StopTimeout"), one(self.unit, "Service", "TimeoutStopSec")
        )

    def test_limits_fit_the_default_caps(self) -> None:
        nofile = one(self.unit, "Container", "Ulimit")
        self.assertTrue(nofile.startswith("nofile="), nofile)
        soft, hard = (int(v) for v in nofile.removeprefix("nofile=").split(":"))
        self.assertEqual(soft, hard)
        self.assertGreaterEqual(soft, default_descriptors_needed())
        self.assertGreaterEqual(int(one(self.unit, "Container", "PidsLimit")), default_tasks())

    def test_no_privileges(self) -> None:
        self.assertEqual(one(self.unit, "Container", "User"), "65532")
        self.assertEqual(one(self.unit, "Container", "DropCapability"), "ALL")
        self.assertEqual(one(self.unit, "Container", "NoNewPrivileges"), "true")


def unit_copy(test: TestCase, *paths: Path) -> Path:
    """
    The units in a temporary directory, ExecStart pointing at this
    virtualenv's twistd (which exists) instead of /opt/fjmcp/venv's.
    """
    directory = Path(test.mktemp()).resolve()
    directory.mkdir()
    for path in paths:
        text = path.read_text().replace("/opt/fjmcp/venv/bin/twistd", TWISTD)
        (directory / path.name).write_text(text)
    return directory


def _default(name: str) -> str:
    default = next(o.default for o in OPTIONS if o.name == name)
    assert default is not None
    return default


def default_descriptors_needed() -> int:
    """
    What a broker with the default caps may hold open (L{resources}).
    """
    return resources.descriptors_needed(
        int(_default("max-sessions")),
        int(_default("max-children")),
        int(_default("max-requests-per-user")),
        int(_default("max-children-per-user")),
    )


def default_tasks() -> int:
    return resources.tasks_needed(
        int(_default("max-children")), int(_default("max-children-per-user"))
    )


class SystemdUnitTests(TestCase):
    def setUp(self) -> None:
        self.service = parse_unit(SERVICE)
        self.socket = parse_unit(SOCKET)

    def test_limits_fit_the_default_caps(self) -> None:
        """
        LimitNOFILE= and TasksMax= leave room for a broker at its default
        caps, so it refuses sessions (503) before the kernel refuses it.
        """
        self.assertGreaterEqual(
            int(one(self.service, "Service", "LimitNOFILE")), default_descriptors_needed()
        )
        self.assertGreaterEqual(int(one(self.service, "Service", "TasksMax")), default_tasks())

    def test_verify(self) -> None:
        """
        systemd-analyze verify accepts both units without a warning (an
        unknown or misspelt key is only a warning to it).
        """
        reason = tool_missing("systemd-analyze")
        if reason:
            raise SkipTest(reason)
        directory = unit_copy(self, SERVICE, SOCKET)
        result = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", "./fjmcp.socket", "./fjmcp.service"],
            cwd=directory,
            capture_output=True,
            text=True,
        )
        output = result.stdout + result.stderr
        self.assertEqual(result.returncode, 0, output)
        ours = [line for line in output.splitlines() if "fjmcp" in line]
        self.assertEqual(ours, [], output)

    def test_verify_notices_a_missing_executable(self) -> None:
        """
        The check above is a real one: the unit as shipped, on a machine
        without /opt/fjmcp, fails it.
        """
        reason = tool_missing("systemd-analyze")
        if reason:
            raise SkipTest(reason)
        if Path("/opt/fjmcp/venv/bin/twistd").exists():
            raise SkipTest("fjmcp is installed in /opt/fjmcp here")
        directory = Path(self.mktemp())
        directory.mkdir()
        shutil.copy(SERVICE, directory)
        result = subprocess.run(
            ["systemd-analyze", "verify", "--man=no", "./fjmcp.service"],
            cwd=directory,
            capture_output=True,
            text=True,
        )
        self.assertNotEqual(result.returncode, 0)
        self.assertIn("/opt/fjmcp/venv/bin/twistd", result.stderr)

    def test_sandbox_exposure(self) -> None:
        """
        systemd's own sandboxing review rates the service 2.0 or better
        ("OK"; 0 is fully locked down, 10 is no sandbox at all).
        """
        reason = tool_missing("systemd-analyze")
        if reason:
            raise SkipTest(reason)
        directory = unit_copy(self, SERVICE)
        result = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", "--threshold=20", "./fjmcp.service"],
            cwd=directory,
            capture_output=True,
            text=True,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_children_can_reach_forgejo(self) -> None:
        """
        The sandbox leaves what the broker and forgejo-mcp need: IPv4 and
        IPv6 to reach Forgejo, UNIX sockets for the journal and --listen unix:.
        """
        families = set(one(self.service, "Service", "RestrictAddressFamilies").split())
        self.assertEqual(families, {"AF_INET", "AF_INET6", "AF_UNIX"})
        self.assertEqual(one(self.service, "Service", "ProtectSystem"), "strict")
        self.assertEqual(one(self.service, "Service", "NoNewPrivileges"), "yes")
        self.assertEqual(one(self.service, "Service", "PrivateTmp"), "yes")

    def test_no_memory_deny_write_execute(self) -> None:
        """
        MemoryDenyWriteExecute= would break every https request to Forgejo:
        pyOpenSSL's callbacks (through cffi) need writable executable memory.
        The kernel's PR_SET_MDWE is the same restriction as the systemd
        option; under it, the broker's TLS setup fails.  When this no longer
        fails, the option can be turned on.
        """
        self.assertEqual(values(self.service, "Service", "MemoryDenyWriteExecute"), [])
        probe = textwrap.dedent(
            """
            import ctypes, sys
            if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:
                sys.exit(3)  # PR_SET_MDWE: Linux >= 6.3
            from OpenSSL import SSL
            SSL.Context(SSL.TLS_CLIENT_METHOD).set_info_callback(lambda *a: None)
            """
        )
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
        )
        if result.returncode == 3:
            raise SkipTest("this kernel has no PR_SET_MDWE (Linux >= 6.3)")
        self.assertNotEqual(result.returncode, 0, "pyOpenSSL works under MDWE now")
        self.assertIn("write+execute memory", result.stderr)

    def test_runs_twistd_like_the_image(self) -> None:
        argv = shlex.split(one(self.service, "Service", "ExecStart"))
        (entrypoint,) = final(containerfile(), "ENTRYPOINT")
        self.assertEqual(argv[0], "/opt/fjmcp/venv/bin/twistd")
        self.assertEqual(argv[1:], exec_form(entrypoint)[1:])

    def test_secrets_come_as_credentials(self) -> None:
        """
        The key and the client secret reach the service through
        LoadCredential (root-owned sources, a copy only the service reads),
        and the unit points the broker at those copies.
        """
        credentials = dict(
            v.split(":", 1) for v in values(self.service, "Service", "LoadCredential")
        )
        self.assertEqual(
            credentials,
            {"secret.key": "/etc/fjmcp/secret.key", "client-secret": "/etc/fjmcp/client-secret"},
        )
        environment = dict(v.split("=", 1) for v in values(self.service, "Service", "Environment"))
        self.assertEqual(environment["FJMCP_SECRET_KEY_FILE"], "%d/secret.key")
        self.assertEqual(environment["FJMCP_FORGEJO_CLIENT_SECRET_FILE"], "%d/client-secret")
        self.assertEqual(environment["FJMCP_DATA_DIR"], "%S/fjmcp")
        self.assertEqual(one(self.service, "Service", "StateDirectory"), "fjmcp")
        self.assertEqual(
            values(self.service, "Service", "EnvironmentFile"),
            ["/etc/fjmcp/fjmcp.env", "-/opt/fjmcp/build.env"],
        )

    def test_env_example_with_the_unit_makes_a_valid_config(self) -> None:
        """
        The unit's Environment= (specifiers resolved as systemd would) and
        the example env file, which overrides it, make a configuration the
        broker accepts; the secrets are not in the env file.
        """
        files = Placeholders(self)
        state = files.dir / "state"
        credentials = files.dir / "credentials"
        credentials.mkdir()
        shutil.copy(files.key, credentials / "secret.key")
        shutil.copy(files.client_secret, credentials / "client-secret")
        environ = {
            k: v.replace("%S", str(state)).replace("%d", str(credentials))
            for k, v in (
                item.split("=", 1) for item in values(self.service, "Service", "Environment")
            )
        }
        example = parse_env_file(SYSTEMD_ENV)
        self.assertFalse({"FJMCP_FORGEJO_CLIENT_SECRET", "FJMCP_SECRET_KEY_FILE"} & set(example))
        environ |= example
        environ["FJMCP_FORGEJO_MCP"] = str(files.forgejo_mcp)
        config = files.config(environ)
        self.assertEqual(config.listen, ("tcp:8080:interface=127.0.0.1",))
        self.assertEqual(config.data_dir, state / "fjmcp")
        self.assertEqual(config.forgejo_client_secret, "gto_placeholder_secret")
        self.assertEqual(config.warnings, ())

    def test_socket_name_matches_the_listen_example(self) -> None:
        name = one(self.socket, "Socket", "FileDescriptorName")
        self.assertEqual(socket_listen_example(), f"systemd:domain=INET:name={name}")
        host = one(self.socket, "Socket", "ListenStream").rpartition(":")[0]
        self.assertTrue(ipaddress.ip_address(host).is_loopback)
        self.assertEqual(one(self.socket, "Socket", "Service"), SERVICE.name)

    def test_sysusers_creates_the_service_user(self) -> None:
        reason = tool_missing("systemd-sysusers")
        if reason:
            raise SkipTest(reason)
        root = Path(self.mktemp()).resolve()
        (root / "etc").mkdir(parents=True)
        subprocess.run(
            ["systemd-sysusers", f"--root={root}", str(SYSUSERS)],
            check=True,
            capture_output=True,
        )
        users = {
            line.split(":")[0]: line.split(":")
            for line in (root / "etc" / "passwd").read_text().splitlines()
        }
        user = one(self.service, "Service", "User")
        self.assertIn(user, users)
        self.assertEqual(
            users[user][5], "/var/lib/" + one(self.service, "Service", "StateDirectory")
        )
        self.assertEqual(users[user][6], "/usr/sbin/nologin")
        self.assertLess(int(users[user][2]), 1000, "a system user")


class VersionPinTests(TestCase):
    def test_one_version_everywhere(self) -> None:
        """
        Wherever the repository names a forgejo-mcp version, it is the one
        in deploy/forgejo-mcp.version, or (outside what deploys) the newest
        release the tests also run.
        """
        version = pin()
        major = re.match(r"v?(\d+)\.", version)
        assert major is not None
        files = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        pattern = re.compile(rf"(?<![\w.])v?{major.group(1)}\.\d+\.\d+(?![\w.])")
        found = []
        for name in files:
            if "node_modules" in name or name.endswith((".lock", ".json", ".txt")):
                continue
            path = ROOT / name
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError):
                continue
            for match in pattern.finditer(text):
                before = text[max(0, match.start() - 120) : match.start()].lower()
                if "forgejo-mcp" in before or "forgejo_mcp" in before or "upstream tag" in before:
                    found.append((name, match.group(0)))
        self.assertIn(("Containerfile", version), found)
        # The newest release is tested beside the pin; only the pin deploys.
        newest = (ROOT / "tests" / "forgejo-mcp-newest.version").read_text().strip()
        allowed = {version.lstrip("v")}
        self.assertEqual(
            [
                f
                for f in found
                if f[1].lstrip("v") not in allowed
                and (
                    f[1].lstrip("v") != newest.lstrip("v")
                    or f[0].startswith(("deploy/", "Containerfile"))
                )
            ],
            [],
        )


class BuildInfoTests(TestCase):
    def test_stamped_values(self) -> None:
        info = read_build_info(STAMPED, source_root=None)
        self.assertEqual(info, BuildInfo(__version__, REVISION, BUILD_DATE))
        self.assertEqual(
            info.describe(), f"fjmcp {__version__} (revision {REVISION}, built {BUILD_DATE})"
        )

    def test_unknown_without_stamps_or_checkout(self) -> None:
        info = read_build_info({}, source_root=Path(self.mktemp()))
        self.assertEqual((info.revision, info.date), ("unknown", "unknown"))

    def test_junk_stamps_are_not_shown(self) -> None:
        """
        A stamp with spaces or control characters (a broken build script)
        is not copied into logs and JSON.
        """
        info = read_build_info(
            {"FJMCP_BUILD_REVISION": "abc\n$(x)", "FJMCP_BUILD_DATE": " "}, source_root=None
        )
        self.assertEqual((info.revision, info.date), ("unknown", "unknown"))

    def test_revision_from_a_checkout_without_git(self) -> None:
        """
        A source checkout's revision is read from .git's files: a branch
        (loose or packed), a detached HEAD, a linked worktree.
        """
        commit = "0123456789abcdef0123456789abcdef01234567"
        other = "fedcba9876543210fedcba9876543210fedcba98"
        root = Path(self.mktemp()).resolve()
        git = root / ".git"
        (git / "refs" / "heads").mkdir(parents=True)
        (git / "HEAD").write_text("ref: refs/heads/main\n")
        (git / "packed-refs").write_text(f"# pack-refs with: peeled\n{commit} refs/heads/main\n")
        self.assertEqual(git_revision(root), commit)
        self.assertEqual(read_build_info({}, source_root=root).revision, commit[:12])
        (git / "refs" / "heads" / "main").write_text(other + "\n")
        self.assertEqual(git_revision(root), other)
        (git / "HEAD").write_text(commit + "\n")
        self.assertEqual(git_revision(root), commit)
        worktree = root / "wt"
        (git / "worktrees" / "wt").mkdir(parents=True)
        (git / "worktrees" / "wt" / "HEAD").write_text("ref: refs/heads/main\n")
        (git / "worktrees" / "wt" / "commondir").write_text("../..\n")
        worktree.mkdir()
        (worktree / ".git").write_text(f"gitdir: {git / 'worktrees' / 'wt'}\n")
        self.assertEqual(git_revision(worktree), other)
        self.assertIsNone(git_revision(root / "nowhere"))


def git_head() -> str:
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return head[:12] if head else "unknown"


class DeployedDaemonTests(TestCase):
    """
    twistd fjmcp run as the systemd unit runs it: the unit's ExecStart and
    Environment=, the example env file adapted to loopback, the build info
    an image would carry.
    """

    def unit_daemon(self) -> Daemon:
        daemon = Daemon(self)
        service = parse_unit(SERVICE)
        argv = shlex.split(one(service, "Service", "ExecStart"))
        # The log goes to a file here (journald in production) so the
        # harness can read it.
        daemon.argv = [TWISTD, *argv[1:-1], f"--logfile={daemon.log}", argv[-1]]
        credentials = daemon.dir / "credentials"
        credentials.mkdir()
        shutil.copy(daemon.dir / "secret.key", credentials / "secret.key")
        shutil.copy(daemon.dir / "client-secret", credentials / "client-secret")
        for item in values(service, "Service", "Environment"):
            name, _, value = item.partition("=")
            daemon.env[name] = value.replace("%S", str(daemon.dir / "state")).replace(
                "%d", str(credentials)
            )
        daemon.env |= parse_env_file(SYSTEMD_ENV)
        daemon.env |= {
            "FJMCP_PUBLIC_URL": "http://127.0.0.1:8080",
            "FJMCP_FORGEJO_URL": "http://127.0.0.1:3000",
            "FJMCP_FORGEJO_MCP": str(daemon.dir / "forgejo-mcp"),
            "FJMCP_LISTEN": "tcp:0:interface=127.0.0.1",
            **STAMPED,
        }
        return daemon

    async def test_health_shows_build_info(self) -> None:
        daemon = self.unit_daemon()
        daemon.start()
        port = await daemon.port()
        response = await http_client().get(f"http://127.0.0.1:{port}/healthz")
        self.assertEqual(response.code, 200)
        body = await response.json()
        self.assertEqual(body["status"], "ok")
        self.assertEqual(body["version"], __version__)
        self.assertEqual(
            body["build"], {"version": __version__, "revision": REVISION, "date": BUILD_DATE}
        )
        self.assertIn(
            f"fjmcp {__version__} (revision {REVISION}, built {BUILD_DATE})", daemon.log_text()
        )
        self.assertTrue((daemon.dir / "state" / "fjmcp" / "broker.db").exists())

        # The image's health check command, aimed at this daemon's port:
        # healthy now, unhealthy once it is gone.
        command = healthcheck_command(containerfile())
        command = [sys.executable, *command[1:-1], command[-1].replace(":8080/", f":{port}/")]
        healthy = subprocess.run(command, capture_output=True, timeout=30)
        self.assertEqual(healthy.returncode, 0, healthy.stderr)
        self.assertEqual((await daemon.terminate())[0], 0)
        gone = subprocess.run(command, capture_output=True, timeout=30)
        self.assertNotEqual(gone.returncode, 0)

    async def test_socket_activation_as_shipped(self) -> None:
        """
        fjmcp.socket's named descriptor, with the FJMCP_LISTEN the env
        example gives for it, is where the broker serves.
        """
        name = one(parse_unit(SOCKET), "Socket", "FileDescriptorName")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        self.addCleanup(listener.close)
        daemon = self.unit_daemon()
        daemon.env["FJMCP_LISTEN"] = socket_listen_example()
        response = await daemon.start_socket_activated(listener, name)
        self.assertEqual(response.code, 200)
        self.assertEqual((await response.json())["build"]["revision"], REVISION)
        self.assertEqual((await daemon.terminate())[0], 0)

    def test_version_flag(self) -> None:
        """
        `twistd fjmcp --version` needs no configuration and prints the
        build info; from this checkout without stamps, git's revision.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("FJMCP_")}
        stamped = subprocess.run(
            [TWISTD, "fjmcp", "--version"],
            env=env | STAMPED,
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.assertEqual(stamped.returncode, 0, stamped.stderr)
        self.assertEqual(
            stamped.stdout, f"fjmcp {__version__} (revision {REVISION}, built {BUILD_DATE})\n"
        )
        # HEAD may move while this runs (commits in the same checkout).
        before = git_head()
        plain = subprocess.run(
            [TWISTD, "fjmcp", "--version"], env=env, capture_output=True, text=True, timeout=60
        )
        self.assertEqual(plain.returncode, 0, plain.stderr)
        self.assertIn(
            plain.stdout,
            {
                f"fjmcp {__version__} (revision {head}, built unknown)\n"
                for head in (before, git_head())
            },
        )
