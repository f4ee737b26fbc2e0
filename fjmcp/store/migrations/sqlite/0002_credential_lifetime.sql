-- The Forgejo access token's lifetime as Forgejo gave it (expires_in, in
-- seconds), which sets how long before expiry it is renewed.  NULL for a
-- credential stored before this column: renewed with the full margin, as
-- before, and the renewal stores its lifetime.
ALTER TABLE upstream_credentials ADD COLUMN lifetime REAL
