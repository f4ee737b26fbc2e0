-- As sqlite/0002_credential_lifetime.sql: the Forgejo access token's
-- lifetime as Forgejo gave it, in seconds (NULL: stored before it was kept).
ALTER TABLE upstream_credentials ADD COLUMN lifetime DOUBLE PRECISION
