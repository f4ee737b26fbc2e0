"""
Development tools for fjmcp, never shipped with the broker: the Forgejo
stand-in, the demo and the try-client.
"""
