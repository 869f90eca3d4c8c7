-- Issue 24 (faults): the twin of migrations/postgresql/0013_cluster_identity.sql. The cluster's
-- identity, one row, made by the first node that starts; nodes mark WHISPER_TMP_FILES and
-- WHISPER_OUTPUT_DIR with it (nodes.py). A single box has the table too: one shape for both.
CREATE TABLE cluster_identity (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    identity    TEXT NOT NULL,                           -- a random UUID
    created_at  TEXT NOT NULL,                           -- ISO-8601 UTC
    created_by  TEXT                                     -- WHISPER_NODE_NAME of the first node
);
