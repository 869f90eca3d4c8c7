-- Enrolled voices (the twin of migrations/sqlite/0014_voices.sql): a token's named speaker
-- embeddings. Biometric data (docs/security.md): only the CAM++ embedding is kept (a JSON array
-- of floats), never the sample's audio. `owner` is the token's name, as jobs.owner; revoking
-- the token deletes its voices.
CREATE TABLE voices (
    owner      TEXT NOT NULL,
    name       TEXT NOT NULL,
    embedding  TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (owner, name)
);
