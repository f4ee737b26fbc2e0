"""
The OAuth 2.1 authorization server: authorize, tokens, registration, CIMD, discovery, connections.
"""
