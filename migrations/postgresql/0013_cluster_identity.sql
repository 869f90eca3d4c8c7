-- Issue 24 (faults): the cluster's identity, one row, made by the first node that starts. Every
-- node marks WHISPER_TMP_FILES and WHISPER_OUTPUT_DIR with it (a .whisperd-cluster file) and
-- refuses to start when a directory carries another mark, or none once the cluster has marked
-- its own: a node pointed at another directory is stopped before it loses a job.
CREATE TABLE cluster_identity (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    identity    TEXT NOT NULL,                           -- a random UUID
    created_at  TEXT NOT NULL,                           -- ISO-8601 UTC
    created_by  TEXT                                     -- WHISPER_NODE_NAME of the first node
);
