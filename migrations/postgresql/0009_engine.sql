-- Engine seam (the twin of migrations/sqlite/0009_engine.sql): the sampling temperature a job
-- asked for (NULL: the engine's own fallback schedule).
ALTER TABLE jobs ADD COLUMN temperature DOUBLE PRECISION;
