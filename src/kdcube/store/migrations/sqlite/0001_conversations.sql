CREATE TABLE conversations (
    conversation_id TEXT PRIMARY KEY,
    user_id TEXT NOT NULL,
    bundle_id TEXT NOT NULL,
    title TEXT NOT NULL,
    state TEXT NOT NULL,
    current_turn_id TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);

CREATE INDEX conversations_by_user ON conversations (user_id, created_at DESC);

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
    attachments TEXT NOT NULL DEFAULT '[]',
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    UNIQUE (conversation_id, seq)
);

CREATE INDEX turns_unfinished ON turns (state) WHERE state IN ('queued', 'running');
