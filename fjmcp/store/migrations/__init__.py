"""
Versioned schema migrations: C{NNNN_name.sql}, applied in order at start-up.
"""
