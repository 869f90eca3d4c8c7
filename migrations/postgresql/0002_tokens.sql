-- API tokens (the twin of migrations/sqlite/0002_tokens.sql). The token itself is never
-- stored: only its public prefix and a salted, slow hash of the whole token.
CREATE TABLE api_tokens (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name         TEXT NOT NULL,                      -- the identity that owns its jobs
    prefix       TEXT NOT NULL UNIQUE,               -- the 'wd_<prefix>_' part, public
    algorithm    TEXT NOT NULL,                      -- e.g. pbkdf2_sha256$120000
    salt         TEXT NOT NULL,                      -- hex
    hash         TEXT NOT NULL,                      -- hex
    admin        INTEGER NOT NULL DEFAULT 0 CHECK (admin IN (0, 1)),
    created_at   TEXT NOT NULL,
    expires_at   TEXT,                               -- NULL: never
    last_used_at TEXT,                               -- recorded at most once a minute
    revoked_at   TEXT                                -- NULL: in force
);
-- One token in force per name; revoked rows stay as history.
CREATE UNIQUE INDEX api_tokens_live_name ON api_tokens (name) WHERE revoked_at IS NULL;
