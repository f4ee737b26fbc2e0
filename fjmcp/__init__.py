"""
fjmcp: put a Forgejo instance in front of MCP clients.

An OAuth 2.1 authorization server (federated to Forgejo's own OAuth2 provider)
and a broker that gives every MCP session its own C{forgejo-mcp} child process.
"""

__version__ = "0.1.0.dev0"
