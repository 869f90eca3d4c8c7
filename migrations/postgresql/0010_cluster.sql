-- Cluster (issue 14): the node that runs a job and until when its lease holds, and the nodes
-- themselves. Leases and heartbeats use the database's clock (timestamptz, now()), so nodes
-- whose clocks disagree still agree on when a lease ran out.
ALTER TABLE jobs ADD COLUMN node TEXT;                   -- WHISPER_NODE_NAME running it
ALTER TABLE jobs ADD COLUMN lease_until TIMESTAMPTZ;     -- renewed while it runs
CREATE INDEX jobs_by_lease ON jobs (lease_until) WHERE status = 'Processing';

CREATE TABLE nodes (
    name        TEXT PRIMARY KEY,                        -- WHISPER_NODE_NAME
    role        TEXT NOT NULL CHECK (role IN ('all', 'api', 'worker')),
    started_at  TEXT NOT NULL,                           -- ISO-8601 UTC, like every other time
    last_seen   TIMESTAMPTZ NOT NULL,                    -- heartbeat (database clock)
    actor       TEXT                                     -- host:pid of its last heartbeat
);
