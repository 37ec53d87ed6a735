-- Files a turn's bundle produced, listed like its attachments. Turns recorded
-- before this migration produced none; the constant default fills them without
-- rewriting the table.
ALTER TABLE turns ADD COLUMN artifacts JSONB NOT NULL DEFAULT '[]';
