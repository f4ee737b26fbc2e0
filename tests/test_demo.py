"""
The newcomer's path: C{fjmcp-demo} started as the README says, C{fjmcp-try}
run against the URL it prints, Ctrl-C to stop; and C{fjmcp-try} itself
against a broker with the scripted child, so its OAuth flow (headless and
through a browser) and its errors are covered where the real forgejo-mcp is
missing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request

from tests.broker_support import ROOT, Broker
from tests.helpers import http_client, wait_until
from tests.test_forgejo_mcp import find_forgejo_mcp

BIN = Path(sys.executable).parent
DEMO = BIN / "fjmcp-demo"
TRY = BIN / "fjmcp-try"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def accepting(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def descendants(pid: int) -> set[int]:
    """
    Every process below C{pid}, from /proc.
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


async def fjmcp_try(*argv: str, env: dict[str, str] | None = None) -> tuple[str, str, int]:
    """
    Run C{fjmcp-try ARGV} while this reactor goes on serving: stdout,
    stderr, exit status.
    """
    out, err, code = await getProcessOutputAndValue(
        str(TRY), argv, env=env if env is not None else dict(os.environ), path=str(ROOT)
    )
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), code


def check_no_secrets(test: TestCase, text: str) -> None:
    """
    Tokens and codes never reach the terminal.
    """
    test.assertNotRegex(text, r"(access_token|refresh_token|code)=[\w.-]{8,}")
    test.assertNotIn("Bearer ", text)
    test.assertNotIn("Traceback", text)


SCRIPTED_CHILD = ROOT / "tests" / "scripted_child.py"


async def origin_status(url: str, origin: str) -> int:
    """
    How /mcp answers a browser page at C{origin} that has no token yet.
    """
    response = await http_client().post(
        url,
        data=b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}',
        headers=Headers(
            {
                b"Content-Type": [b"application/json"],
                b"Accept": [b"application/json, text/event-stream"],
                b"Origin": [origin.encode()],
            }
        ),
    )
    await response.content()
    code: int = response.code
    return code


class DemoTests(TestCase):
    """
    C{fjmcp-demo} as a newcomer runs it: with the real forgejo-mcp where it
    was built, and with the scripted child standing in for it everywhere.
    """

    timeout = 300

    async def demo(self, binary: str) -> tuple[subprocess.Popen[bytes], str, Any]:
        """
        Start the demo with C{binary} as forgejo-mcp, on free ports, in its
        own state directory; wait for its banner and check what it tells a
        newcomer.  Returns the process, its MCP URL and a function that
        reads what it printed so far.
        """
        if not Path("/proc/self/stat").exists():
            raise SkipTest("needs /proc to see the demo's processes")
        state = Path(self.mktemp()).resolve()
        state.mkdir(parents=True)
        broker_port, standin_port = free_port(), free_port()
        output = state.parent / "demo.out"
        with output.open("wb") as sink:
            demo = subprocess.Popen(
                [
                    str(DEMO),
                    f"--broker-port={broker_port}",
                    f"--standin-port={standin_port}",
                    f"--state-dir={state / 'demo'}",
                    f"--forgejo-mcp={binary}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                cwd=str(state),
                # Its own process group, as a shell job has: Ctrl-C goes to it all.
                start_new_session=True,
            )

        def kill() -> None:
            if demo.poll() is None:
                os.killpg(demo.pid, signal.SIGKILL)
                demo.wait()

        self.addCleanup(kill)

        def printed() -> str:
            return output.read_text(errors="replace")

        mcp = f"http://127.0.0.1:{broker_port}/mcp"
        await wait_until(
            lambda: "Press Ctrl-C to stop" in printed() or demo.poll() is not None,
            120,
            "the demo to start",
        )
        banner = printed()
        self.assertIsNone(demo.poll(), banner)
        self.assertRegex(banner, rf"MCP endpoint\s+{re.escape(mcp)}\n")
        suggested = re.search(r"^\s*(\S*fjmcp-try --headless --user alice \S+)$", banner, re.M)
        assert suggested is not None, banner
        self.assertTrue(suggested.group(1).endswith(f" {mcp}"), suggested.group(1))
        self.assertIn(f"claude mcp add --transport http forgejo-demo {mcp}", banner)
        self.assertIn("npx @modelcontextprotocol/inspector", banner)
        self.assertIn("alice (admin), bob, carol", banner)
        # What the banner says of MCP Inspector holds: its page may call /mcp
        # (and is asked for a token), another page may not.
        for origin in ("http://localhost:6274", "http://127.0.0.1:6274"):
            self.assertIn(origin, banner)
            self.assertEqual(await origin_status(mcp, origin), 401, origin)
        self.assertEqual(await origin_status(mcp, "http://localhost:9999"), 403)
        return demo, mcp, printed

    async def ctrl_c(self, demo: subprocess.Popen[bytes], mcp: str, printed: Any) -> None:
        """
        Ctrl-C at the demo's terminal stops it, the broker, the stand-in and
        whatever they ran.
        """
        processes = descendants(demo.pid)
        self.assertGreaterEqual(len(processes), 2)
        ports = [int(p) for p in re.findall(r"http://127\.0\.0\.1:(\d+) ", printed())]
        self.assertEqual(len(set(ports)), 2, printed())
        self.assertTrue(all(accepting(port) for port in ports))
        os.killpg(demo.pid, signal.SIGINT)
        await wait_until(lambda: demo.poll() is not None, 60, "the demo to stop")
        self.assertEqual(demo.returncode, 0, printed())
        self.assertIn("fjmcp-demo: stopped.", printed())
        self.assertNotIn("Traceback", printed())
        self.assertEqual({p for p in processes if alive(p)}, set())
        self.assertFalse(any(accepting(port) for port in ports))

    async def test_newcomer(self) -> None:
        """
        With the real forgejo-mcp: the fjmcp-try command the demo suggests
        logs in as alice, lists forgejo-mcp's tools and shows alice's user.
        """
        demo, mcp, printed = await self.demo(find_forgejo_mcp())
        out, err, code = await fjmcp_try("--headless", "--user", "alice", mcp)
        self.assertEqual(code, 0, f"stdout:\n{out}\nstderr:\n{err}")
        listed = re.search(r"^Forgejo MCP Server offers (\d+) tools:$", out, re.M)
        assert listed is not None, out
        self.assertGreater(int(listed.group(1)), 20)
        self.assertRegex(out, r"(?m)^  get_my_user_info\s+\S")
        self.assertRegex(out, r"(?m)^  list_my_repos\s+\S")
        result = out.split("\ncalling get_my_user_info {}:\n", 1)
        self.assertEqual(len(result), 2, out)
        self.assertEqual(json.loads(result[1])["Result"]["login"], "alice")
        self.assertIn("sign-in page: picking alice", err)
        check_no_secrets(self, out + err)
        await self.ctrl_c(demo, mcp, printed)

    async def test_scripted_child(self) -> None:
        """
        The same demo with the scripted child as its forgejo-mcp (so it runs
        where the real one cannot be built): the suggested command works,
        the child is given alice's Forgejo token, and Ctrl-C stops it all.
        """
        wrapper = Path(self.mktemp()).resolve()
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{SCRIPTED_CHILD}" "$@"\n')
        wrapper.chmod(0o700)
        demo, mcp, printed = await self.demo(str(wrapper))
        out, err, code = await fjmcp_try(
            "--headless", "--user", "alice", "--call", "echo", "--args", '{"hi": 1}', mcp
        )
        self.assertEqual(code, 0, f"stdout:\n{out}\nstderr:\n{err}")
        self.assertRegex(out, r"(?m)^scripted-child offers \d+ tools:$")
        self.assertEqual(json.loads(out.split('\ncalling echo {"hi": 1}:\n', 1)[1]), {"hi": 1})
        self.assertIn("sign-in page: picking alice", err)
        check_no_secrets(self, out + err)
        await self.ctrl_c(demo, mcp, printed)

    async def test_port_taken(self) -> None:
        """
        A port already in use is named, with the flag that changes it,
        before anything starts.
        """
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            port = held.getsockname()[1]
            state = Path(self.mktemp()).resolve()
            _, err, code = await getProcessOutputAndValue(
                str(DEMO),
                [
                    f"--broker-port={port}",
                    f"--standin-port={free_port()}",
                    f"--state-dir={state}",
                    f"--forgejo-mcp={sys.executable}",
                ],
                env=dict(os.environ),
            )
        self.assertEqual(code, 1)
        self.assertIn(f"port {port} on 127.0.0.1 is taken", err.decode())
        self.assertIn("--broker-port", err.decode())
        self.assertFalse(state.exists())


class FakeForgejo(Resource):
    """
    A Forgejo whose login page wants a password, as a real one does.
    """

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        if request.path.startswith(b"/login/oauth/authorize"):
            request.redirect(b"/user/login")
            request.setResponseCode(303)
            return b""
        return (
            b"<!doctype html><title>Sign In - Forgejo</title>"
            b'<form method="post" action="/user/login"><input name="user_name">'
            b'<input name="password" type="password"><button>Sign In</button></form>'
        )


FAKE_BROWSER = """#!{python}
# Plays your browser for fjmcp-try: approves, signs in at the stand-in with
# its test header, and follows the redirect back to fjmcp-try's listener.
import re, sys
from urllib.parse import urljoin
import httpx2 as httpx
url = sys.argv[1]
with httpx.Client(follow_redirects=True, headers={{"X-Standin-Login": "carol"}}) as c:
    page = c.get(url).text
    token = re.search(r'name="consent" value="([^"]+)"', page).group(1)
    action = re.search(r'<form[^>]*action="([^"]*)"', page).group(1)
    final = c.post(urljoin(url, action), data={{"consent": token, "decision": "approve"}})
    sys.exit(0 if "close this tab" in final.text else 1)
"""


class TryClientTests(TestCase):
    """
    C{fjmcp-try} against a broker whose sessions run the scripted child.
    """

    timeout = 120

    def setUp(self) -> None:
        self.broker = Broker(self, **self.broker_config())
        self.mcp = self.broker.url + "/mcp"

    def broker_config(self) -> dict[str, Any]:
        if self._testMethodName == "test_token_file":
            return {"access_token_lifetime": 1.0}
        return {}

    async def test_headless(self) -> None:
        """
        Headless, through the stand-in's own sign-in and consent pages: the
        whole flow, the tool list and the call's result, narrated on stderr.
        """
        out, err, code = await fjmcp_try(
            "--headless",
            "--user",
            "bob",
            "--call",
            "echo",
            "--args",
            '{"hello": "world"}',
            self.mcp,
        )
        self.assertEqual(code, 0, f"stdout:\n{out}\nstderr:\n{err}")
        self.assertRegex(out, r"(?m)^scripted-child offers \d+ tools:$")
        self.assertRegex(out, r"(?m)^  echo\b")
        self.assertRegex(out, r"(?m)^  whoami\b")
        result = out.split('\ncalling echo {"hello": "world"}:\n', 1)
        self.assertEqual(len(result), 2, out)
        self.assertEqual(json.loads(result[1]), {"hello": "world"})
        for step in (
            "the broker wants a token (401)",
            "protected resource metadata: " + self.broker.url,
            "authorization server metadata: " + self.broker.url,
            "registered as client ",
            "the broker's consent page",
            "the stand-in's sign-in page: picking bob",
            "the stand-in's consent page: pressing Authorize Application",
            "token endpoint issued an access token and a refresh token",
            "connected to scripted-child",
        ):
            self.assertIn(step, err)
        check_no_secrets(self, out + err)
        # Bob, not someone else, granted the broker access at Forgejo.
        bob = self.broker.forge.user_by_login("bob")
        assert bob is not None
        self.assertIsNotNone(self.broker.forge.grant_for(bob.id, "fjmcp-broker"))

    async def test_a_refused_call_is_a_tool_error(self) -> None:
        """
        A call the server refuses with a JSON-RPC error exits 1, as the help
        says of a tool that reports an error (it was 6, "the MCP session
        failed").
        """
        out, err, code = await fjmcp_try("--headless", "-q", "--call", "refuse", self.mcp)
        self.assertEqual(code, 1, f"stdout:\n{out}\nstderr:\n{err}")
        self.assertIn("(refuse failed: bad arguments)", out)

    async def test_no_default_tool(self) -> None:
        """
        Without --call, a server that has no get_my_user_info is only listed,
        with a hint.
        """
        out, err, code = await fjmcp_try("--headless", "-q", self.mcp)
        self.assertEqual(code, 0, err)
        self.assertIn("pick a tool with --call TOOL --args JSON", out)
        self.assertEqual(err, "")

    async def test_browser(self) -> None:
        """
        Without --headless the authorization URL opens in the browser and
        the redirect comes back to a loopback listener.
        """
        browser = Path(self.mktemp())
        browser.write_text(FAKE_BROWSER.format(python=sys.executable))
        browser.chmod(0o700)
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
        env["BROWSER"] = str(browser.resolve())
        out, err, code = await fjmcp_try("--call", "echo", "--args", "{}", self.mcp, env=env)
        self.assertEqual(code, 0, f"stdout:\n{out}\nstderr:\n{err}")
        self.assertIn("log in in your browser", err)
        self.assertIn("calling echo {}:\n{}", out)
        client = re.search(r"registered as client (\S+)", err)
        assert client is not None, err
        record = await self.broker.store.get_client(client.group(1))
        assert record is not None
        self.assertRegex(record.metadata["redirect_uris"][0], r"^http://127\.0\.0\.1:\d+/callback$")
        carol = self.broker.forge.user_by_login("carol")
        assert carol is not None
        self.assertIsNotNone(self.broker.forge.grant_for(carol.id, "fjmcp-broker"))

    async def test_token_file(self) -> None:
        """
        --token-file keeps the registration and tokens (mode 0600) so the
        next run logs in no more.
        """
        path = Path(self.mktemp()).resolve()
        args = ("--headless", "--list-only", "--token-file", str(path), self.mcp)
        _, err, code = await fjmcp_try(*args)
        self.assertEqual(code, 0, err)
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)
        kept = json.loads(path.read_text())
        self.assertEqual(sorted(kept), ["client_info", "expires_at", "tokens"])
        # The access token lives a second here: once the client's record of
        # its expiry has passed, the next run refreshes it.
        await wait_until(lambda: time.time() > kept["expires_at"], what="the access token's expiry")
        out, err, code = await fjmcp_try(*args)
        self.assertEqual(code, 0, err)
        self.assertIn("using the tokens kept in", err)
        self.assertIn("refreshed the access token with the kept refresh token", err)
        self.assertNotIn("registered as client", err)
        self.assertNotIn("consent page", err)
        self.assertRegex(out, r"(?m)^scripted-child offers \d+ tools:$")
        renewed = json.loads(path.read_text())
        self.assertEqual(renewed["client_info"], kept["client_info"])
        self.assertNotEqual(renewed["tokens"]["refresh_token"], kept["tokens"]["refresh_token"])
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)

    async def test_errors(self) -> None:
        """
        Each way of failing has its message and exit status, and no
        traceback.
        """
        cases: list[tuple[tuple[str, ...], int, str]] = [
            (
                ("--headless", f"http://127.0.0.1:{free_port()}/mcp"),
                3,
                "cannot reach the broker at",
            ),
            (("--headless", self.broker.url + "/nope"), 3, "answered 404"),
            (
                ("--headless", "--user", "mallory", self.mcp),
                4,
                "the stand-in has no user 'mallory'; its users are alice, bob, carol",
            ),
            (("--headless", "--deny", self.mcp), 5, "access was denied on a consent page"),
            (("--headless", "--call", "nosuch", self.mcp), 2, "the server has no tool 'nosuch'"),
            (("--headless", "--args", "[1]", self.mcp), 2, "--args must be a JSON object"),
            (("--headless", "ftp://example.org/mcp"), 2, "not an http(s) URL"),
        ]
        for argv, status, message in cases:
            _, err, code = await fjmcp_try(*argv)
            self.assertEqual((code, message in err), (status, True), f"{argv}: {err}")
            self.assertNotIn("Traceback", err)

    async def test_without_sdk(self) -> None:
        """
        Without the mcp SDK the module still imports (the broker never needs
        the SDK), and fjmcp-try says what to install.
        """
        code = (
            "import sys; sys.modules['mcp'] = None; "
            "from fjmcp_dev.try_client import main; sys.exit(main(['--headless', sys.argv[1]]))"
        )
        _, err, status = await getProcessOutputAndValue(
            sys.executable, ["-c", code, self.mcp], env=dict(os.environ), path=str(ROOT)
        )
        self.assertEqual(status, 7, err)
        self.assertIn(b"needs the MCP Python SDK", err)
        self.assertIn(b"pip install", err)
        self.assertNotIn(b"Traceback", err)

    async def test_not_the_standin(self) -> None:
        """
        --headless in front of a Forgejo that is not the stand-in says it
        cannot sign in there and what to do instead.
        """
        self.broker.forgejo_site.resource = FakeForgejo()
        _, err, code = await fjmcp_try("--headless", self.mcp)
        self.assertEqual(code, 4, err)
        self.assertIn(
            f"the login page at {self.broker.forgejo_url}/user/login is not the Forgejo "
            "stand-in of fjmcp-demo",
            err,
        )
        self.assertIn("Run without --headless to log in in your browser.", err)
