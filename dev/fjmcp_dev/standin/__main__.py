"""
Run the Forgejo stand-in as its own process:

    python -m fjmcp_dev.standin --listen tcp:3000:interface=127.0.0.1 \\
        --client fjmcp:SECRET:http://127.0.0.1:8080/oauth/callback

It prints one line, C{forgejo-standin listening on <url>}, once it accepts
connections (tests read it to learn the port when listening on port 0).
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import endpoints, task
from twisted.logger import globalLogBeginner, textFileLogObserver
from twisted.python import usage
from twisted.web.server import Site

from fjmcp_dev.standin.model import ACCESS_TOKEN_LIFETIME, Forge, seed
from fjmcp_dev.standin.web import StandinForgejo


class Options(usage.Options):
    optFlags = [
        ["test-login", None, "Honour the X-Standin-Login header (tests only)."],
        ["quiet", "q", "Log nothing but errors."],
    ]
    optParameters = [
        ["listen", None, "tcp:3000:interface=127.0.0.1", "Endpoint to listen on."],
        ["base-url", None, None, "Public URL (default: derived from the listening port)."],
        [
            "access-token-lifetime",
            None,
            ACCESS_TOKEN_LIFETIME,
            "Access token lifetime in seconds.",
            int,
        ],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["clients"] = []

    def opt_client(self, spec: str) -> None:
        """
        Register a confidential OAuth2 app: CLIENT_ID:SECRET:REDIRECT_URI
        (repeatable; the redirect URI may contain colons).
        """
        client_id, _, rest = spec.partition(":")
        secret, _, redirect = rest.partition(":")
        if not (client_id and secret and redirect):
            raise usage.UsageError(f"--client needs CLIENT_ID:SECRET:REDIRECT_URI, got {spec!r}")
        self["clients"].append((client_id, secret, redirect))


async def serve(reactor: Any, options: Options) -> None:
    forge = Forge(reactor.seconds, access_token_lifetime=options["access-token-lifetime"])
    seed(forge)
    for client_id, secret, redirect in options["clients"]:
        forge.add_app(
            "fjmcp", [redirect], confidential=True, client_id=client_id, client_secret=secret
        )
    standin = StandinForgejo(
        forge, options["base-url"] or "http://unset", test_login=options["test-login"]
    )
    endpoint = endpoints.serverFromString(reactor, options["listen"])
    port = await endpoint.listen(Site(standin.resource()))
    address = port.getHost()
    if not options["base-url"]:
        host = address.host if ":" not in address.host else f"[{address.host}]"
        url = f"http://{host}:{address.port}"
        standin.base_url = url
    print(f"forgejo-standin listening on {standin.base_url}", flush=True)
    from twisted.internet.defer import Deferred

    await Deferred()  # run until the process is stopped


def main(argv: list[str] | None = None) -> None:
    options = Options()
    try:
        options.parseOptions(argv if argv is not None else sys.argv[1:])
    except usage.UsageError as e:
        sys.stderr.write(f"fjmcp-forgejo-standin: {e}\n")
        raise SystemExit(2) from None
    if not options["quiet"]:
        globalLogBeginner.beginLoggingTo(
            [textFileLogObserver(sys.stderr)], redirectStandardIO=False
        )

    def run(reactor: Any) -> Any:
        from twisted.internet.defer import Deferred

        return Deferred.fromCoroutine(serve(reactor, options))

    task.react(run)


if __name__ == "__main__":
    main()
