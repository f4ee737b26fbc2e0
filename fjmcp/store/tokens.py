"""
The broker's own grants: token families, authorization codes, access and
refresh tokens (stored as SHA-256 digests only).
"""

from __future__ import annotations

from fjmcp.store.database import Database


class TokenStore(Database):
    pass
