-- Issue 29 (shared-nothing cluster): a tus upload's bytes may live in an object store, where one
-- S3 multipart upload holds them and each PATCH adds parts; any node may take the next PATCH.
-- stored: the store's record of the bytes that count (S3: the multipart upload's id, its parts
-- and the object holding the bytes past the last whole part, as JSON); NULL on local disk.
-- next_part: the next S3 part number free to take; each PATCH reserves its numbers here, so two
-- PATCHes never write the same part. patch_claim/patch_claim_until: the one PATCH writing now,
-- cluster-wide (renewed while it runs; a claim past its time, from a node that died, lapses).
-- Twin of migrations/sqlite/0017.
ALTER TABLE uploads ADD COLUMN stored TEXT;
ALTER TABLE uploads ADD COLUMN next_part INTEGER NOT NULL DEFAULT 1;
ALTER TABLE uploads ADD COLUMN patch_claim TEXT;
ALTER TABLE uploads ADD COLUMN patch_claim_until TEXT;
