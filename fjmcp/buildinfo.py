"""
Build information: which fjmcp this is (version, git revision, build date).

The version is C{fjmcp.__version__}.  The revision and date are stamped into
the container image as C{FJMCP_BUILD_REVISION} and C{FJMCP_BUILD_DATE} (see
the Containerfile and C{make image}); a source checkout without them reads
the revision from its C{.git} directory (plain files, no C{git} process) and
has no build date.  Whatever cannot be found is C{"unknown"}.

Everything is read once, at start-up (L{build_info} caches it), so
C{/healthz} never does I/O for it and the answer cannot change under a
running daemon.  C{twistd fjmcp --version}, C{/healthz}, the start-up log
line and C{fjmcp-admin --version} all show the same L{describe} text or its
parts.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import attrs

from fjmcp import __version__

UNKNOWN = "unknown"
REVISION_ENV = "FJMCP_BUILD_REVISION"
DATE_ENV = "FJMCP_BUILD_DATE"

# What a stamped value may look like: a commit id (with "-dirty"), a tag, an
# ISO 8601 time.  Anything else (a shell accident, control characters) would
# end up verbatim in logs and JSON, so it is shown as unknown instead.
_STAMP = re.compile(r"[0-9A-Za-z][0-9A-Za-z.:+_-]{0,63}")
_COMMIT = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")

# The checkout this module was imported from, if it is one.
_SOURCE_ROOT = Path(__file__).resolve().parent.parent


@attrs.frozen
class BuildInfo:
    version: str
    revision: str = UNKNOWN
    date: str = UNKNOWN

    def as_dict(self) -> dict[str, str]:
        return {"version": self.version, "revision": self.revision, "date": self.date}

    def describe(self) -> str:
        """
        One line, e.g. C{fjmcp 0.1.0 (revision 3f2c9a1b7d0e, built 2026-11-26T19:00:00Z)}.
        """
        return f"fjmcp {self.version} (revision {self.revision}, built {self.date})"


def _stamp(value: str | None) -> str | None:
    value = (value or "").strip()
    return value if _STAMP.fullmatch(value) else None


def git_revision(root: Path) -> str | None:
    """
    The commit checked out in C{root}, read from C{.git} without running git:
    C{HEAD} holds either the commit or a ref, found loose or in C{packed-refs}.
    A worktree's C{.git} file pointing elsewhere is followed.
    """
    git = root / ".git"
    try:
        if git.is_file():
            pointer = git.read_text().strip()
            if not pointer.startswith("gitdir:"):
                return None
            git = (root / pointer.removeprefix("gitdir:").strip()).resolve()
        head = (git / "HEAD").read_text().strip()
    except OSError:
        return None
    if _COMMIT.fullmatch(head):
        return head
    if not head.startswith("ref: "):
        return None
    ref = head.removeprefix("ref: ").strip()
    # A linked worktree keeps its HEAD locally and its refs in the main repository.
    common = git
    try:
        common = (git / (git / "commondir").read_text().strip()).resolve()
    except OSError:
        pass
    for base in dict.fromkeys((git, common)):
        try:
            value = (base / ref).read_text().strip()
        except OSError:
            continue
        if _COMMIT.fullmatch(value):
            return value
    for base in dict.fromkeys((git, common)):
        try:
            packed = (base / "packed-refs").read_text()
        except OSError:
            continue
        for line in packed.splitlines():
            commit, _, name = line.partition(" ")
            if name == ref and _COMMIT.fullmatch(commit):
                return commit
    return None


def read_build_info(
    environ: Mapping[str, str] = os.environ, source_root: Path | None = _SOURCE_ROOT
) -> BuildInfo:
    """
    Read the build information now (see the module docstring for where from).
    """
    revision = _stamp(environ.get(REVISION_ENV))
    if revision is None and source_root is not None:
        commit = git_revision(source_root)
        revision = commit[:12] if commit else None
    return BuildInfo(
        version=__version__,
        revision=revision or UNKNOWN,
        date=_stamp(environ.get(DATE_ENV)) or UNKNOWN,
    )


_current: BuildInfo | None = None


def build_info() -> BuildInfo:
    """
    This process's build information, read on the first call and kept.
    """
    global _current
    if _current is None:
        _current = read_build_info()
    return _current


def describe() -> str:
    """
    The one-line description every C{--version} prints.
    """
    return build_info().describe()
