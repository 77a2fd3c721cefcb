-- chatd schema, version 1. Applied once by `chatctl migrate` (or by chatd on
-- the embedded default), inside one transaction with its bookkeeping row.

-- A chat. last_seq is the newest message's seq: bumping it in the same
-- statement that inserts the message takes the chat row's lock, which is what
-- makes seq gapless and in commit order. version counts every change to the
-- chat's messages (send, edit, delete); the Redis page cache is tagged with it
-- and only served while it equals this column, so a stale page is never shown,
-- even after a Redis outage lost an invalidation.
CREATE TABLE chats (
    id          text        PRIMARY KEY CHECK (id ~ '^[A-Za-z0-9_-]{1,64}$'),
    title       text        NOT NULL,
    visibility  text        NOT NULL DEFAULT 'private'
                            CHECK (visibility IN ('private', 'public')),
    created_by  text        NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    last_seq    bigint      NOT NULL DEFAULT 0,
    version     bigint      NOT NULL DEFAULT 0
);

CREATE TABLE chat_members (
    chat_id       text        NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    user_id       text        NOT NULL,
    role          text        NOT NULL DEFAULT 'member'
                              CHECK (role IN ('owner', 'admin', 'member')),
    joined_at     timestamptz NOT NULL DEFAULT now(),
    last_read_seq bigint      NOT NULL DEFAULT 0,
    PRIMARY KEY (chat_id, user_id)
);
-- "the caller's chats" (GET /chats) starts from the user.
CREATE INDEX chat_members_user ON chat_members (user_id, chat_id);

-- A message. Deleting keeps the row as a tombstone (its seq stays taken) and
-- erases the content.
CREATE TABLE messages (
    id         bigserial   PRIMARY KEY,
    chat_id    text        NOT NULL REFERENCES chats (id) ON DELETE CASCADE,
    seq        bigint      NOT NULL,
    sender_id  text        NOT NULL,
    content    text,
    client_id  text,
    created_at timestamptz NOT NULL DEFAULT now(),
    edited_at  timestamptz,
    deleted    boolean     NOT NULL DEFAULT false,
    CHECK (deleted OR content IS NOT NULL),
    -- Every history query is "chat X, seq range, ordered": this is its index.
    CONSTRAINT messages_chat_seq UNIQUE (chat_id, seq)
);
-- Idempotency: one message per (chat, sender, client_id). A repeated send hits
-- this index, which aborts the whole send statement (seq bump included).
CREATE UNIQUE INDEX messages_client_id
    ON messages (chat_id, sender_id, client_id) WHERE client_id IS NOT NULL;
