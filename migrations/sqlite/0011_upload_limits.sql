-- Per-token caps on resumable uploads (issue 23): how many may be open (created, not yet used
-- or expired) and how many bytes their Upload-Lengths may declare together.
-- A NULL limit means "the setting's default" (WHISPER_TOKEN_MAX_OPEN_UPLOADS,
-- WHISPER_TOKEN_MAX_UPLOAD_BYTES); 0 means "no limit".
ALTER TABLE api_tokens ADD COLUMN max_open_uploads INTEGER;
ALTER TABLE api_tokens ADD COLUMN max_upload_bytes INTEGER;
-- Counting one owner's open uploads at each creation.
CREATE INDEX uploads_by_owner ON uploads (owner) WHERE job_id IS NULL;
