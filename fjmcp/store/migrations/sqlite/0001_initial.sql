-- The broker's first schema: OAuth clients and grants on our side, one
-- upstream Forgejo credential per Forgejo user on the other.
-- Times are UNIX seconds (REAL); bearer secrets appear only as SHA-256 digests;
-- upstream tokens only sealed with the operator's key.

-- Forgejo users who have logged in through the broker.
CREATE TABLE users (
    forgejo_user_id INTEGER PRIMARY KEY,
    login           TEXT NOT NULL,
    full_name       TEXT NOT NULL DEFAULT '',
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL
);

-- ONE upstream credential per Forgejo user: Forgejo invalidates every older
-- refresh token of a user+app on each issue, so there is nothing to keep.
CREATE TABLE upstream_credentials (
    forgejo_user_id   INTEGER PRIMARY KEY REFERENCES users(forgejo_user_id) ON DELETE CASCADE,
    access_token_enc  BLOB NOT NULL,
    refresh_token_enc BLOB,
    expires_at        REAL NOT NULL,
    scope             TEXT NOT NULL DEFAULT '',
    generation        INTEGER NOT NULL DEFAULT 1,
    updated_at        REAL NOT NULL
);

-- MCP clients: registered dynamically (RFC 7591) or known by a client ID
-- metadata document URL.
CREATE TABLE clients (
    client_id                  TEXT PRIMARY KEY,
    kind                       TEXT NOT NULL CHECK (kind IN ('dcr', 'cimd')),
    client_secret_hash         BLOB,
    token_endpoint_auth_method TEXT NOT NULL
        CHECK (token_endpoint_auth_method IN ('none', 'client_secret_post', 'client_secret_basic')),
    redirect_uris              TEXT NOT NULL,   -- JSON array
    grant_types                TEXT NOT NULL,   -- JSON array
    response_types             TEXT NOT NULL,   -- JSON array
    client_name                TEXT,
    metadata                   TEXT NOT NULL,   -- JSON object, as registered or fetched
    created_at                 REAL NOT NULL,
    last_used_at               REAL,
    fetched_at                 REAL,            -- CIMD only
    cache_expires_at           REAL             -- CIMD only
);

-- A user's approval of a client, so a returning user skips the consent page.
CREATE TABLE consents (
    forgejo_user_id INTEGER NOT NULL REFERENCES users(forgejo_user_id) ON DELETE CASCADE,
    client_id       TEXT NOT NULL REFERENCES clients(client_id) ON DELETE CASCADE,
    scope           TEXT NOT NULL,
    granted_at      REAL NOT NULL,
    last_used_at    REAL,
    PRIMARY KEY (forgejo_user_id, client_id)
);

-- Broker login cookies (server side, looked up by digest).
CREATE TABLE login_sessions (
    session_hash    BLOB PRIMARY KEY,
    forgejo_user_id INTEGER NOT NULL REFERENCES users(forgejo_user_id) ON DELETE CASCADE,
    created_at      REAL NOT NULL,
    expires_at      REAL NOT NULL
);

-- An authorization request between the consent page and the user's return
-- from Forgejo.  Stored (not in memory) so an in-flight login survives a
-- broker restart.  The consent form's token and the upstream state are
-- different random values, each single use; the browser cookie ties the
-- consent form to the browser that opened it.
CREATE TABLE pending_authorizations (
    id                    INTEGER PRIMARY KEY,
    consent_hash          BLOB NOT NULL UNIQUE,
    browser_hash          BLOB NOT NULL,
    state_hash            BLOB UNIQUE,        -- set when the user approves
    client_id             TEXT NOT NULL REFERENCES clients(client_id) ON DELETE CASCADE,
    redirect_uri          TEXT NOT NULL,
    client_state          TEXT,
    code_challenge        TEXT NOT NULL,
    code_challenge_method TEXT NOT NULL,
    scope                 TEXT NOT NULL,
    resource              TEXT NOT NULL,
    upstream_verifier_enc BLOB,               -- our PKCE verifier toward Forgejo
    created_at            REAL NOT NULL,
    expires_at            REAL NOT NULL
);

-- One chain of tokens that started with one authorization code.  Revoking
-- the family revokes everything issued in it.
CREATE TABLE token_families (
    family_id       TEXT PRIMARY KEY,
    client_id       TEXT NOT NULL REFERENCES clients(client_id) ON DELETE CASCADE,
    forgejo_user_id INTEGER NOT NULL REFERENCES users(forgejo_user_id) ON DELETE CASCADE,
    scope           TEXT NOT NULL,
    resource        TEXT NOT NULL,
    created_at      REAL NOT NULL,
    last_used_at    REAL,
    revoked_at      REAL,
    revoked_reason  TEXT
);
CREATE INDEX token_families_user ON token_families(forgejo_user_id);
CREATE INDEX token_families_client ON token_families(client_id);

CREATE TABLE authorization_codes (
    code_hash             BLOB PRIMARY KEY,
    family_id             TEXT NOT NULL REFERENCES token_families(family_id) ON DELETE CASCADE,
    redirect_uri          TEXT NOT NULL,
    code_challenge        TEXT NOT NULL,
    code_challenge_method TEXT NOT NULL,
    created_at            REAL NOT NULL,
    expires_at            REAL NOT NULL,
    used_at               REAL
);

CREATE TABLE access_tokens (
    token_hash BLOB PRIMARY KEY,
    family_id  TEXT NOT NULL REFERENCES token_families(family_id) ON DELETE CASCADE,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    revoked_at REAL,
    -- A refresh may ask for fewer scopes than the family was granted (RFC
    -- 6749 section 6); NULL means the family's scope.
    scope      TEXT
);
CREATE INDEX access_tokens_family ON access_tokens(family_id);

CREATE TABLE refresh_tokens (
    token_hash BLOB PRIMARY KEY,
    family_id  TEXT NOT NULL REFERENCES token_families(family_id) ON DELETE CASCADE,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    rotated_at REAL,        -- set when exchanged; usable until rotated_at + grace
    revoked_at REAL
);
CREATE INDEX refresh_tokens_family ON refresh_tokens(family_id);
