-- Live sessions (issue 26): one row per ended realtime session, for GET /usage's live minutes.
-- The twin of migrations/sqlite/0015_live.sql.
CREATE TABLE live_sessions (
    id             TEXT PRIMARY KEY,                     -- sess_...
    owner          TEXT NOT NULL,                        -- the token's name
    started_at     TEXT NOT NULL,                        -- ISO-8601 UTC
    ended_at       TEXT NOT NULL,
    audio_seconds  DOUBLE PRECISION NOT NULL,            -- audio received
    node           TEXT                                  -- WHISPER_NODE_NAME that held it
);
CREATE INDEX live_sessions_owner_started ON live_sessions (owner, started_at);

-- A token's own maximum of open live sessions (token create --max-live-sessions); no row: the
-- WHISPER_TOKEN_MAX_LIVE_SESSIONS default. Keyed by the token's name, rewritten by each create.
CREATE TABLE live_token_limits (
    name               TEXT PRIMARY KEY,
    max_live_sessions  INTEGER NOT NULL CHECK (max_live_sessions >= 0)
);
