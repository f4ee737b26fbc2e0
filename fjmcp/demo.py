"""
`fjmcp-demo` (`make demo`): the broker and a Forgejo stand-in on this
machine, in one command.

Creates what a first start needs under C{.demo/} (an encryption key, the
broker's client secret at the stand-in, the data directory), starts the
stand-in with seeded users and the broker registered as its confidential
client, prints where everything is, and stops both on Ctrl-C.
"""

from __future__ import annotations

import base64
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

STANDIN_PORT = 3000
BROKER_PORT = 8080
CLIENT_ID = "fjmcp-demo"


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
    return {"key": key, "client_secret": client_secret, "data": state / "data"}


def wait_for(url: str, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> bool:
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


def main() -> None:
    state = Path(os.environ.get("FJMCP_DEMO_DIR", ".demo")).resolve()
    binary = shutil.which("forgejo-mcp")
    if binary is None:
        unavailable = Path("bin/.forgejo-mcp.unavailable")
        why = unavailable.read_text().strip() if unavailable.exists() else "not built"
        sys.stderr.write(
            "fjmcp-demo: forgejo-mcp is not available, so the broker cannot run MCP "
            f"sessions.\n  {why}\n  Build it with `make forgejo-mcp`, or put a forgejo-mcp "
            "binary on PATH.\n"
        )
        raise SystemExit(1)
    files = prepare(state)
    secret = files["client_secret"].read_text().strip()
    public = f"http://127.0.0.1:{BROKER_PORT}"
    forgejo = f"http://127.0.0.1:{STANDIN_PORT}"
    standin = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fjmcp.standin",
            f"--listen=tcp:{STANDIN_PORT}:interface=127.0.0.1",
            f"--base-url={forgejo}",
            f"--client={CLIENT_ID}:{secret}:{public}/oauth/callback",
        ]
    )
    twistd = str(Path(sys.executable).parent / "twistd")
    broker = subprocess.Popen(
        [
            twistd,
            "--nodaemon",
            "--pidfile=",
            "fjmcp",
            f"--listen=tcp:{BROKER_PORT}:interface=127.0.0.1",
            f"--public-url={public}",
            f"--forgejo-url={forgejo}",
            f"--forgejo-client-id={CLIENT_ID}",
            f"--forgejo-client-secret-file={files['client_secret']}",
            f"--secret-key-file={files['key']}",
            f"--forgejo-mcp={binary}",
            f"--data-dir={files['data']}",
        ],
        env={k: v for k, v in os.environ.items() if not k.startswith("FJMCP_")},
    )
    procs = [broker, standin]

    def stop(*_: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    def on_term(*_: object) -> None:
        stop()
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    try:
        if not (
            wait_for(forgejo + "/api/v1/version", standin) and wait_for(public + "/healthz", broker)
        ):
            sys.stderr.write("fjmcp-demo: a process failed to start; see its output above\n")
            stop()
            raise SystemExit(1)
        print(
            f"""
fjmcp demo is running (state in {state}):

  Forgejo stand-in  {forgejo}    users: alice, bob, carol (pick one on its login page)
  broker            {public}    health: {public}/healthz
  MCP endpoint      {public}/mcp
  forgejo-mcp       {binary}

Press Ctrl-C to stop both.
""",
            flush=True,
        )
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        sys.stderr.write("fjmcp-demo: a process exited; stopping the other\n")
        stop()
        raise SystemExit(1)
    except KeyboardInterrupt:
        stop()


if __name__ == "__main__":
    main()
