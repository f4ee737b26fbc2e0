"""
A Forgejo stand-in for tests and the local demo: Forgejo's OAuth2 provider
and the slice of its API that forgejo-mcp uses, over seeded users and
repositories, following C{../shared/brief/forgejo.md}.  Not for production.
"""
