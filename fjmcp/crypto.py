"""
Secrets at rest: opaque random tokens, their SHA-256 digests (the only form
the database keeps), and AES-GCM sealing of upstream Forgejo tokens under the
operator's key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
# A version byte in front of every sealed value leaves room to change the
# scheme (or rotate keys with a key id) without guessing at old rows.
SCHEME_V1 = b"\x01"


class DecryptionError(Exception):
    """
    A sealed value could not be opened: wrong key, or the row was altered.
    """


def new_token(nbytes: int = 32) -> str:
    """
    An opaque, URL-safe random token with C{nbytes} of entropy.
    """
    return secrets.token_urlsafe(nbytes)


def token_hash(token: str) -> bytes:
    """
    The at-rest form of a bearer token, code or state: tokens are random and
    long, so an unsalted digest is enough and lets us look rows up by it.
    """
    return hashlib.sha256(token.encode("utf-8")).digest()


def pkce_s256(verifier: str) -> str:
    """
    The S256 code challenge for C{verifier} (RFC 7636 section 4.2).
    """
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_pkce_pair() -> tuple[str, str]:
    """
    A fresh PKCE verifier (43 characters of the unreserved set) and its S256
    challenge.
    """
    verifier = secrets.token_urlsafe(32)
    return verifier, pkce_s256(verifier)


def constant_time_equal(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8"), b.encode("utf-8"))


class SecretBox:
    """
    Seal and open small secrets with AES-256-GCM.  C{context} is bound into
    the authentication tag, so a sealed token copied into another user's row
    does not open there.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) != 32:
            raise ValueError("SecretBox needs a 32-byte key")
        self._aead = AESGCM(key)

    def seal(self, plaintext: str, context: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        ciphertext = self._aead.encrypt(nonce, plaintext.encode("utf-8"), context.encode("utf-8"))
        return SCHEME_V1 + nonce + ciphertext

    def open(self, sealed: bytes, context: str) -> str:
        if sealed[:1] != SCHEME_V1 or len(sealed) < 1 + NONCE_BYTES + 16:
            raise DecryptionError("unknown sealed-value format")
        nonce = sealed[1 : 1 + NONCE_BYTES]
        try:
            plaintext = self._aead.decrypt(
                nonce, sealed[1 + NONCE_BYTES :], context.encode("utf-8")
            )
        except InvalidTag:
            raise DecryptionError(
                "sealed value does not open with this key (wrong key or altered row)"
            ) from None
        return plaintext.decode("utf-8")
