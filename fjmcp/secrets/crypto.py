"""
Secrets at rest: opaque random tokens, their SHA-256 digests (the only form
the database keeps), and AES-GCM sealing of upstream Forgejo tokens under the
operator's keys.

A L{SecretBox} holds a key ring: the first key seals, every key opens.  A
sealed value names the key that sealed it by a short key id, so opening
needs no guessing and a value whose key has been retired fails with a clear
L{UnknownKeyError}.  Where the key file lives and how it is re-read while
the daemon runs is L{fjmcp.secrets.keyring}'s business.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32
KEY_ID_BYTES = 8
# A scheme byte in front of every sealed value says how to read the rest.
# 0x01: nonce + ciphertext, with no key id (every value sealed before key
# rotation existed); opened by trying each key of the ring.
SCHEME_V1 = b"\x01"
# 0x02: key id + nonce + ciphertext; the scheme byte and key id are bound
# into the authentication tag along with the context.
SCHEME_V2 = b"\x02"
# The context our PKCE verifier toward Forgejo is sealed under while a login
# is in flight (the authorization flow seals it, key rotation re-seals it).
UPSTREAM_PKCE_CONTEXT = "upstream-pkce"


class DecryptionError(Exception):
    """
    A sealed value could not be opened: wrong key, or the row was altered.
    """


class UnknownKeyError(DecryptionError):
    """
    A sealed value names a key that is not in the ring (retired, or the key
    file is not the one the value was sealed under).
    """

    def __init__(self, key_id: bytes) -> None:
        super().__init__(
            f"sealed under key {key_id.hex()}, which is not in the key file "
            "(retired, or the wrong key file)"
        )
        self.key_id = key_id


def key_id(key: bytes) -> bytes:
    """
    The short public name of a key: the first bytes of a domain-separated
    SHA-256 of it.  It tells keys apart; it does not help guess one.
    """
    return hashlib.sha256(b"fjmcp key id\x00" + key).digest()[:KEY_ID_BYTES]


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
    Seal and open small secrets with AES-256-GCM under a ring of keys: the
    first key seals, any key opens.  C{context} is bound into the
    authentication tag, so a sealed token copied into another user's row
    does not open there.
    """

    def __init__(self, keys: bytes | Sequence[bytes]) -> None:
        self._set_keys(keys)

    def _set_keys(self, keys: bytes | Sequence[bytes]) -> None:
        ring = (keys,) if isinstance(keys, bytes) else tuple(keys)
        if not ring:
            raise ValueError("SecretBox needs at least one key")
        if any(len(key) != KEY_BYTES for key in ring):
            raise ValueError(f"SecretBox keys must be {KEY_BYTES} bytes")
        self._keys = ring
        self._aeads = {key_id(key): AESGCM(key) for key in reversed(ring)}
        self._current = key_id(ring[0])

    @property
    def keys(self) -> tuple[bytes, ...]:
        return self._keys

    @property
    def current_key_id(self) -> bytes:
        return self._current

    def seal(self, plaintext: str, context: str) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        header = SCHEME_V2 + self._current
        ciphertext = self._aeads[self._current].encrypt(
            nonce, plaintext.encode("utf-8"), header + context.encode("utf-8")
        )
        return header + nonce + ciphertext

    def open(self, sealed: bytes, context: str) -> str:
        """
        @raise UnknownKeyError: the value names a key not in the ring.
        @raise DecryptionError: any other value that does not open.
        """
        scheme = sealed[:1]
        if scheme == SCHEME_V2 and len(sealed) >= 1 + KEY_ID_BYTES + NONCE_BYTES + TAG_BYTES:
            kid = sealed[1 : 1 + KEY_ID_BYTES]
            aead = self._aeads.get(kid)
            if aead is None:
                raise UnknownKeyError(kid)
            body = sealed[1 + KEY_ID_BYTES :]
            aad = sealed[: 1 + KEY_ID_BYTES] + context.encode("utf-8")
            candidates = [aead]
        elif scheme == SCHEME_V1 and len(sealed) >= 1 + NONCE_BYTES + TAG_BYTES:
            body = sealed[1:]
            aad = context.encode("utf-8")
            candidates = list(self._aeads.values())
        else:
            raise DecryptionError("unknown sealed-value format")
        nonce, ciphertext = body[:NONCE_BYTES], body[NONCE_BYTES:]
        for aead in candidates:
            try:
                return aead.decrypt(nonce, ciphertext, aad).decode("utf-8")
            except InvalidTag:
                continue
        raise DecryptionError("sealed value does not open with any key (wrong key or altered row)")

    def sealed_key_id(self, sealed: bytes) -> bytes | None:
        """
        The id of the key a value names, or None for the old format without one.
        """
        if sealed[:1] == SCHEME_V2 and len(sealed) > KEY_ID_BYTES:
            return sealed[1 : 1 + KEY_ID_BYTES]
        return None

    def reseal(self, sealed: bytes, context: str) -> bytes | None:
        """
        C{sealed} sealed again under the current key, or None when it already is.

        @raise DecryptionError: it does not open with any key of the ring.
        """
        if self.sealed_key_id(sealed) == self._current:
            return None
        return self.seal(self.open(sealed, context), context)
