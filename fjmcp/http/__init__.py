"""
The HTTP face: routes, the /mcp wire format, pages, rate limits, metrics serving.
"""
