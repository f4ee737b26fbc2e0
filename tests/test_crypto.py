"""
Sealing upstream tokens and hashing our own: what must hold for any input.
"""

from __future__ import annotations

import os

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from fjmcp.secrets.crypto import (
    DecryptionError,
    SecretBox,
    new_pkce_pair,
    new_token,
    pkce_s256,
    token_hash,
)


class SecretBoxTests(SynchronousTestCase):
    box = SecretBox(os.urandom(32))

    @given(st.text(max_size=2000), st.text(max_size=40))
    def test_roundtrip(self, secret: str, context: str) -> None:
        sealed = self.box.seal(secret, context)
        self.assertEqual(self.box.open(sealed, context), secret)
        if len(secret) >= 8:
            self.assertNotIn(secret.encode(), sealed)

    @given(st.text(min_size=1, max_size=200))
    def test_fresh_nonce_each_time(self, secret: str) -> None:
        self.assertNotEqual(self.box.seal(secret, "u1"), self.box.seal(secret, "u1"))

    @given(st.text(max_size=200), st.data())
    def test_tampering_detected(self, secret: str, data: st.DataObject) -> None:
        """
        Flipping any bit of a sealed value makes it refuse to open, with our
        error (not a crash in the cipher).
        """
        sealed = bytearray(self.box.seal(secret, "user:1"))
        index = data.draw(st.integers(0, len(sealed) - 1))
        bit = data.draw(st.integers(0, 7))
        sealed[index] ^= 1 << bit
        self.assertRaises(DecryptionError, self.box.open, bytes(sealed), "user:1")

    def test_context_bound(self) -> None:
        """
        A token sealed for one user does not open as another user's.
        """
        sealed = self.box.seal("forgejo-token", "user:1")
        self.assertRaises(DecryptionError, self.box.open, sealed, "user:2")

    def test_wrong_key(self) -> None:
        sealed = self.box.seal("forgejo-token", "user:1")
        self.assertRaises(DecryptionError, SecretBox(os.urandom(32)).open, sealed, "user:1")

    @given(st.binary(max_size=40))
    def test_garbage(self, junk: bytes) -> None:
        self.assertRaises(DecryptionError, self.box.open, junk, "user:1")


class TokenTests(SynchronousTestCase):
    def test_tokens_unique_and_long(self) -> None:
        tokens = {new_token() for _ in range(1000)}
        self.assertEqual(len(tokens), 1000)
        self.assertTrue(all(len(t) >= 43 for t in tokens))

    @given(st.text(), st.text())
    def test_hash_is_injective_in_practice(self, a: str, b: str) -> None:
        self.assertEqual(token_hash(a) == token_hash(b), a == b)
        self.assertEqual(len(token_hash(a)), 32)


class PKCETests(SynchronousTestCase):
    def test_rfc7636_example(self) -> None:
        """
        The worked example of RFC 7636 appendix B.
        """
        self.assertEqual(
            pkce_s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM",
        )

    def test_pairs(self) -> None:
        verifier, challenge = new_pkce_pair()
        self.assertEqual(pkce_s256(verifier), challenge)
        self.assertTrue(43 <= len(verifier) <= 128)
        self.assertNotEqual(new_pkce_pair(), new_pkce_pair())
