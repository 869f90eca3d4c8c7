-- Durability (the twin of migrations/sqlite/0005_durability.sql). Who received a delivered
-- result: the same identity may fetch it again during the grace window
-- (WHISPER_RESULT_GRACE_SECONDS) in case its download was cut short.
ALTER TABLE jobs ADD COLUMN delivered_to TEXT;
