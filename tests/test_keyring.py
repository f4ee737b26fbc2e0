"""
Key files with several keys, sealing across key rings, and a box that
follows its key file while the daemon runs: what must hold for any input.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SkipTest, SynchronousTestCase

from fjmcp.config import Config, ConfigError, build_config, secret_box
from fjmcp.secrets.crypto import (
    SCHEME_V1,
    DecryptionError,
    SecretBox,
    UnknownKeyError,
    key_id,
)
from fjmcp.secrets.keyring import (
    CHECK_INTERVAL,
    FollowingSecretBox,
    KeyFileError,
    format_key_file,
    parse_key_file,
    read_key_file,
    write_key_file,
)
from tests.helpers import make_config
from tests.test_config import good_argv, make_files

keys_st = st.binary(min_size=32, max_size=32)
rings = st.lists(keys_st, min_size=1, max_size=5, unique=True)


def encode(key: bytes, urlsafe: bool) -> bytes:
    return (base64.urlsafe_b64encode if urlsafe else base64.b64encode)(key)


def v1_seal(key: bytes, plaintext: str, context: str) -> bytes:
    """
    A value in the format every fjmcp before key rotation wrote.
    """
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    return SCHEME_V1 + nonce + AESGCM(key).encrypt(nonce, plaintext.encode(), context.encode())


class KeyFileTests(SynchronousTestCase):
    @given(rings, st.lists(st.booleans(), min_size=5, max_size=5), st.sampled_from(["\n", "\r\n"]))
    def test_roundtrip(self, keys: list[bytes], urlsafe: list[bool], newline: str) -> None:
        """
        Any ring written one key a line (either alphabet, blank lines and
        trailing spaces about) reads back in order, current first.
        """
        lines = [encode(k, u) + b"  " for k, u in zip(keys, urlsafe, strict=False)]
        data = ("\n" + newline).encode().join(lines) + newline.encode()
        self.assertEqual(parse_key_file(data), tuple(keys))
        self.assertEqual(parse_key_file(format_key_file(keys)), tuple(keys))

    @given(rings)
    def test_duplicates_kept_once(self, keys: list[bytes]) -> None:
        self.assertEqual(parse_key_file(format_key_file(keys + keys)), tuple(keys))

    @given(rings, st.lists(st.binary(max_size=40).filter(lambda b: len(b) != 32), min_size=1))
    def test_every_bad_line_reported(self, keys: list[bytes], bad: list[bytes]) -> None:
        """
        Bad lines (keys of the wrong length) among good ones: every one is
        named by its line number, at once.
        """
        lines = [base64.b64encode(k) for k in keys] + [base64.b64encode(b) + b"!" for b in bad]
        with self.assertRaises(KeyFileError) as cm:
            parse_key_file(b"\n".join(lines))
        problems = cm.exception.problems
        self.assertEqual(len(problems), len(bad))
        for i, problem in enumerate(problems):
            self.assertTrue(problem.startswith(f"line {len(keys) + i + 1}: "), problem)
            self.assertIn("32 random bytes in base64", problem)

    @given(st.binary(max_size=200))
    def test_never_crashes(self, data: bytes) -> None:
        try:
            keys = parse_key_file(data)
        except KeyFileError as e:
            self.assertTrue(e.problems and all(e.problems))
        else:
            self.assertTrue(keys and all(len(k) == 32 for k in keys))

    def test_empty(self) -> None:
        with self.assertRaises(KeyFileError) as cm:
            parse_key_file(b"\n  \n")
        self.assertIn("holds no key", str(cm.exception))

    def test_write_is_private_and_atomic(self) -> None:
        path = Path(self.mktemp())
        path.parent.mkdir(exist_ok=True)
        keys = [os.urandom(32), os.urandom(32)]
        write_key_file(path, keys)
        self.assertEqual(read_key_file(path), tuple(keys))
        self.assertEqual(path.stat().st_mode & 0o777, 0o600)
        write_key_file(path, keys[:1])
        self.assertEqual(read_key_file(path), tuple(keys[:1]))
        # No temporary file is left behind.
        self.assertEqual(os.listdir(path.parent), [path.name])

    def test_rewrite_keeps_owner_group_and_mode(self) -> None:
        """
        Root rotating a key file the daemon's user owns leaves it readable
        by that user (never by others).
        """
        if os.geteuid() != 0:
            raise SkipTest("needs root to hand a file to another user")
        path = Path(self.mktemp())
        path.parent.mkdir(exist_ok=True)
        write_key_file(path, [os.urandom(32)])
        os.chown(path, 12345, 12346)
        os.chmod(path, 0o644)
        write_key_file(path, [os.urandom(32), os.urandom(32)])
        st = path.stat()
        self.assertEqual((st.st_uid, st.st_gid, st.st_mode & 0o777), (12345, 12346, 0o640))


class KeyRingTests(SynchronousTestCase):
    @settings(max_examples=50)
    @given(rings, st.data(), st.text(max_size=200), st.text(max_size=30))
    def test_any_key_of_the_ring_opens(
        self, keys: list[bytes], data: st.DataObject, secret: str, context: str
    ) -> None:
        """
        A value sealed under any key of a ring opens with the ring, whatever
        the key's position; old-format values (no key id) open too.
        """
        sealer = data.draw(st.sampled_from(keys))
        ring = SecretBox(keys)
        self.assertEqual(ring.open(SecretBox(sealer).seal(secret, context), context), secret)
        self.assertEqual(ring.open(v1_seal(sealer, secret, context), context), secret)

    @settings(max_examples=50)
    @given(rings, keys_st, st.text(max_size=100))
    def test_key_outside_the_ring_fails_clearly(
        self, keys: list[bytes], outsider: bytes, secret: str
    ) -> None:
        if outsider in keys:
            return
        ring = SecretBox(keys)
        with self.assertRaises(UnknownKeyError) as cm:
            ring.open(SecretBox(outsider).seal(secret, "ctx"), "ctx")
        self.assertIn(key_id(outsider).hex(), str(cm.exception))
        self.assertIn("not in the key file", str(cm.exception))
        with self.assertRaises(DecryptionError) as cm2:
            ring.open(v1_seal(outsider, secret, "ctx"), "ctx")
        self.assertIn("does not open with any key", str(cm2.exception))

    @given(rings, st.text(max_size=100))
    def test_seals_with_the_first_key(self, keys: list[bytes], secret: str) -> None:
        ring = SecretBox(keys)
        sealed = ring.seal(secret, "ctx")
        self.assertEqual(ring.sealed_key_id(sealed), key_id(keys[0]))
        self.assertEqual(SecretBox(keys[0]).open(sealed, "ctx"), secret)

    @given(rings, keys_st, st.text(max_size=100))
    def test_reseal_moves_to_the_current_key(
        self, keys: list[bytes], new: bytes, secret: str
    ) -> None:
        if new in keys:
            return
        old = SecretBox(keys).seal(secret, "ctx")
        rotated = SecretBox([new, *keys])
        resealed = rotated.reseal(old, "ctx")
        assert resealed is not None
        self.assertIsNone(rotated.reseal(resealed, "ctx"))
        self.assertEqual(SecretBox(new).open(resealed, "ctx"), secret)

    def test_key_id_is_bound(self) -> None:
        """
        Pointing a value at another key of the ring does not open it.
        """
        a, b = os.urandom(32), os.urandom(32)
        sealed = SecretBox(a).seal("token", "ctx")
        moved = sealed[:1] + key_id(b) + sealed[9:]
        self.assertRaises(DecryptionError, SecretBox([a, b]).open, moved, "ctx")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FollowingBoxTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = Path(self.mktemp())
        self.path.parent.mkdir(exist_ok=True)
        self.old = os.urandom(32)
        write_key_file(self.path, [self.old])
        self.clock = FakeClock()
        self.box = FollowingSecretBox(self.path, clock=self.clock)

    def test_seals_with_the_new_key_after_a_second(self) -> None:
        new = os.urandom(32)
        write_key_file(self.path, [new, self.old])
        # Within the interval it has not looked yet.
        self.clock.now += CHECK_INTERVAL / 2
        self.assertEqual(self.box.sealed_key_id(self.box.seal("t", "c")), key_id(self.old))
        self.clock.now += CHECK_INTERVAL
        sealed = self.box.seal("t", "c")
        self.assertEqual(self.box.sealed_key_id(sealed), key_id(new))
        self.assertEqual(SecretBox(new).open(sealed, "c"), "t")

    def test_unknown_key_reads_the_file_at_once(self) -> None:
        new = os.urandom(32)
        write_key_file(self.path, [new, self.old])
        sealed = SecretBox(new).seal("t", "c")
        self.assertEqual(self.box.open(sealed, "c"), "t")

    def test_unknown_key_not_in_the_file_either(self) -> None:
        sealed = SecretBox(os.urandom(32)).seal("t", "c")
        self.assertRaises(UnknownKeyError, self.box.open, sealed, "c")

    def test_broken_file_keeps_the_old_keys(self) -> None:
        self.path.write_text("garbage\n")
        self.clock.now += 2 * CHECK_INTERVAL
        sealed = self.box.seal("t", "c")
        self.assertEqual(self.box.sealed_key_id(sealed), key_id(self.old))
        self.assertEqual(self.box.open(sealed, "c"), "t")
        self.flushLoggedErrors()

    def test_retired_key(self) -> None:
        """
        After the old key is retired from the file, its values no longer open.
        """
        old_value = self.box.seal("t", "c")
        new = os.urandom(32)
        write_key_file(self.path, [new])
        self.clock.now += 2 * CHECK_INTERVAL
        self.box.seal("x", "c")
        self.assertRaises(UnknownKeyError, self.box.open, old_value, "c")


class ConfigKeyFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        tmp = Path(self.mktemp())
        tmp.mkdir()
        self.files = make_files(tmp)
        self.data_dir = str(tmp / "data")

    def parse(self) -> Config:
        argv = dict(a[2:].split("=", 1) for a in good_argv(self.files, self.data_dir))
        return build_config(argv, [], {}, which=lambda name: None)

    def test_multi_key_file(self) -> None:
        keys = [os.urandom(32), os.urandom(32)]
        Path(self.files["key"]).write_bytes(format_key_file(keys))
        config = self.parse()
        self.assertEqual(config.secret_key, keys[0])
        self.assertEqual(config.secret_keys, tuple(keys))
        self.assertEqual(config.secret_key_file, Path(self.files["key"]).absolute())

    def test_the_daemon_follows_its_key_file(self) -> None:
        """
        The box the daemon is built with follows the configured key file; a
        Config made without one (tests) gets fixed keys.
        """
        config = self.parse()
        box = secret_box(config)
        self.assertIsInstance(box, FollowingSecretBox)
        new = os.urandom(32)
        write_key_file(Path(self.files["key"]), [new, config.secret_key])
        self.assertEqual(box.open(SecretBox(new).seal("t", "c"), "c"), "t")
        fixed = secret_box(make_config(self.mktemp()))
        self.assertNotIsInstance(fixed, FollowingSecretBox)

    def test_bad_lines_each_reported(self) -> None:
        Path(self.files["key"]).write_bytes(
            base64.b64encode(os.urandom(32)) + b"\nnope\n\n" + base64.b64encode(b"short") + b"\n"
        )
        with self.assertRaises(ConfigError) as cm:
            self.parse()
        lines = [p for p in cm.exception.problems if "--secret-key-file" in p]
        self.assertEqual(len(lines), 2, lines)
        self.assertIn("line 2: must hold 32 random bytes", lines[0])
        self.assertIn("line 4: must hold 32 random bytes", lines[1])
