-- chatd schema, version 3: search, mentions and direct chats (API.md,
-- "Conversations, exact sync, search": Search, Mentions, Direct chats).
-- Applied by `chatctl migrate` on top of 002, also to a populated database.

-- Direct chats: kind 'direct'. Their id is derived by chatd from the pair of
-- users (chatd.text.direct_chat_id), so the chats primary key is the unique
-- constraint that makes two concurrent PUT /direct calls from both sides end
-- with one chat (INSERT ... ON CONFLICT DO NOTHING, never check-then-insert).
ALTER TABLE chats
    ADD COLUMN kind text NOT NULL DEFAULT 'group' CHECK (kind IN ('group', 'direct'));

-- search: the message's tsvector, written by the same statement that writes
-- its content (send, edit; a delete sets it NULL so a tombstone never
-- matches). chatd folds accents and case itself (chatd.text.fold: NFKD,
-- combining marks dropped, casefold) before to_tsvector, because the
-- embedded PostgreSQL has no unaccent extension; it folds the query the same
-- way. mentions: the members the message names (API.md "mentions"), decided
-- by the send or edit statement under the chat's row lock.
ALTER TABLE messages
    ADD COLUMN search   tsvector,
    ADD COLUMN mentions text[] NOT NULL DEFAULT '{}';

-- Existing messages: folded here in SQL as closely as PostgreSQL allows
-- (normalize NFKD, the combining-mark blocks dropped, lower), with the
-- default configuration 'simple'. The next edit of a message re-indexes it
-- with chatd's own folding and SEARCH_LANGUAGE (docs/API-NOTES.md).
UPDATE messages
   SET search = to_tsvector('simple', lower(regexp_replace(
           normalize(content, NFKD),
           '[\u0300-\u036f\u1ab0-\u1aff\u1dc0-\u1dff\u20d0-\u20ff\ufe20-\ufe2f]', '', 'g')))
 WHERE NOT deleted;

-- GET /search: the GIN index answers "@@ query"; the chat scope and the
-- newest-first order are applied to its matches.
CREATE INDEX messages_search ON messages USING gin (search);

-- One row per (mentioned user, message), kept by the trigger below from
-- messages.mentions, so whoever writes a message (a send, an edit, a
-- delete that empties mentions) keeps the feed right in the same statement.
-- GET /mentions is a range read on the primary key (user, newest id first);
-- unread_mentions in GET /chats is a range read on mentions_unread.
CREATE TABLE mentions (
    user_id    text   NOT NULL,
    message_id bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    chat_id    text   NOT NULL,
    seq        bigint NOT NULL,
    PRIMARY KEY (user_id, message_id)
);
CREATE INDEX mentions_unread ON mentions (user_id, chat_id, seq);

CREATE FUNCTION messages_keep_mentions() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' THEN
        DELETE FROM mentions m
         WHERE m.message_id = NEW.id AND NOT (m.user_id = ANY (NEW.mentions));
    END IF;
    INSERT INTO mentions (user_id, message_id, chat_id, seq)
    SELECT u, NEW.id, NEW.chat_id, NEW.seq FROM unnest(NEW.mentions) AS u
    ON CONFLICT DO NOTHING;
    RETURN NULL;
END $$;
-- The WHEN clauses keep the trigger off the common path: a message that
-- names nobody, and a change that leaves mentions alone (reactions, pins,
-- reply counts), never call the function.
CREATE TRIGGER messages_mentions_insert AFTER INSERT ON messages
    FOR EACH ROW WHEN (cardinality(NEW.mentions) > 0) EXECUTE FUNCTION messages_keep_mentions();
CREATE TRIGGER messages_mentions_update AFTER UPDATE OF mentions ON messages
    FOR EACH ROW WHEN (OLD.mentions IS DISTINCT FROM NEW.mentions)
    EXECUTE FUNCTION messages_keep_mentions();

-- Every message JSON now has "mentions": pages cached by an older process
-- (keyed by the chat's version, sql/001) lack it, so every chat moves to a
-- version no cached page carries. A client sees a version no message has,
-- which API.md allows (a version jump is filled from `changes`).
UPDATE chats SET version = version + 1;
