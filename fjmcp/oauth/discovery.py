"""
The discovery documents: RFC 8414 authorization server metadata and RFC 9728
protected resource metadata.  Every URL comes from configuration, never from
the request, so a forged Host header cannot redirect a client's login.
"""

from __future__ import annotations

from typing import Any

from fjmcp.config import Config

# What the broker accepts; unknown scopes are ignored rather than refused,
# because clients (Claude among them) send their own.
SCOPES_SUPPORTED = ("mcp", "offline_access")


def authorization_server_metadata(config: Config) -> dict[str, Any]:
    issuer = config.public_url
    return {
        "issuer": issuer,
        "authorization_endpoint": issuer + "/oauth/authorize",
        "token_endpoint": issuer + "/oauth/token",
        "registration_endpoint": issuer + "/oauth/register",
        "revocation_endpoint": issuer + "/oauth/revoke",
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": ["authorization_code", "refresh_token"],
        "code_challenge_methods_supported": ["S256"],
        "token_endpoint_auth_methods_supported": [
            "none",
            "client_secret_post",
            "client_secret_basic",
        ],
        "revocation_endpoint_auth_methods_supported": [
            "none",
            "client_secret_post",
            "client_secret_basic",
        ],
        "scopes_supported": list(SCOPES_SUPPORTED),
        "client_id_metadata_document_supported": True,
        "authorization_response_iss_parameter_supported": True,
        "service_documentation": issuer + "/",
    }


def protected_resource_metadata(config: Config) -> dict[str, Any]:
    return {
        "resource": config.mcp_url,
        "authorization_servers": [config.public_url],
        "bearer_methods_supported": ["header"],
        "scopes_supported": list(SCOPES_SUPPORTED),
        "resource_name": "Forgejo via fjmcp",
    }


def resource_metadata_url(config: Config) -> str:
    """
    Where a 401 from /mcp points (the WWW-Authenticate resource_metadata).
    """
    return config.public_url + "/.well-known/oauth-protected-resource/mcp"
