"""
The secret key file: its format, writing it safely, and a L{SecretBox} that
follows the file while the daemon runs, so keys can be rotated without a
restart.

Format: one base64 key (32 random bytes, standard or URL-safe alphabet) per
line; blank lines are ignored.  The FIRST key is the current one, which
seals; the others only open values sealed before a rotation.  A file with
one key is the format every fjmcp before key rotation wrote, so existing
files keep working unchanged.

Rotation (C{fjmcp-admin rotate-key}) writes the new key in front of the old
ones by replacing the file atomically; the daemon notices within about a
second (L{FollowingSecretBox}) and seals with the new key from then on, and a
value sealed under a key it has not loaded yet (re-encrypted by the admin
command a moment ago) makes it read the file again before giving up.

Limits:
 - The file must be writable by whoever rotates, and replaceable (the
   directory writable too): the podman image keeps it in the C{/data} volume
   for this reason.  A key handed over by systemd's C{LoadCredential=} is a
   read-only copy made at start, which the daemon keeps re-reading: it never
   sees a rotation of the source, and values re-encrypted under the new key
   do not open for it until it restarts.  There, stop the service, run
   C{fjmcp-admin --secret-key-file SOURCE rotate-key} (and C{--retire-old}),
   and start it again.
 - The daemon only reads the file; it never writes it.  A key file the
   daemon cannot parse after a change is logged and ignored (the keys
   loaded before stay in use) until a correct file appears.
 - A value the daemon sealed under the old key in the second before it saw
   the new file is stored under the old key; that is why the old key stays
   in the file after C{rotate-key}, and why C{--retire-old} waits until the
   file is a couple of seconds old and re-encrypts once more after dropping
   the old keys.  A login whose request was in flight across that exact
   moment may still fail and has to be retried.
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from twisted.logger import Logger

from fjmcp.secrets.crypto import KEY_BYTES, SecretBox, UnknownKeyError, key_id

log = Logger()

# How often, at most, the daemon looks at the key file before sealing.
CHECK_INTERVAL = 1.0

CREATE_HINT = (
    "create one with `python3 -c 'import secrets,base64; "
    "print(base64.b64encode(secrets.token_bytes(32)).decode())' > FILE`"
)


class KeyFileError(ValueError):
    """
    A key file that cannot be used; C{problems} holds one line per mistake.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = list(problems)


def parse_key_line(line: bytes) -> bytes:
    """
    One base64 key; raises ValueError when it is not 32 bytes of base64.
    """
    text = line.strip()
    try:
        key = base64.b64decode(text.replace(b"-", b"+").replace(b"_", b"/"), validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise ValueError(f"must hold {KEY_BYTES} random bytes in base64")
    return key


def parse_key_file(data: bytes) -> tuple[bytes, ...]:
    """
    The keys of a key file, current first, each once.

    @raise KeyFileError: naming every bad line (by number) at once, or the
        file holds no key at all.
    """
    keys: list[bytes] = []
    problems: list[str] = []
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            key = parse_key_line(line)
        except ValueError as e:
            problems.append(f"line {number}: {e}")
            continue
        if key not in keys:
            keys.append(key)
    if problems:
        # A single-line file is the common case: no line number needed there.
        if len([line for line in data.splitlines() if line.strip()]) == 1:
            problems = [f"must hold {KEY_BYTES} random bytes in base64; {CREATE_HINT}"]
        raise KeyFileError(problems)
    if not keys:
        raise KeyFileError([f"holds no key; {CREATE_HINT}"])
    return tuple(keys)


def format_key_file(keys: Sequence[bytes]) -> bytes:
    return b"".join(base64.b64encode(key) + b"\n" for key in keys)


def read_key_file(path: Path) -> tuple[bytes, ...]:
    """
    @raise OSError: the file cannot be read.
    @raise KeyFileError: it can, but is not a key file.
    """
    return parse_key_file(path.read_bytes())


def write_key_file(path: Path, keys: Sequence[bytes]) -> None:
    """
    Replace the key file atomically: a reader sees the old file or the new
    one, never a half-written one, and a crash leaves one of the two.  The
    temporary file is 0600 before any key is written to it; a file that
    replaces another gets its owner and group (the daemon must still read
    it when root rotates) and its permissions, less any for others.
    """
    directory = path.parent
    try:
        old: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        old = None
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, stat.S_IRUSR | stat.S_IWUSR)
            if old is not None:
                _same_owner_and_mode(fd, old)
            f.write(format_key_file(keys))
            f.flush()
            os.fsync(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    # The rename itself must survive a crash too.
    fsync_directory(directory)


def fsync_directory(directory: Path) -> None:
    """
    Make a new or renamed entry in C{directory} survive a crash.
    """
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _same_owner_and_mode(fd: int, old: os.stat_result) -> None:
    mine = os.fstat(fd)
    if (old.st_uid, old.st_gid) != (mine.st_uid, mine.st_gid):
        try:
            os.fchown(fd, old.st_uid, old.st_gid)
        except OSError as e:
            raise OSError(
                e.errno,
                f"cannot give the new key file the old one's owner and group ({e.strerror}); "
                "run as the daemon's user",
            ) from None
    os.fchmod(fd, (stat.S_IMODE(old.st_mode) & 0o660) | stat.S_IRUSR | stat.S_IWUSR)


def new_key() -> bytes:
    return os.urandom(KEY_BYTES)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


class FollowingSecretBox(SecretBox):
    """
    A L{SecretBox} over the key file at C{path} that picks up rotations.

    Before sealing it looks at the file's identity (device, inode, mtime,
    size) at most once per L{CHECK_INTERVAL} and loads the file when that
    changed, so it seals with the file's current key; when it meets a value
    sealed under a key it does not know, it looks again at once and retries.

    The file is read in the calling (reactor) thread.  That is deliberate:
    it is a C{stat} at most once a second, and a read of a file of a few
    hundred bytes on local disk only when it changed, which costs less than
    writing one log line; making it asynchronous would make every seal and
    open (called from synchronous code) a Deferred.
    """

    def __init__(
        self,
        path: Path,
        keys: Sequence[bytes] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self._clock = clock
        self._identity: tuple[int, int, int, int] | None = None
        if keys is None:
            self._identity = _identity(os.stat(path))
            keys = read_key_file(path)
            self._checked = clock()
        else:
            # Keys read earlier (the configuration): the first seal looks
            # at the file again, in case it changed in between.
            self._checked = float("-inf")
        super().__init__(keys)

    def reload(self, force: bool = False) -> bool:
        """
        Load the file again if it changed since last time (or C{force});
        True when the keys changed.  A file that cannot be read or parsed is
        logged and the keys in use are kept.
        """
        self._checked = self._clock()
        try:
            identity = _identity(os.stat(self.path))
            if identity == self._identity and not force:
                return False
            keys = read_key_file(self.path)
        except (OSError, ValueError) as e:
            log.error(
                "cannot reload the secret key file {path}: {error}; keeping the keys loaded before",
                path=str(self.path),
                error=getattr(e, "strerror", None) or str(e),
            )
            return False
        self._identity = identity
        if keys == self.keys:
            return False
        self._set_keys(keys)
        log.info(
            "secret key file {path} reloaded: {count} key(s), sealing with key {kid}",
            path=str(self.path),
            count=len(keys),
            kid=key_id(keys[0]).hex(),
        )
        return True

    def seal(self, plaintext: str, context: str) -> bytes:
        if self._clock() - self._checked >= CHECK_INTERVAL:
            self.reload()
        return super().seal(plaintext, context)

    def open(self, sealed: bytes, context: str) -> str:
        try:
            return super().open(sealed, context)
        except UnknownKeyError:
            # Rotated (and re-encrypted) since we last looked: look now.
            if not self.reload():
                raise
        return super().open(sealed, context)
