-- Issue 24 (item 3): a token per claim. Every write a runner makes to its job carries it in the
-- WHERE, so a runner whose job was taken back (even by its own node, claimed again) writes nothing.
ALTER TABLE jobs ADD COLUMN lease TEXT;
