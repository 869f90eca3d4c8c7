-- Per-token caps on resumable uploads (the twin of migrations/sqlite/0011_upload_limits.sql):
-- how many may be open (created, not yet used or expired) and how many bytes their
-- Upload-Lengths may declare together. NULL: the setting's default; 0: no limit.
ALTER TABLE api_tokens ADD COLUMN max_open_uploads INTEGER;
ALTER TABLE api_tokens ADD COLUMN max_upload_bytes BIGINT;
-- Counting one owner's open uploads at each creation.
CREATE INDEX uploads_by_owner ON uploads (owner) WHERE job_id IS NULL;
