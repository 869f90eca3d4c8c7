-- Tenants (the twin of migrations/sqlite/0006_tenants.sql): per-token limits, the listing's
-- and the usage's indexes, and the fair scheduler's memory of whom it served last.
-- A NULL limit means "the setting's default" (WHISPER_TOKEN_MAX_*); 0 means "no limit".
ALTER TABLE api_tokens ADD COLUMN max_queued INTEGER;
ALTER TABLE api_tokens ADD COLUMN max_audio_minutes_per_day DOUBLE PRECISION;
ALTER TABLE api_tokens ADD COLUMN max_file_size BIGINT;
-- A caller's jobs, newest first (GET /transcription), and its usage by day (GET /usage).
CREATE INDEX jobs_by_owner ON jobs (owner, seq);
CREATE INDEX jobs_by_owner_created ON jobs (owner, created_at);
-- The fair claim looks at the oldest queued job of each owner.
CREATE INDEX jobs_by_status_owner ON jobs (status, owner, seq);
-- One row per identity the scheduler has served: `turn` grows by one per claim (cluster-wide),
-- so the identity with the smallest turn (or none) was served least recently.
CREATE TABLE scheduling_turns (
    owner TEXT PRIMARY KEY,
    turn  BIGINT NOT NULL
);
