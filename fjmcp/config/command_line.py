"""
C{twistd fjmcp}'s command line: L{Options} takes every option as a flag
(falling back on its C{FJMCP_*} variable), builds the L{Config} once the
flags are parsed, and turns a L{ConfigError} into one line per mistake and
exit status 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from twisted.python import usage

from fjmcp.config.build import build_config
from fjmcp.config.options import OPTIONS
from fjmcp.config.settings import Config, ConfigError


class Options(usage.Options):
    """
    C{twistd fjmcp} options.  Each option also reads C{FJMCP_<NAME>} from the
    environment when the flag is not given; an empty variable counts as unset.
    """

    synopsis = "[options]"
    optParameters = [
        [
            o.name,
            None,
            None,
            f"{o.doc} [env {o.env}"
            + (f", default: {o.default!r}" if o.default is not None else "")
            + "]",
        ]
        for o in OPTIONS
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []
        self.environ: Mapping[str, str] = os.environ
        self.config: Config | None = None
        # twistd wants a clean exit; tests want the ConfigError itself.
        self.exit_on_error = True

    def opt_listen(self, description: str) -> None:
        """
        Twisted endpoint to listen on; repeatable [env FJMCP_LISTEN, space separated, default: tcp:8080:interface=127.0.0.1]
        """  # noqa: E501
        self["listen"].append(description)

    def opt_version(self) -> None:
        """
        Print the version, git revision and build date, and exit.
        """
        from fjmcp.buildinfo import describe

        print(describe())
        raise SystemExit(0)

    def postOptions(self) -> None:
        try:
            self.config = build_config(
                {o.name: self[o.name] for o in OPTIONS}, self["listen"], self.environ
            )
        except ConfigError as e:
            if not self.exit_on_error:
                raise
            # twistd would print the whole usage text and a traceback-like
            # line; an operator wants each mistake on its own line and a
            # distinct exit status (2, as for any usage error).
            for problem in e.problems:
                sys.stderr.write(f"fjmcp: configuration error: {problem}\n")
            sys.stderr.flush()
            raise SystemExit(2) from None
