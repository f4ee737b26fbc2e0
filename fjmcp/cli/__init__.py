"""
Command-line tools for operators (fjmcp-admin).
"""
