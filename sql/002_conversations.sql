-- chatd schema, version 2: conversations and exact sync (API.md, "contract
-- version 2"). Applied by `chatctl migrate` on top of 001, also to a populated
-- version 1 database.

-- One change, one version. chats.version already counted every change to a
-- chat's messages (it tags the page cache); a message now carries the
-- version of its own latest change, taken from that same counter in the same
-- statement as the change. So `changes?since_version=` is one range read on
-- messages_chat_version, and the page cache stays tagged by the one counter.
--
-- reply_to: the message (same chat) this one answers; reply_count: how many
-- non-deleted messages answer this one. reactions: the aggregate the message
-- JSON shows (one entry per emoji, count exact, first 20 users), rebuilt from
-- the reactions table in the statement that changes it, so a page read never
-- joins. pinned_at: when it was pinned (NULL: not pinned).
ALTER TABLE messages
    ADD COLUMN version     bigint,
    ADD COLUMN reply_to    bigint,
    ADD COLUMN reply_count integer NOT NULL DEFAULT 0,
    ADD COLUMN reactions   json    NOT NULL DEFAULT '[]',
    ADD COLUMN pinned_at   timestamptz;

-- Existing messages: each takes its own version above the chat's current one,
-- in seq order, and the chat's counter moves past them all. Every version is
-- then distinct within its chat and no higher than the chat's, and every page
-- cached by a version 1 process (which lacks the new fields) is stale.
WITH numbered AS (
    SELECT m.id, c.version + row_number() OVER (PARTITION BY m.chat_id ORDER BY m.seq) AS v
      FROM messages m JOIN chats c ON c.id = m.chat_id
)
UPDATE messages m SET version = n.v FROM numbered n WHERE m.id = n.id;

UPDATE chats c SET version = c.version + n.count
  FROM (SELECT chat_id, count(*) AS count FROM messages GROUP BY chat_id) n
 WHERE c.id = n.chat_id;

ALTER TABLE messages ALTER COLUMN version SET NOT NULL;

-- chatd sets every new message's version in its insert. A writer that does
-- not (a version 1 tool inserting rows itself) gets the chat's next version
-- here, so the rule holds whoever writes; the WHEN clause means chatd's own
-- inserts never call the function.
CREATE FUNCTION messages_take_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE chats SET version = version + 1 WHERE id = NEW.chat_id
    RETURNING version INTO NEW.version;
    RETURN NEW;
END $$;
CREATE TRIGGER messages_take_version BEFORE INSERT ON messages
    FOR EACH ROW WHEN (NEW.version IS NULL) EXECUTE FUNCTION messages_take_version();

-- `changes` and `join-chat {since_version}`: "chat X, version > N, ascending".
CREATE UNIQUE INDEX messages_chat_version ON messages (chat_id, version);
-- `/messages/{id}/replies`: the answers to one message, by seq.
CREATE INDEX messages_replies ON messages (reply_to, seq) WHERE reply_to IS NOT NULL;
-- `/chats/{id}/pins`: the pinned messages of a chat, most recently pinned first.
CREATE INDEX messages_pins ON messages (chat_id, pinned_at DESC) WHERE pinned_at IS NOT NULL;

-- One row per (message, emoji, user). id orders the users of an emoji (who
-- reacted first); emoji_since orders the emoji (every current row of one
-- emoji shares the value of the first of them, so an emoji keeps its place
-- while anyone still reacts with it, and counts from its return after it
-- disappeared).
CREATE TABLE reactions (
    message_id  bigint NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    emoji       text   NOT NULL,
    user_id     text   NOT NULL,
    id          bigserial NOT NULL,
    emoji_since bigint NOT NULL,
    PRIMARY KEY (message_id, emoji, user_id)
);

-- Edit history: the text each edit replaced, with when that text was written
-- (created_at for the original, the previous edited_at after that). The
-- current text is the message's own; deleting a message erases its rows.
CREATE TABLE message_edits (
    message_id bigint      NOT NULL REFERENCES messages (id) ON DELETE CASCADE,
    id         bigserial   NOT NULL,
    content    text        NOT NULL,
    at         timestamptz NOT NULL,
    PRIMARY KEY (message_id, id)
);
