"""
Configuration as an operator meets it: flags, FJMCP_* variables, defaults,
and every mistake reported at once.
"""

from __future__ import annotations

import base64
import io
import os
import stat
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import LogLevel
from twisted.trial.unittest import SynchronousTestCase

from fjmcp.config import (
    DEFAULT_LISTEN,
    OPTIONS,
    ConfigError,
    Options,
    build_config,
    parse_duration,
    parse_public_url,
    parse_secret_key,
)


def make_files(tmp: Path) -> dict[str, str]:
    key = tmp / "secret.key"
    key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
    key.chmod(0o600)
    secret = tmp / "client-secret"
    secret.write_text("the-client-secret\n")
    binary = tmp / "forgejo-mcp"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    return {"key": str(key), "secret": str(secret), "binary": str(binary)}


def good_argv(files: dict[str, str], data_dir: str) -> list[str]:
    return [
        "--public-url=https://mcp.example.org",
        "--forgejo-url=https://forgejo.example.org/",
        "--forgejo-client-id=client-1",
        f"--forgejo-client-secret-file={files['secret']}",
        f"--secret-key-file={files['key']}",
        f"--forgejo-mcp={files['binary']}",
        f"--data-dir={data_dir}",
    ]


class ParseTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tmp = Path(self.mktemp())
        self.tmp.mkdir()
        self.files = make_files(self.tmp)
        self.data_dir = str(self.tmp / "data")

    def parse(self, argv: list[str], environ: dict[str, str] | None = None) -> Options:
        options = Options()
        options.environ = environ or {}
        options.exit_on_error = False
        options.parseOptions(argv)
        return options

    def test_flags(self) -> None:
        """
        Real argv parses into a typed config; URLs are normalised and the
        data directory is created.
        """
        config = self.parse(
            [*good_argv(self.files, self.data_dir), "--max-sessions=7", "--log-level=debug"]
        ).config
        assert config is not None
        self.assertEqual(config.public_url, "https://mcp.example.org")
        self.assertEqual(config.mcp_url, "https://mcp.example.org/mcp")
        self.assertEqual(config.forgejo_url, "https://forgejo.example.org")
        self.assertEqual(config.forgejo_client_secret, "the-client-secret")
        self.assertEqual(config.max_sessions, 7)
        self.assertEqual(config.log_level, LogLevel.debug)
        # The limits that make every request end, at their defaults.
        self.assertEqual(config.request_timeout, 300.0)
        self.assertEqual(config.session_unused_timeout, 120.0)
        self.assertEqual(config.max_requests_per_user, 64)
        self.assertEqual((config.max_children, config.max_children_per_user), (100, 5))
        self.assertEqual(config.listen, (DEFAULT_LISTEN,))
        self.assertEqual(len(config.secret_key), 32)
        self.assertTrue(Path(self.data_dir).is_dir())
        self.assertEqual(config.db_path, Path(self.data_dir).resolve() / "broker.db")

    def test_children_per_user_never_above_children(self) -> None:
        config = self.parse([*good_argv(self.files, self.data_dir), "--max-children=3"]).config
        assert config is not None
        self.assertEqual((config.max_children, config.max_children_per_user), (3, 3))

    def test_environment_fallback(self) -> None:
        """
        Every option can come from FJMCP_<NAME>; a flag wins; an empty
        variable counts as unset (the default applies).
        """
        environ = {
            "FJMCP_PUBLIC_URL": "https://from-env.example.org",
            "FJMCP_FORGEJO_URL": "https://forgejo.example.org",
            "FJMCP_FORGEJO_CLIENT_ID": "env-client",
            "FJMCP_FORGEJO_CLIENT_SECRET": "env-secret",
            "FJMCP_SECRET_KEY_FILE": self.files["key"],
            "FJMCP_FORGEJO_MCP": self.files["binary"],
            "FJMCP_DATA_DIR": self.data_dir,
            "FJMCP_MAX_SESSIONS": "12",
            "FJMCP_MAX_SESSIONS_PER_USER": "",
            "FJMCP_LISTEN": "tcp:0:interface=127.0.0.1 unix:" + str(self.tmp / "s.sock"),
        }
        config = self.parse(["--max-sessions=3"], environ).config
        assert config is not None
        self.assertEqual(config.public_url, "https://from-env.example.org")
        self.assertEqual(config.forgejo_client_secret, "env-secret")
        self.assertEqual(config.max_sessions, 3)
        self.assertEqual(config.max_sessions_per_user, 20)
        self.assertEqual(len(config.listen), 2)

    def test_every_option_has_an_environment_variable(self) -> None:
        """
        The env names follow one rule, so the docs and unit files can rely on it.
        """
        for option in OPTIONS:
            self.assertEqual(option.env, "FJMCP_" + option.name.upper().replace("-", "_"))

    def test_all_mistakes_at_once(self) -> None:
        """
        Several mistakes: every one is reported, one line each, naming the
        flag or variable it came from.
        """
        environ = {"FJMCP_MAX_SESSIONS": "lots"}
        with self.assertRaises(ConfigError) as cm:
            build_config(
                {
                    "public-url": "http://mcp.example.org",
                    "session-idle-timeout": "soon",
                    "log-format": "xml",
                    "forgejo-mcp": str(self.tmp / "missing-binary"),
                    "trusted-proxies": "10.0.0.0/8 not-an-ip",
                    "request-timeout": "0",
                    "max-requests-per-user": "many",
                },
                ["bogus:123"],
                environ,
            )
        problems = cm.exception.problems
        joined = "\n".join(problems)
        for needle in [
            "--public-url: must use https",
            "FJMCP_MAX_SESSIONS: not a whole number: 'lots'",
            "--session-idle-timeout: not a duration",
            "--log-format: unknown log format 'xml'",
            "--trusted-proxies: not an IP address or CIDR network: 'not-an-ip'",
            "--listen: not a usable endpoint description 'bogus:123'",
            "--forgejo-url: required",
            "--forgejo-client-id: required",
            "--secret-key-file: required",
            "forgejo-mcp binary",
            "--forgejo-client-secret-file (or --forgejo-client-secret): required",
            "--request-timeout: must be longer than zero: '0'",
            "--max-requests-per-user: not a whole number: 'many'",
        ]:
            self.assertIn(needle, joined)
        self.assertEqual(len(problems), 13, joined)
        for line in problems:
            self.assertNotIn("\n", line)

    def test_postoptions_exits_2(self) -> None:
        """
        Through twistd's option parsing, a bad config prints the problems
        and exits with status 2 rather than raising a traceback.
        """
        options = Options()
        # Whether a forgejo-mcp is on PATH must not change the count.
        options.environ = {"FJMCP_FORGEJO_MCP": str(self.tmp / "missing-binary")}
        stderr = io.StringIO()
        self.patch(sys, "stderr", stderr)
        with self.assertRaises(SystemExit) as cm:
            options.parseOptions(["--public-url=ftp://x"])
        self.assertEqual(cm.exception.code, 2)
        lines = stderr.getvalue().splitlines()
        self.assertEqual(len(lines), 6)
        self.assertTrue(all(line.startswith("fjmcp: configuration error: ") for line in lines))
        self.assertIn("--public-url: not an http(s) URL: 'ftp://x'", lines[0])

    def test_binary_not_executable(self) -> None:
        os.chmod(self.files["binary"], 0o644)
        with self.assertRaises(ConfigError) as cm:
            self.parse(good_argv(self.files, self.data_dir))
        self.assertIn("is not executable", str(cm.exception))

    def test_data_dir_not_writable(self) -> None:
        if os.geteuid() == 0:
            # root writes anywhere; use a path under a regular file instead.
            target = self.files["secret"] + "/data"
        else:
            ro = self.tmp / "ro"
            ro.mkdir()
            ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
            target = str(ro / "data")
        with self.assertRaises(ConfigError) as cm:
            self.parse([*good_argv(self.files, self.data_dir), f"--data-dir={target}"])
        self.assertIn("--data-dir: cannot create", str(cm.exception))

    def test_bad_key_file(self) -> None:
        Path(self.files["key"]).write_text("too short")
        with self.assertRaises(ConfigError) as cm:
            self.parse(good_argv(self.files, self.data_dir))
        self.assertIn("must hold 32 random bytes in base64", str(cm.exception))

    def test_world_readable_key_is_a_warning(self) -> None:
        os.chmod(self.files["key"], 0o644)
        config = self.parse(good_argv(self.files, self.data_dir)).config
        assert config is not None
        self.assertIn("chmod 600", " ".join(config.warnings))

    def test_a_misspelt_variable_is_warned_about(self) -> None:
        config = self.parse(
            good_argv(self.files, self.data_dir),
            {"FJMCP_MAX_SESSION": "7", "FJMCP_HOST": "mcp.example.org", "OTHER": "x"},
        ).config
        assert config is not None
        self.assertEqual(
            [w for w in config.warnings if "not an fjmcp setting" in w],
            [
                "environment variable FJMCP_MAX_SESSION is not an fjmcp setting "
                "(did you mean FJMCP_MAX_SESSIONS?)"
            ],
        )
        # Ignored: the default stands.
        (default,) = [o.default for o in OPTIONS if o.name == "max-sessions"]
        self.assertEqual(config.max_sessions, int(default or 0))

    def test_a_systemd_credential_is_not_warned_about(self) -> None:
        """
        LoadCredential= hands the key over as 0440 in $CREDENTIALS_DIRECTORY,
        which the operator cannot change: no warning for it there, and the
        warning stays for the same mode anywhere else.
        """
        os.chmod(self.files["key"], 0o440)
        directory = str(Path(self.files["key"]).parent)
        config = self.parse(
            good_argv(self.files, self.data_dir), {"CREDENTIALS_DIRECTORY": directory}
        ).config
        assert config is not None
        self.assertNotIn("chmod 600", " ".join(config.warnings))
        elsewhere = self.parse(
            good_argv(self.files, self.data_dir), {"CREDENTIALS_DIRECTORY": "/nonexistent"}
        ).config
        assert elsewhere is not None
        self.assertIn("chmod 600", " ".join(elsewhere.warnings))

    def test_database(self) -> None:
        """
        --database names a PostgreSQL database without its password, which
        comes from its file or the service's systemd credential and counts
        as a secret; every mistake in it is reported, the password never.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        (directory / "database-password").write_text("pg-secret\n")
        url = "postgresql://fjmcp@db.example.org:5432/fjmcp?sslmode=require"
        config = self.parse(
            [*good_argv(self.files, self.data_dir), f"--database={url}"],
            {"CREDENTIALS_DIRECTORY": str(directory)},
        ).config
        assert config is not None
        self.assertEqual((config.database, config.database_password), (url, "pg-secret"))
        self.assertIn("pg-secret", config.secrets())
        self.assertNotIn("pg-secret", repr(config))
        for bad, expected in [
            ("postgresql://fjmcp:pg-secret@db/fjmcp", "password in it"),
            ("postgresql://fjmcp@db/fjmcp?password=pg-secret", "password in it"),
            ("mysql://fjmcp@db/fjmcp", "must be empty"),
            ("postgresql://db/", "no user and no database"),
            ("postgresql://fjmcp@db:port/x", "not a postgresql:// URL"),
        ]:
            with self.assertRaises(ConfigError) as cm:
                self.parse([*good_argv(self.files, self.data_dir), f"--database={bad}"])
            self.assertIn(expected, str(cm.exception), bad)
            self.assertNotIn("pg-secret", str(cm.exception))
        missing = str(directory / "nope")
        with self.assertRaises(ConfigError) as cm:
            self.parse(
                [
                    *good_argv(self.files, self.data_dir),
                    f"--database={url}",
                    f"--database-password-file={missing}",
                ]
            )
        self.assertIn(f"cannot read {missing}", str(cm.exception))

    def test_secret_and_secret_file_conflict(self) -> None:
        with self.assertRaises(ConfigError) as cm:
            self.parse([*good_argv(self.files, self.data_dir), "--forgejo-client-secret=x"])
        self.assertIn("give only one", str(cm.exception))

    def test_secrets_not_in_repr(self) -> None:
        config = self.parse(good_argv(self.files, self.data_dir)).config
        assert config is not None
        text = repr(config)
        self.assertNotIn("the-client-secret", text)
        for secret in config.secrets():
            self.assertNotIn(secret, text)

    def test_port_out_of_range(self) -> None:
        """
        A TCP port outside 0..65535 (``--listen tcp:80800`` from the issue)
        is a configuration mistake reported with the others, not an
        OverflowError from a daemon that then runs on with nothing listening.
        """
        with self.assertRaises(ConfigError) as cm:
            self.parse(
                [
                    *good_argv(self.files, self.data_dir),
                    "--listen=tcp:80800",
                    "--listen=tcp6:port=-1:interface=\\:\\:1",
                    "--listen=tcp:65535:interface=127.0.0.1",
                    "--listen=tcp:0:interface=127.0.0.1",
                    "--metrics-listen=tcp:70000:interface=127.0.0.1",
                    "--max-sessions=none",
                ]
            )
        problems = cm.exception.problems
        joined = "\n".join(problems)
        self.assertEqual(len(problems), 4, joined)
        self.assertIn("--listen: 'tcp:80800': port 80800 is outside 0..65535", joined)
        self.assertIn("port -1 is outside 0..65535", joined)
        self.assertIn("--metrics-listen: 'tcp:70000:interface=127.0.0.1': port 70000", joined)
        self.assertIn("--max-sessions", joined)


class ValueParserTests(SynchronousTestCase):
    @given(st.integers(1, 10**6))
    def test_duration_seconds(self, n: int) -> None:
        self.assertEqual(parse_duration(str(n)), n)
        self.assertEqual(parse_duration(f"{n}s"), n)

    @given(st.integers(0, 48), st.integers(0, 59), st.integers(0, 59))
    def test_duration_units(self, h: int, m: int, s: int) -> None:
        text = "".join(f"{v}{u}" for v, u in ((h, "h"), (m, "m"), (s, "s")) if v)
        if not text:
            return
        self.assertEqual(parse_duration(text), h * 3600 + m * 60 + s)

    @given(st.text(max_size=12))
    def test_duration_never_crashes(self, text: str) -> None:
        """
        Any input gives a positive number of seconds or a ValueError with a
        message, never another exception.
        """
        try:
            value = parse_duration(text)
        except ValueError as e:
            self.assertTrue(str(e))
        else:
            self.assertGreater(value, 0)

    def test_public_url(self) -> None:
        self.assertEqual(parse_public_url("https://mcp.example.org/"), "https://mcp.example.org")
        self.assertEqual(parse_public_url("http://127.0.0.1:8080"), "http://127.0.0.1:8080")
        self.assertEqual(parse_public_url("http://[::1]:8080"), "http://[::1]:8080")
        self.assertEqual(parse_public_url("http://localhost:8080"), "http://localhost:8080")
        for bad in (
            "http://mcp.example.org",
            "https://mcp.example.org/base",
            "https://mcp.example.org/?x=1",
            "https://user:pw@mcp.example.org",
            "mcp.example.org",
            "ftp://mcp.example.org",
        ):
            self.assertRaises(ValueError, parse_public_url, bad)

    @given(st.binary(min_size=32, max_size=32), st.booleans(), st.sampled_from(["", "\n", "  \n"]))
    def test_secret_key_roundtrip(self, key: bytes, urlsafe: bool, pad: str) -> None:
        encode = base64.urlsafe_b64encode if urlsafe else base64.b64encode
        self.assertEqual(parse_secret_key(encode(key) + pad.encode()), key)

    @given(st.binary(max_size=64))
    def test_secret_key_wrong_length(self, key: bytes) -> None:
        if len(key) == 32:
            return
        self.assertRaises(ValueError, parse_secret_key, base64.b64encode(key))
