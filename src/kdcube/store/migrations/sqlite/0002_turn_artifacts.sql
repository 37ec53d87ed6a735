-- Files a turn's bundle produced, listed like its attachments (a JSON array).
-- Turns recorded before this migration produced none.
ALTER TABLE turns ADD COLUMN artifacts TEXT NOT NULL DEFAULT '[]';
