"""
The broker's state in SQLite, behind an async API.

This package owns every SQL statement; the rest of the code calls L{Store}.
Each module holds the tables of one concern as a mixin over L{Database}
(the pool, named transactions, migrations), the way Synapse composes its
data store.
"""

from twisted.internet.defer import Deferred

from fjmcp.store.admin import AdminStore, ClientSummary, ResealBatch
from fjmcp.store.authorizations import AuthorizationStore
from fjmcp.store.clients import ClientRecord, ClientStore
from fjmcp.store.credentials import CredentialStore, SealedCredential, UpstreamUser
from fjmcp.store.database import (
    Database,
    Migration,
    SchemaTooNewError,
    StoreError,
    apply_migrations,
    configure_connection,
    known_migrations,
    make_pool,
    migrate_database,
)
from fjmcp.store.logins import ForgejoLogin, LoginStore
from fjmcp.store.mcp_sessions import MCPSessionStore, StoredSession
from fjmcp.store.tokens import TokenStore

# Used codes and rotated refresh tokens are kept a day past their expiry, so a
# late replay is still recognised (and logged) as one.
KEEP_EXPIRED = 86400.0


class Store(
    AdminStore,
    AuthorizationStore,
    ClientStore,
    CredentialStore,
    LoginStore,
    MCPSessionStore,
    TokenStore,
    Database,
):
    """
    Every read and write of broker state.
    """

    def purge_expired(self) -> Deferred[tuple[int, int]]:
        """
        Forget abandoned logins and expired login sessions, and codes and
        tokens dead for longer than L{KEEP_EXPIRED}: the one rule shared by
        the daemon's purge timer and C{fjmcp-admin purge}.  Returns (logins,
        codes and tokens) deleted.
        """
        return Deferred.fromCoroutine(self._purge_expired())

    async def _purge_expired(self) -> tuple[int, int]:
        logins = await self.purge_expired_authorizations()
        tokens = await self.prune_tokens(self._now() - KEEP_EXPIRED)
        return logins, tokens


__all__ = [
    "KEEP_EXPIRED",
    "ClientRecord",
    "ClientSummary",
    "Database",
    "ForgejoLogin",
    "Migration",
    "ResealBatch",
    "SchemaTooNewError",
    "SealedCredential",
    "Store",
    "StoreError",
    "StoredSession",
    "UpstreamUser",
    "apply_migrations",
    "configure_connection",
    "known_migrations",
    "make_pool",
    "migrate_database",
]
