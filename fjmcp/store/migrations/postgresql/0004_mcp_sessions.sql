-- As sqlite/0004_mcp_sessions.sql: MCP sessions kept beyond their child and
-- the broker process, so any node resumes them (see there).
CREATE TABLE mcp_sessions (
    session_hash     BYTEA PRIMARY KEY,
    forgejo_user_id  BIGINT NOT NULL REFERENCES users(forgejo_user_id) ON DELETE CASCADE,
    user_login       TEXT NOT NULL,
    client_id        TEXT NOT NULL,
    family_id        TEXT NOT NULL,
    protocol_version TEXT NOT NULL,
    initialize       TEXT NOT NULL,
    created_at       DOUBLE PRECISION NOT NULL,
    last_used_at     DOUBLE PRECISION NOT NULL
);
CREATE INDEX mcp_sessions_user ON mcp_sessions(forgejo_user_id, last_used_at);
CREATE INDEX mcp_sessions_last_used ON mcp_sessions(last_used_at);
