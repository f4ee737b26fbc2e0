-- As sqlite/0005_upstream_refresh_claim.sql: the one renewal of a user's
-- Forgejo token under way, across all broker nodes (see there).
ALTER TABLE upstream_credentials ADD COLUMN refresh_claimed_until DOUBLE PRECISION
