"""
C{fjmcp-demo} (C{make demo}): the broker and a Forgejo stand-in on this
machine, in one command.

Creates what a first start needs under the state directory (C{.demo/}: an
encryption key, the broker's client secret at the stand-in, the data
directory, the two processes' logs), starts the stand-in with seeded users
and the broker registered as its confidential client, the real forgejo-mcp
as the broker's child, prints the MCP URL and what to do next, and stops
both on Ctrl-C.

Which forgejo-mcp: C{--forgejo-mcp}, else C{$FJMCP_FORGEJO_MCP} (the name
the broker itself reads it from), else C{forgejo-mcp} on C{PATH} (C{make
demo} puts C{bin/} there), else C{bin/forgejo-mcp}.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, NoReturn

STANDIN_PORT = 3000
BROKER_PORT = 8080
CLIENT_ID = "fjmcp-demo"
# MCP Inspector's web UI runs on port 6274; in its direct mode the browser
# calls /mcp itself, so the broker must accept that origin.
INSPECTOR_ORIGINS = ("http://localhost:6274", "http://127.0.0.1:6274")
START_TIMEOUT = 60.0


def prepare(state: Path) -> dict[str, Path]:
    state.mkdir(parents=True, exist_ok=True)
    key = state / "secret.key"
    if not key.exists():
        key.write_text(base64.b64encode(secrets.token_bytes(32)).decode() + "\n")
    key.chmod(0o600)
    client_secret = state / "client-secret"
    if not client_secret.exists():
        client_secret.write_text("gto_" + secrets.token_hex(24) + "\n")
    client_secret.chmod(0o600)
    return {
        "key": key,
        "client_secret": client_secret,
        "data": state / "data",
        "broker_log": state / "broker.log",
        "standin_log": state / "standin.log",
    }


def wait_for(url: str, proc: subprocess.Popen[bytes], timeout: float = START_TIMEOUT) -> bool:
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback only
                return True
        except OSError:
            time.sleep(0.2)
    return False


def find_forgejo_mcp(explicit: str | None) -> str:
    """
    The forgejo-mcp binary to run, or exit with what to do about it.
    """
    if explicit:
        found = shutil.which(explicit) if os.sep not in explicit else explicit
        if found is None or not os.access(found, os.X_OK):
            fail(f"--forgejo-mcp / FJMCP_FORGEJO_MCP: {explicit} is not an executable file")
        return str(Path(found).resolve())
    for candidate in (shutil.which("forgejo-mcp"), "bin/forgejo-mcp"):
        if candidate and os.access(candidate, os.X_OK):
            return str(Path(candidate).resolve())
    fail(
        "forgejo-mcp is not available, so the broker cannot run MCP sessions.\n"
        "  Build it with `make forgejo-mcp`, put a forgejo-mcp binary on PATH, "
        "or name one with --forgejo-mcp PATH (or FJMCP_FORGEJO_MCP=PATH)."
    )


def fail(message: str) -> NoReturn:
    sys.stderr.write(f"fjmcp-demo: {message}\n")
    raise SystemExit(1)


def check_port(port: int, flag: str) -> None:
    """
    Refuse to start on a port something else holds, before anything starts.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as e:
            fail(
                f"port {port} on 127.0.0.1 is taken ({e.strerror}); is another demo running? "
                f"Pick another with {flag} PORT."
            )


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


def command_for(script: str) -> str:
    """
    How to type one of our console scripts: its bare name when it is on
    PATH, else its path in this virtualenv.
    """
    beside = Path(sys.executable).parent / script
    on_path = shutil.which(script)
    if on_path and Path(on_path).resolve() == beside.resolve():
        return script
    try:
        return str(beside.relative_to(Path.cwd()))
    except ValueError:
        return str(beside)


def seeded() -> tuple[str, str]:
    """
    The stand-in's users and repositories, in words.
    """
    from fjmcp_dev.standin.model import Forge, seed

    forge = Forge(time.time)
    seed(forge)
    users = ", ".join(f"{u.login}{' (admin)' if u.is_admin else ''}" for u in forge.users.values())
    repos = ", ".join(f"{r.owner}/{r.name}{' (private)' if r.private else ''}" for r in forge.repos)
    return users, repos


def banner(state: Path, forgejo: str, public: str, binary: str, logs: dict[str, Path]) -> str:
    mcp = f"{public}/mcp"
    users, repos = seeded()
    try_cmd = command_for("fjmcp-try")
    needs_sdk = (
        ""
        if importlib.util.find_spec("mcp") is not None
        else "\n      (fjmcp-try needs the MCP Python SDK: pip install 'mcp>=2.3,<3')"
    )
    origins = " and ".join(INSPECTOR_ORIGINS)
    return f"""
fjmcp demo is running.

  MCP endpoint      {mcp}
  broker            {public}   (health: {public}/healthz)
  Forgejo stand-in  {forgejo}   (no passwords: you pick a user)
  forgejo-mcp       {binary}

Try it now, in another terminal:

  {try_cmd} --headless --user alice {mcp}

      signs in as alice without a browser, lists forgejo-mcp's tools and calls
      get_my_user_info. Without --headless your browser opens for the login.{needs_sdk}

Or point an MCP client at {mcp}:

  MCP Inspector   npx @modelcontextprotocol/inspector
                  then Transport Type "Streamable HTTP", URL {mcp}, Connect
                  (the broker allows Inspector's origins {origins})
  Claude Code     claude mcp add --transport http forgejo-demo {mcp}
                  then /mcp inside Claude Code to log in

Every client shows the broker's consent page, then the stand-in's sign-in
page, where you pick a user:

  users         {users}
  repositories  {repos}

Logs: {logs["broker_log"]} and {logs["standin_log"]}.
State: {state} (delete it to start afresh).
Press Ctrl-C to stop.
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="fjmcp-demo",
        description="Run the fjmcp broker and a Forgejo stand-in with seeded users on this "
        "machine, with the real forgejo-mcp as the broker's child.",
    )
    p.add_argument(
        "--broker-port", type=int, default=BROKER_PORT, help="broker port on 127.0.0.1 (8080)"
    )
    p.add_argument(
        "--standin-port",
        type=int,
        default=STANDIN_PORT,
        help="Forgejo stand-in port on 127.0.0.1 (3000)",
    )
    p.add_argument(
        "--state-dir",
        default=os.environ.get("FJMCP_DEMO_DIR") or ".demo",
        help="keys, database and logs ($FJMCP_DEMO_DIR, else .demo)",
    )
    p.add_argument(
        "--forgejo-mcp",
        default=os.environ.get("FJMCP_FORGEJO_MCP") or None,
        metavar="PATH",
        help="the forgejo-mcp binary ($FJMCP_FORGEJO_MCP, else forgejo-mcp on PATH, "
        "else bin/forgejo-mcp)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    options = parse_args(argv)
    state = Path(options.state_dir).resolve()
    binary = find_forgejo_mcp(options.forgejo_mcp)
    check_port(options.standin_port, "--standin-port")
    check_port(options.broker_port, "--broker-port")
    files = prepare(state)
    secret = files["client_secret"].read_text().strip()
    public = f"http://127.0.0.1:{options.broker_port}"
    forgejo = f"http://127.0.0.1:{options.standin_port}"
    logs: list[IO[bytes]] = []

    def log_to(path: Path) -> IO[bytes]:
        out = path.open("ab")
        logs.append(out)
        return out

    standin_log = log_to(files["standin_log"])
    standin = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fjmcp_dev.standin",
            f"--listen=tcp:{options.standin_port}:interface=127.0.0.1",
            f"--base-url={forgejo}",
            f"--client={CLIENT_ID}:{secret}:{public}/oauth/callback",
        ],
        stdin=subprocess.DEVNULL,
        stdout=standin_log,
        stderr=standin_log,
    )
    twistd = str(Path(sys.executable).parent / "twistd")
    broker_log = log_to(files["broker_log"])
    broker = subprocess.Popen(
        [
            twistd,
            "--nodaemon",
            "--pidfile=",
            "fjmcp",
            f"--listen=tcp:{options.broker_port}:interface=127.0.0.1",
            f"--public-url={public}",
            f"--forgejo-url={forgejo}",
            f"--forgejo-client-id={CLIENT_ID}",
            f"--forgejo-client-secret-file={files['client_secret']}",
            f"--secret-key-file={files['key']}",
            f"--forgejo-mcp={binary}",
            f"--data-dir={files['data']}",
            f"--allowed-origins={' '.join(INSPECTOR_ORIGINS)}",
        ],
        stdin=subprocess.DEVNULL,
        stdout=broker_log,
        stderr=broker_log,
        # Configured by the flags above only, whatever this shell exports.
        env={k: v for k, v in os.environ.items() if not k.startswith("FJMCP_")},
    )
    procs = {"broker": (broker, files["broker_log"]), "stand-in": (standin, files["standin_log"])}

    def stop(*_: object) -> None:
        # A second Ctrl-C while stopping would only leave children behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for proc, _log in procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc, _log in procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for out in logs:
            out.close()

    def report_exit() -> None:
        for name, (proc, log) in procs.items():
            if proc.poll() is not None:
                sys.stderr.write(
                    f"fjmcp-demo: the {name} exited with status {proc.returncode}; the end of "
                    f"{log}:\n{tail(log)}\n"
                )

    def on_signal(*_: object) -> None:
        stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        if not (
            wait_for(forgejo + "/api/v1/version", standin) and wait_for(public + "/healthz", broker)
        ):
            report_exit()
            if all(p.poll() is None for p, _log in procs.values()):
                sys.stderr.write(
                    f"fjmcp-demo: the demo did not start within {START_TIMEOUT:g} seconds; "
                    f"logs are in {state}\n"
                )
            stop()
            raise SystemExit(1)
        print(banner(state, forgejo, public, binary, files), flush=True)
        while all(p.poll() is None for p, _log in procs.values()):
            time.sleep(0.5)
        report_exit()
        sys.stderr.write("fjmcp-demo: stopping the other one\n")
        stop()
        raise SystemExit(1)
    except KeyboardInterrupt:
        print("\nfjmcp-demo: stopping…", flush=True)
        stop()
        print("fjmcp-demo: stopped.", flush=True)


if __name__ == "__main__":
    main()
