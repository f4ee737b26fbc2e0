"""
Configuration: the C{twistd fjmcp} command line, its environment fallbacks,
and the validated, immutable L{Config} the rest of the broker is built from.

Every option is a flag and an environment variable C{FJMCP_<NAME>}; a flag
wins, and an empty variable counts as unset, so one daemon runs the same from
a systemd C{EnvironmentFile}, a container's environment or a shell.  Raw
strings are turned into typed values here and nowhere else, and every mistake
is collected so an operator sees all of them in one start attempt.

  - L{options}: the option table (names, help, defaults, variables);
  - L{values}: parsing and checking one value;
  - L{build}: merging flags, environment and defaults into a L{Config},
    collecting every mistake;
  - L{command_line}: the C{twistd} options class;
  - L{settings}: the L{Config} itself, its error, and the daemon's secret
    box.

The names the rest of the broker uses are re-exported here.
"""

from fjmcp.config.build import build_config
from fjmcp.config.command_line import Options
from fjmcp.config.options import DEFAULT_LISTEN, ENV_PREFIX, OPTIONS, OTHER_VARIABLES, Option
from fjmcp.config.settings import (
    DB_FILENAME,
    KEY_BYTES,
    Config,
    ConfigError,
    IPNetwork,
    secret_box,
)
from fjmcp.config.values import (
    parse_duration,
    parse_forgejo_url,
    parse_log_format,
    parse_log_level,
    parse_networks,
    parse_origins,
    parse_positive_int,
    parse_public_url,
    parse_scopes,
    parse_secret_key,
    validate_listen,
)

__all__ = [
    "DB_FILENAME",
    "DEFAULT_LISTEN",
    "ENV_PREFIX",
    "KEY_BYTES",
    "OPTIONS",
    "OTHER_VARIABLES",
    "Config",
    "ConfigError",
    "IPNetwork",
    "Option",
    "Options",
    "build_config",
    "parse_duration",
    "parse_forgejo_url",
    "parse_log_format",
    "parse_log_level",
    "parse_networks",
    "parse_origins",
    "parse_positive_int",
    "parse_public_url",
    "parse_scopes",
    "parse_secret_key",
    "secret_box",
    "validate_listen",
]
