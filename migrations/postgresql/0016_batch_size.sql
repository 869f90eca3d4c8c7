-- Issue 28 (speed): the batch size a job asked for (WhisperX's --batch_size); NULL: its device's
-- default (a WHISPER_DEVICES entry's =N, else WHISPER_BATCH_SIZE). Twin of migrations/sqlite/0016.
ALTER TABLE jobs ADD COLUMN batch_size INTEGER;
