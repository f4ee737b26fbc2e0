-- One record per round trip through Forgejo's login, whatever it is for:
-- completing a client's authorization (purpose 'authorize', tied to its
-- pending authorization) or signing in to the connections page
-- ('connections').  Stored, so a login in flight survives a restart and
-- any broker node can finish it.  The state is single use (the row is
-- deleted by the statement that claims it); the browser cookie ties it to
-- the browser that left for Forgejo; the PKCE verifier is sealed with the
-- broker's key.
--
-- pending_authorizations loses the upstream state and verifier it held
-- for the same purpose: rebuilt without them (SQLite cannot drop a UNIQUE
-- column), its approved rows' logins moved here.
CREATE TEMP TABLE approved_logins AS
    SELECT id, state_hash, browser_hash, upstream_verifier_enc, created_at, expires_at
    FROM pending_authorizations
    WHERE state_hash IS NOT NULL AND upstream_verifier_enc IS NOT NULL;

CREATE TABLE pending_authorizations_new (
    id                    INTEGER PRIMARY KEY,
    consent_hash          BLOB NOT NULL UNIQUE,
    browser_hash          BLOB NOT NULL,
    client_id             TEXT NOT NULL REFERENCES clients(client_id) ON DELETE CASCADE,
    redirect_uri          TEXT NOT NULL,
    client_state          TEXT,
    code_challenge        TEXT NOT NULL,
    code_challenge_method TEXT NOT NULL,
    scope                 TEXT NOT NULL,
    resource              TEXT NOT NULL,
    created_at            REAL NOT NULL,
    expires_at            REAL NOT NULL
);
INSERT INTO pending_authorizations_new
    SELECT id, consent_hash, browser_hash, client_id, redirect_uri, client_state,
           code_challenge, code_challenge_method, scope, resource, created_at, expires_at
    FROM pending_authorizations;
DROP TABLE pending_authorizations;
ALTER TABLE pending_authorizations_new RENAME TO pending_authorizations;

CREATE TABLE forgejo_logins (
    id               INTEGER PRIMARY KEY,
    state_hash       BLOB NOT NULL UNIQUE,
    purpose          TEXT NOT NULL CHECK (purpose IN ('authorize', 'connections')),
    browser_hash     BLOB NOT NULL,
    -- The authorization this login completes (purpose 'authorize' only).
    authorization_id INTEGER UNIQUE
                     REFERENCES pending_authorizations(id) ON DELETE CASCADE,
    verifier_enc     BLOB NOT NULL,
    created_at       REAL NOT NULL,
    expires_at       REAL NOT NULL,
    CHECK ((purpose = 'authorize') = (authorization_id IS NOT NULL))
);
INSERT INTO forgejo_logins
        (state_hash, purpose, browser_hash, authorization_id, verifier_enc, created_at,
         expires_at)
    SELECT state_hash, 'authorize', browser_hash, id, upstream_verifier_enc, created_at,
           expires_at
    FROM approved_logins;
DROP TABLE approved_logins;

-- The connections page's revoke forms: each token is single use, for one
-- login session, until it expires.
CREATE TABLE form_tokens (
    token_hash   BLOB PRIMARY KEY,
    session_hash BLOB NOT NULL REFERENCES login_sessions(session_hash) ON DELETE CASCADE,
    expires_at   REAL NOT NULL
);
