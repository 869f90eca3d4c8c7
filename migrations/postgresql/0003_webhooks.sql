-- Webhooks (the twin of migrations/sqlite/0003_webhooks.sql): where to POST a job's end.
-- The URL may carry the receiver's own token in its query, so logs and job_events show only
-- scheme, host, port and path.
ALTER TABLE jobs ADD COLUMN callback_url TEXT;
CREATE INDEX jobs_with_callback ON jobs (seq) WHERE callback_url IS NOT NULL AND expired_at IS NULL;
