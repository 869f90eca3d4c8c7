-- Webhooks: where to POST a job's end. The URL may carry the receiver's own token in its
-- query, so logs and job_events show only scheme, host, port and path.
-- (Numbered 0003: 0002 belongs to the API tokens work.)
ALTER TABLE jobs ADD COLUMN callback_url TEXT;
-- At start, finished jobs whose notice never went out are looked for among these only.
CREATE INDEX jobs_with_callback ON jobs (seq) WHERE callback_url IS NOT NULL AND expired_at IS NULL;
