-- Hostile media (the twin of migrations/sqlite/0004_media.sql): the decoded audio's length,
-- measured at intake; the job's time limit and the audio quotas are counted from it.
ALTER TABLE jobs ADD COLUMN audio_seconds DOUBLE PRECISION;
