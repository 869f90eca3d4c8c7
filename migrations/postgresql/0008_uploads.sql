-- Resumable uploads (the twin of migrations/sqlite/0008_uploads.sql; tus 1.0.0 at /uploads).
-- The bytes live in WHISPER_TMP_FILES/.uploads/<id>; this row is the truth about how many of
-- them count (upload_offset) and whose they are. A finished upload becomes at most one job
-- (job_id); retention deletes rows and bytes whose expires_at has passed.
CREATE TABLE uploads (
    id            TEXT PRIMARY KEY,                   -- the UUID in the Location URL
    owner         TEXT NOT NULL,                      -- identity that created it; others get 404
    upload_length BIGINT NOT NULL CHECK (upload_length >= 0),
    upload_offset BIGINT NOT NULL DEFAULT 0 CHECK (upload_offset >= 0 AND upload_offset <= upload_length),
    filename      TEXT NOT NULL,                      -- from Upload-Metadata, display only
    metadata      TEXT NOT NULL DEFAULT '',           -- Upload-Metadata as sent, echoed by HEAD
    created_at    TEXT NOT NULL,
    updated_at    TEXT NOT NULL,                      -- last PATCH that moved the offset
    expires_at    TEXT NOT NULL,                      -- Upload-Expires
    finished_at   TEXT,                               -- upload_offset reached upload_length
    job_id        TEXT,                               -- the job it became (used once)
    used_at       TEXT
);
CREATE INDEX uploads_by_expiry ON uploads (expires_at) WHERE job_id IS NULL;
