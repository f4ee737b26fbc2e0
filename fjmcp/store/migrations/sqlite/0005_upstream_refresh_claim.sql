-- Who is renewing a user's Forgejo token right now: Forgejo invalidates
-- the old refresh token on every renewal, so exactly one process (of all
-- broker nodes on this database) may renew at a time.  A process claims
-- the credential at its current generation until refresh_claimed_until;
-- the others wait for the generation to change (and use the new token) or
-- for the claim to lapse (its holder died), then claim it themselves.
ALTER TABLE upstream_credentials ADD COLUMN refresh_claimed_until REAL
