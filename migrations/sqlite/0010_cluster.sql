-- Cluster (issue 14): the twin of migrations/postgresql/0010_cluster.sql. A single box keeps
-- taking back its jobs by process at start; the columns and the nodes table are here so that
-- both ledgers have one shape and /status lists the node either way.
ALTER TABLE jobs ADD COLUMN node TEXT;                   -- WHISPER_NODE_NAME running it
ALTER TABLE jobs ADD COLUMN lease_until TEXT;            -- ISO-8601 UTC, renewed while it runs

CREATE TABLE nodes (
    name        TEXT PRIMARY KEY,                        -- WHISPER_NODE_NAME
    role        TEXT NOT NULL CHECK (role IN ('all', 'api', 'worker')),
    started_at  TEXT NOT NULL,
    last_seen   TEXT NOT NULL,
    actor       TEXT
);
