"""
The real Caddy in front of a test broker, running the shipped
deploy/caddy/Caddyfile adapted only in its site address (plain HTTP on a
loopback port, automatic HTTPS off), its upstream (the test broker), the
admin endpoint (off, so tests can run side by side) and the grace period of
its stop (short: a test's last stream need not be waited for); every other
directive is the shipped one.  Used by tests/test_caddy.py and
tests/test_conformance.py; L{run_caddy_config} runs any adapted Caddyfile
(tests/cluster_support.py: the multi-node one).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

from twisted.trial.unittest import TestCase

from tests.helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
CADDYFILE = ROOT / "deploy" / "caddy" / "Caddyfile"
SITE = "{$FJMCP_HOST} {"
UPSTREAM = "reverse_proxy 127.0.0.1:8080"
# The site that answers every other host name (421).
CATCH_ALL = "http:// {"
START_TIMEOUT = 15.0
# The global options put before an adapted Caddyfile: plain HTTP, no admin
# endpoint (tests run side by side), and a short grace_period: a stopping
# Caddy waits for its open requests, and a stream the broker keeps open (a
# GET stream, an SSE answer) would hold it there until stop() kills it five
# seconds later.
TEST_GLOBALS = "{\n\tauto_https off\n\tadmin off\n\tgrace_period 100ms\n}\n\n"


def caddy_missing() -> str | None:
    """
    Why Caddy cannot run here, or None; under CI=true its absence fails.
    """
    if shutil.which("caddy"):
        return None
    reason = "caddy is not installed (make caddy, or apt-get install caddy)"
    if os.environ.get("CI") == "true":
        raise AssertionError(f"{reason}; CI must run these tests")
    return reason


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def loopback_sites(shipped: str, port: int) -> str:
    """
    A shipped Caddyfile's two sites (the public host, and any other host
    name) on plain HTTP at 127.0.0.1:C{port}.
    """
    adapted = shipped.replace(SITE, f"http://127.0.0.1:{port} {{\n\tbind 127.0.0.1")
    return adapted.replace(CATCH_ALL, f"http://:{port} {{\n\tbind 127.0.0.1")


def loopback_caddyfile(
    shipped: str, port: int, upstream_port: int, header_up: Sequence[tuple[str, str]] = ()
) -> str:
    """
    The shipped Caddyfile with only its addresses and TLS changed, plus
    C{header_up} lines (name, value) in its C{reverse_proxy} block: headers
    Caddy adds to every request it passes to the broker.
    """
    for needle in (SITE, UPSTREAM + " {", CATCH_ALL):
        if shipped.count(needle) != 1:
            raise AssertionError(f"the shipped Caddyfile no longer has exactly one {needle!r}")
    adapted = loopback_sites(shipped, port)
    extra = "".join(f'\n\t\theader_up {name} "{value}"' for name, value in header_up)
    adapted = adapted.replace(UPSTREAM + " {", f"reverse_proxy 127.0.0.1:{upstream_port} {{{extra}")
    return TEST_GLOBALS + adapted


async def run_caddy(
    test: TestCase, port: int, upstream_port: int, header_up: Sequence[tuple[str, str]] = ()
) -> Callable[[], None]:
    """
    Run Caddy with L{loopback_caddyfile} on 127.0.0.1:C{port} until the
    test ends, and return once it listens.  The returned function stops it
    sooner (e.g. to start another one on the same port).
    """
    config = loopback_caddyfile(CADDYFILE.read_text(), port, upstream_port, header_up)
    stop, _ = await run_caddy_config(test, port, config)
    return stop


async def run_caddy_config(
    test: TestCase, port: int, config_text: str
) -> tuple[Callable[[], None], Path]:
    """
    Run Caddy with the Caddyfile C{config_text}, which listens on
    127.0.0.1:C{port}, until the test ends, and return once it listens: a
    function that stops it sooner, and the file its output goes to.
    """
    home = Path(test.mktemp()).resolve()
    home.mkdir(parents=True)
    config = home / "Caddyfile"
    config.write_text(config_text)
    env = dict(
        os.environ,
        HOME=str(home),
        XDG_DATA_HOME=str(home / "data"),
        XDG_CONFIG_HOME=str(home / "config"),
    )
    log = (home / "caddy.log").open("wb")
    test.addCleanup(log.close)
    process = subprocess.Popen(
        ["caddy", "run", "--config", str(config), "--adapter", "caddyfile"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )

    def stop() -> None:
        if process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    test.addCleanup(stop)

    def listening() -> bool:
        if process.poll() is not None:
            test.fail(f"caddy exited ({process.returncode}):\n{(home / 'caddy.log').read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return False
        return True

    await wait_until(listening, START_TIMEOUT, "caddy listening")
    return stop, home / "caddy.log"
