ALTER TABLE jobs ADD COLUMN audio_seconds REAL;
