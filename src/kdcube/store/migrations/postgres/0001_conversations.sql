-- Same tables as the SQLite store. Times are epoch milliseconds. Unqualified
-- names: the migration runs with search_path set to the project's schema.

CREATE TABLE conversations (
    conversation_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    bundle_id TEXT NOT NULL,
    title TEXT NOT NULL,
    state TEXT NOT NULL,
    current_turn_id TEXT,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    -- Insertion order, the tie-break of "newest first" (SQLite uses rowid).
    created_order BIGINT GENERATED ALWAYS AS IDENTITY
);

CREATE INDEX conversations_by_user
    ON conversations (user_id, created_at DESC, created_order DESC);

CREATE TABLE turns (
    turn_id TEXT PRIMARY KEY,
    conversation_id TEXT NOT NULL
        REFERENCES conversations (conversation_id) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    bundle_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    message_kind TEXT NOT NULL,
    prompt TEXT NOT NULL,
    state TEXT NOT NULL,
    final_answer TEXT,
    error_type TEXT,
    error TEXT,
    attachments JSONB NOT NULL DEFAULT '[]',
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    UNIQUE (conversation_id, seq)
);

CREATE INDEX turns_unfinished ON turns (state) WHERE state IN ('queued', 'running');
