"""
Client ID Metadata Documents (draft-ietf-oauth-client-id-metadata-document,
MCP authorization 2025-11-25): a client whose C{client_id} is an https URL
publishes its metadata as JSON at that URL, and the authorization server
fetches it.  This package owns that fetch and nothing else:

  - L{client_ids}: which client ids are metadata-document URLs
    (L{is_cimd_client_id}) and where they point;
  - L{addresses}: the SSRF guard's rules: the host name is resolved once
    and every address it resolves to must be public
    (L{blocked_address_reason});
  - L{transport}: the connection then goes to a vetted address, never to
    the name again, so a DNS answer that changes between check and connect
    cannot steer the request; TLS still verifies the certificate against
    the host name; the body is read up to a cap;
  - L{documents}: the identity and secret checks a document must pass
    (L{check_document}): its C{client_id} is exactly its URL, it carries no
    client secret, it asks for no token endpoint authentication but
    C{none}, and it names redirect URIs;
  - L{fetcher}: the limits (one overall timeout, no redirects, HTTP 200 and
    C{application/json} only) and a per-URL cache that honours
    C{Cache-Control} within bounds, briefly remembers failures, and lets
    concurrent fetches of one URL share one request;
  - L{errors}: every refusal is a L{CIMDError} whose message can be shown
    to the client as an C{invalid_client} description.

Field-by-field validation of the metadata (redirect URI rules, names, logos)
belongs to L{fjmcp.oauth.registration}.  The names other modules use are
re-exported here.
"""

from fjmcp.oauth.cimd.addresses import blocked_address_reason, system_resolver
from fjmcp.oauth.cimd.client_ids import Target, is_cimd_client_id, parse_client_id
from fjmcp.oauth.cimd.documents import check_document, parse_document
from fjmcp.oauth.cimd.errors import CIMDError
from fjmcp.oauth.cimd.fetcher import ClientMetadataFetcher, cache_lifetime

__all__ = [
    "CIMDError",
    "ClientMetadataFetcher",
    "Target",
    "blocked_address_reason",
    "cache_lifetime",
    "check_document",
    "is_cimd_client_id",
    "parse_client_id",
    "parse_document",
    "system_resolver",
]
