-- Issue 20: the sampling temperature a job asked for (NULL: the engine's own fallback schedule).
ALTER TABLE jobs ADD COLUMN temperature REAL;
