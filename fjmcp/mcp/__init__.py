"""
MCP sessions: children, message routing, JSON-RPC, the process's resources.
"""
