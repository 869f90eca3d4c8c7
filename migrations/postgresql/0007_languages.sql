-- Languages (the twin of migrations/sqlite/0007_languages.sql): what a job asks the engine to
-- do with its speech. 'translate' gives English text whatever the spoken language (Whisper's
-- own task); every job before this was a transcription.
ALTER TABLE jobs ADD COLUMN task TEXT NOT NULL DEFAULT 'transcribe' CHECK (task IN ('transcribe', 'translate'));
