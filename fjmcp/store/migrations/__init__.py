"""
Versioned schema migrations, one folder per engine (C{sqlite/},
C{postgresql/}) with the same C{NNNN_name.sql} files: version N is the same
tables on either engine, spelled in its SQL.  Applied in order at start-up.
"""
