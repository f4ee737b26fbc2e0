-- MCP sessions, so a session outlives its child and the broker process:
-- after a restart (or on another node) the next request with the same
-- Mcp-Session-Id starts a child and replays the client's handshake.  The
-- session id is kept as its SHA-256 digest only.  A row is written once
-- the session's initialize succeeded, updated when it hibernates or the
-- broker stops, and deleted when the session ends.
CREATE TABLE mcp_sessions (
    session_hash     BLOB PRIMARY KEY,
    forgejo_user_id  INTEGER NOT NULL REFERENCES users(forgejo_user_id) ON DELETE CASCADE,
    user_login       TEXT NOT NULL,
    client_id        TEXT NOT NULL,
    family_id        TEXT NOT NULL,
    protocol_version TEXT NOT NULL,
    initialize       TEXT NOT NULL,      -- the client's initialize request, JSON
    created_at       REAL NOT NULL,
    last_used_at     REAL NOT NULL
);
CREATE INDEX mcp_sessions_user ON mcp_sessions(forgejo_user_id, last_used_at);
CREATE INDEX mcp_sessions_last_used ON mcp_sessions(last_used_at);
