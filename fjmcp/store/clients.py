"""
Registered and fetched MCP clients.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from fjmcp.store.database import Database, Txn


@attrs.frozen
class ClientRecord:
    """
    A registered (or fetched) client as stored.
    """

    client_id: str
    kind: str
    client_secret_hash: bytes | None = attrs.field(repr=False)
    metadata: dict[str, Any]
    created_at: float
    last_used_at: float | None


class ClientStore(Database):
    def create_client(
        self,
        client_id: str,
        kind: str,
        client_secret_hash: bytes | None,
        metadata: dict[str, Any],
    ) -> Deferred[ClientRecord]:
        now = self._now()

        def q(txn: Txn) -> ClientRecord:
            txn.execute(
                "INSERT INTO clients (client_id, kind, client_secret_hash,"
                " token_endpoint_auth_method, redirect_uris, grant_types, response_types,"
                " client_name, metadata, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    client_id,
                    kind,
                    client_secret_hash,
                    metadata["token_endpoint_auth_method"],
                    json.dumps(metadata["redirect_uris"]),
                    json.dumps(metadata["grant_types"]),
                    json.dumps(metadata["response_types"]),
                    metadata.get("client_name"),
                    json.dumps(metadata),
                    now,
                ),
            )
            return ClientRecord(client_id, kind, client_secret_hash, metadata, now, None)

        return self._write("create_client", q)

    def get_client(self, client_id: str) -> Deferred[ClientRecord | None]:
        def q(txn: Txn) -> ClientRecord | None:
            txn.execute(
                "SELECT client_id, kind, client_secret_hash, metadata, created_at, last_used_at"
                " FROM clients WHERE client_id = ?",
                (client_id,),
            )
            row = txn.fetchone()
            if row is None:
                return None
            return ClientRecord(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5])

        return self._read("get_client", q)

    def save_fetched_client(
        self, client_id: str, metadata: dict[str, Any], cache_expires_at: float
    ) -> Deferred[ClientRecord]:
        """
        Record a client known by its metadata document URL, or refresh what
        we know of it; the token endpoint then finds it without fetching.
        """
        now = self._now()

        def q(txn: Txn) -> ClientRecord:
            txn.execute(
                "INSERT INTO clients (client_id, kind, client_secret_hash,"
                " token_endpoint_auth_method, redirect_uris, grant_types, response_types,"
                " client_name, metadata, created_at, fetched_at, cache_expires_at)"
                " VALUES (?, 'cimd', NULL, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (client_id) DO UPDATE SET"
                " token_endpoint_auth_method = excluded.token_endpoint_auth_method,"
                " redirect_uris = excluded.redirect_uris, grant_types = excluded.grant_types,"
                " response_types = excluded.response_types, client_name = excluded.client_name,"
                " metadata = excluded.metadata, fetched_at = excluded.fetched_at,"
                " cache_expires_at = excluded.cache_expires_at"
                " WHERE clients.kind = 'cimd'"
                " RETURNING client_id, kind, client_secret_hash, metadata, created_at,"
                " last_used_at",
                (
                    client_id,
                    metadata["token_endpoint_auth_method"],
                    json.dumps(metadata["redirect_uris"]),
                    json.dumps(metadata["grant_types"]),
                    json.dumps(metadata["response_types"]),
                    metadata.get("client_name"),
                    json.dumps(metadata),
                    now,
                    now,
                    cache_expires_at,
                ),
            )
            row = txn.fetchone()
            if row is None:
                raise ValueError(f"client id {client_id!r} is taken by a registered client")
            return ClientRecord(row[0], row[1], row[2], json.loads(row[3]), row[4], row[5])

        return self._write("save_fetched_client", q)
