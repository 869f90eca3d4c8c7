-- Jobs and their history (the twin of migrations/sqlite/0001_jobs.sql). Times are the same
-- ISO-8601 UTC text as in SQLite and statuses are words, so that an operator with only psql
-- can tell what happened to a job and when, and a job reads the same from either backend.
CREATE TABLE jobs (
    seq              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- FIFO order of acceptance
    id               TEXT NOT NULL UNIQUE,               -- the UUID clients see
    owner            TEXT NOT NULL,                      -- identity that submitted it
    status           TEXT NOT NULL CHECK (status IN
                         ('Queued', 'Processing', 'Completed', 'Failed', 'Canceled')),
    created_at       TEXT NOT NULL,
    started_at       TEXT,
    finished_at      TEXT,
    delivered_at     TEXT,                               -- result fetched, files deleted
    expired_at       TEXT,                               -- retention removed its files
    filename         TEXT NOT NULL,                      -- sanitised client name, display only
    upload_bytes     BIGINT NOT NULL,
    language         TEXT NOT NULL,                      -- as asked ('auto' = detect)
    model            TEXT NOT NULL,
    response_format  TEXT NOT NULL,
    diarize          INTEGER NOT NULL CHECK (diarize IN (0, 1)),
    prompt           TEXT NOT NULL DEFAULT '',
    device           TEXT NOT NULL,
    device_index     TEXT NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,         -- engine starts, for poison detection
    worker           TEXT,                               -- host:pid of the process running it
    engine_pid       INTEGER,                            -- process group of the engine
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress         DOUBLE PRECISION,                   -- 0..100 while Processing
    stage            TEXT,
    detected_language TEXT,
    warnings         TEXT NOT NULL DEFAULT '[]',         -- JSON list of user-facing warnings
    error            TEXT                                -- why it Failed or was Canceled
);
CREATE INDEX jobs_by_status ON jobs (status, seq);
CREATE INDEX jobs_by_finish ON jobs (finished_at) WHERE expired_at IS NULL;

CREATE TABLE job_events (
    id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    job_id  TEXT NOT NULL REFERENCES jobs (id),
    at      TEXT NOT NULL,
    event   TEXT NOT NULL,     -- accepted, started, completed, failed, canceled, requeued, ...
    actor   TEXT,              -- identity or process that caused it
    detail  TEXT
);
CREATE INDEX job_events_by_job ON job_events (job_id, id);
