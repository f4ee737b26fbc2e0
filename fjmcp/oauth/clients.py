"""
MCP clients: dynamic registration (RFC 7591) and looking clients up for the
authorization and token endpoints.  Owns client IDs and client secrets; the
database sees only the secret's digest.
"""

from __future__ import annotations

from typing import Any

from fjmcp.oauth.registration import ClientMetadata, check_client_metadata
from fjmcp.secrets.crypto import constant_time_equal, new_token, token_hash
from fjmcp.store import ClientRecord, Store


class ClientRegistry:
    def __init__(self, store: Store) -> None:
        self._store = store

    async def register(self, body: Any) -> dict[str, Any]:
        """
        Register a client from a parsed request body; returns the RFC 7591
        response.  A secret is issued only to clients that authenticate with
        one; public clients (C{none}) get none.

        @raise fjmcp.oauth.registration.RegistrationError: for bad metadata.
        """
        metadata = check_client_metadata(body)
        client_id = "fjmcp-" + new_token(16)
        secret = None if metadata.is_public else new_token(32)
        record = await self._store.create_client(
            client_id, "dcr", token_hash(secret) if secret else None, metadata.to_json()
        )
        response = metadata.to_json()
        response["client_id"] = client_id
        response["client_id_issued_at"] = int(record.created_at)
        if secret is not None:
            response["client_secret"] = secret
            response["client_secret_expires_at"] = 0
        return response

    async def get(self, client_id: str) -> tuple[ClientRecord, ClientMetadata] | None:
        record = await self._store.get_client(client_id)
        if record is None:
            return None
        return record, ClientMetadata.from_json(record.metadata)

    @staticmethod
    def secret_matches(record: ClientRecord, presented: str | None) -> bool:
        """
        Does C{presented} match the client's registered secret?  Compared as
        digests, in constant time.
        """
        if record.client_secret_hash is None or not presented:
            return False
        return constant_time_equal(token_hash(presented).hex(), record.client_secret_hash.hex())
