"""
Logins in flight and remembered: pending authorization requests (consent
page to Forgejo and back), users' consents per client, broker login sessions.
"""

from __future__ import annotations

from fjmcp.store.database import Database


class AuthorizationStore(Database):
    pass
