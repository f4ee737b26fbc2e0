"""
C{fjmcp-admin rotate-key}: a new key first in the daemon's key file and
every stored sealed value (Forgejo credentials, logins in flight) sealed
again under it; with C{--retire-old}, everything under the current key and
the older keys dropped from the file.  Rotation refuses a key file that
opens none of the stored credentials, and writes the file under the
database's write lock, so two rotations cannot both start from the same old
contents.  The daemon picks a rotated key up within about a second (see
L{fjmcp.secrets.keyring}, also for where rotation cannot work without a
restart).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from fjmcp.cli.output import PROG, AdminError, Result
from fjmcp.cli.sync_store import SyncStore, wait
from fjmcp.forgejo.credentials import credential_context
from fjmcp.secrets.crypto import UPSTREAM_PKCE_CONTEXT, DecryptionError, SecretBox, key_id
from fjmcp.secrets.keyring import (
    CHECK_INTERVAL,
    KeyFileError,
    new_key,
    read_key_file,
    write_key_file,
)
from fjmcp.store.admin import ResealBatch
from fjmcp.store.database import Txn

# Before retiring old keys, the key file must be this old, so the daemon
# (which looks at it at most once per CHECK_INTERVAL) seals with the current key.
SETTLE_SECONDS = 2 * CHECK_INTERVAL
RESEAL_BATCH = 200


@attrs.define
class _Resealing:
    """
    Re-seals every sealed value under C{box}'s current key, counting what
    it changed and what opened with no key at all.
    """

    box: SecretBox
    credentials: int = 0
    verifiers: int = 0
    unreadable: int = 0

    def _reseal(self, context: str, sealed: bytes) -> bytes | None:
        try:
            return self.box.reseal(sealed, context)
        except DecryptionError:
            # Lost already (its key is gone): the user signs in again when
            # it is needed; rotation must not be held up by it.
            self.unreadable += 1
            return None

    def run(self, store: SyncStore) -> None:
        def credential(user_id: int, which: str, sealed: bytes) -> bytes | None:
            return self._reseal(credential_context(user_id, which), sealed)

        def verifier(row_id: int, which: str, sealed: bytes) -> bytes | None:
            return self._reseal(UPSTREAM_PKCE_CONTEXT, sealed)

        # One short write transaction per batch, so the daemon's writes are
        # never held up for long on a big database.
        batch: ResealBatch | None = None
        while batch is None or batch.next_after is not None:
            after = -1 if batch is None else batch.next_after
            assert after is not None
            batch = wait(store.reseal_upstream_credentials(credential, after, RESEAL_BATCH))
            self.credentials += batch.changed
        batch = None
        while batch is None or batch.next_after is not None:
            after = -1 if batch is None else batch.next_after
            assert after is not None
            batch = wait(store.reseal_pending_verifiers(verifier, after, RESEAL_BATCH))
            self.verifiers += batch.changed


def _key_file(args: argparse.Namespace) -> Path:
    if not args.secret_key_file:
        raise AdminError(
            "rotate-key needs the daemon's key file: give --secret-key-file or set "
            "FJMCP_SECRET_KEY_FILE",
            2,
        )
    return Path(args.secret_key_file)


def _read_keys(path: Path) -> tuple[bytes, ...]:
    try:
        return read_key_file(path)
    except OSError as e:
        raise AdminError(f"cannot read the key file {path}: {e.strerror}", 2) from None
    except KeyFileError as e:
        raise AdminError(f"the key file {path} is unusable: {'; '.join(e.problems)}", 2) from None


def _write_keys(path: Path, keys: Sequence[bytes]) -> None:
    try:
        write_key_file(path, keys)
    except OSError as e:
        raise AdminError(
            f"cannot replace the key file {path}: {e.strerror}; it and its directory must be "
            "writable (a systemd LoadCredential copy is read-only: rotate the source file, "
            "then restart the service)",
            2,
        ) from None


def rotate_key(store: SyncStore, args: argparse.Namespace) -> Result:
    # A symlink stays one: the file it points to is what gets replaced.
    path = Path(os.path.realpath(_key_file(args)))
    keys = _read_keys(path)
    if not os.access(path.parent, os.W_OK):
        raise AdminError(
            f"cannot replace the key file {path}: {path.parent} is not writable (a systemd "
            "LoadCredential copy is read-only: rotate the source file, then restart the service)",
            2,
        )
    return _retire_old(store, path, keys) if args.retire_old else _rotate(store, path, keys)


def _check_keys_open(store: SyncStore, path: Path, keys: tuple[bytes, ...]) -> None:
    """
    Refuse to rotate with a key file that opens none of the stored
    credentials: it is not the daemon's, and re-encrypting under it would
    sign every user out.  (The first batch is enough to tell.)
    """
    box = SecretBox(keys)
    tried: list[bool] = []

    def probe(user_id: int, which: str, sealed: bytes) -> None:
        try:
            box.open(sealed, credential_context(user_id, which))
            tried.append(True)
        except DecryptionError:
            tried.append(False)

    wait(store.reseal_upstream_credentials(probe, -1, RESEAL_BATCH))
    if tried and not any(tried):
        raise AdminError(
            f"none of the stored credentials opens with the keys in {path}: is it the key file "
            "the daemon uses (--secret-key-file / FJMCP_SECRET_KEY_FILE)? Nothing was changed",
            2,
        )


def _rotate(store: SyncStore, path: Path, keys: tuple[bytes, ...]) -> Result:
    _check_keys_open(store, path, keys)
    key = new_key()
    ring: list[tuple[bytes, ...]] = []

    def write(txn: Txn) -> None:
        # Under the database's write lock: a second rotate-key waits here
        # instead of both writing the file from the same old contents.
        txn.lock("rotate-key")
        current = _read_keys(path)
        ring.append((key, *current))
        _write_keys(path, ring[0])

    wait(store._write("rotate_key_file", write))
    resealing = _Resealing(SecretBox(ring[0]))
    resealing.run(store)
    kid = key_id(key).hex()
    text = (
        f"new key {kid} written to {path} ({len(ring[0])} keys, new one first); "
        f"re-encrypted {resealing.credentials} stored credential(s) and "
        f"{resealing.verifiers} login(s) in flight. The old key stays in the file to open "
        f"anything the daemon sealed in the next second; `{PROG} rotate-key --retire-old` "
        "removes it."
    )
    return Result(_rotation_data(path, ring[0], resealing, []), _warn(text, resealing))


def _retire_old(store: SyncStore, path: Path, keys: tuple[bytes, ...]) -> Result:
    _check_keys_open(store, path, keys)
    # Let the daemon see the current key before anything is checked: it
    # looks at the file at most once a second before sealing.
    age = time.time() - path.stat().st_mtime
    if age < SETTLE_SECONDS:
        time.sleep(SETTLE_SECONDS - age)
    resealing = _Resealing(SecretBox(keys))
    resealing.run(store)
    retired: list[bytes] = []

    def write(txn: Txn) -> None:
        current = _read_keys(path)
        if current[0] != keys[0]:
            raise AdminError(
                f"the key file {path} changed while old keys were being retired "
                "(another rotate-key?); run this again"
            )
        retired.extend(current[1:])
        if retired:
            _write_keys(path, current[:1])

    wait(store._write("retire_old_keys", write))
    # Anything the daemon stored under an old key after the first pass
    # (sealed just before it saw the new file) is caught here; this command
    # still holds the old keys in memory.
    resealing.box = SecretBox((keys[0], *retired, *keys[1:]))
    resealing.run(store)
    ids = [key_id(k).hex() for k in retired]
    text = (
        f"retired {len(retired)} old key(s) ({', '.join(ids)}); {path} now holds only key "
        f"{key_id(keys[0]).hex()}; re-encrypted {resealing.credentials} stored credential(s) "
        f"and {resealing.verifiers} login(s) in flight"
        if retired
        else f"{path} holds only the current key {key_id(keys[0]).hex()}: nothing to retire"
        + (
            f" (re-encrypted {resealing.credentials} credential(s) still in the old format)"
            if resealing.credentials
            else ""
        )
    )
    return Result(_rotation_data(path, keys[:1], resealing, ids), _warn(text, resealing))


def _rotation_data(
    path: Path, keys: Sequence[bytes], resealing: _Resealing, retired: list[str]
) -> dict[str, Any]:
    return {
        "key_file": str(path),
        "current_key_id": key_id(keys[0]).hex(),
        "key_ids": [key_id(k).hex() for k in keys],
        "retired_key_ids": retired,
        "resealed": {
            "credentials": resealing.credentials,
            "pending_authorizations": resealing.verifiers,
        },
        "unreadable": resealing.unreadable,
    }


def _warn(text: str, resealing: _Resealing) -> str:
    if resealing.unreadable:
        text += (
            f"\nwarning: {resealing.unreadable} stored value(s) open with no key in the file; "
            "those users must sign in again"
        )
    return text
