"""
The broker's state in SQLite, behind an async API.

This package owns every SQL statement; the rest of the code calls L{Store}.
Each module holds the tables of one concern as a mixin over L{Database}
(the pool, named transactions, migrations), the way Synapse composes its
data store.
"""

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
from fjmcp.store.tokens import TokenStore


class Store(AdminStore, AuthorizationStore, ClientStore, CredentialStore, TokenStore, Database):
    """
    Every read and write of broker state.
    """


__all__ = [
    "ClientRecord",
    "ClientSummary",
    "Database",
    "Migration",
    "ResealBatch",
    "SchemaTooNewError",
    "SealedCredential",
    "Store",
    "StoreError",
    "UpstreamUser",
    "apply_migrations",
    "configure_connection",
    "known_migrations",
    "make_pool",
    "migrate_database",
]
