"""chatctl seed: through the domain, idempotent, reconciling, all-or-nothing
validation with errors that name the line or key, events to running chatd."""

import asyncio
import signal
import textwrap
import uuid

import orjson
import pytest

from .clitools import chatctl_fixture, one_line_error, query  # noqa: F401
from .helpers import SocketClient


def _ids():
    tag = uuid.uuid4().hex[:10]
    return f"s-{tag}-a", f"s-{tag}-b"


def _write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def _seed_yaml(a: str, b: str, bob_role: str = "admin", extra_member: str = "") -> str:
    return f"""\
        chats:
          - id: {a}
            title: General
            visibility: public
            members:
              - {{user: alice, role: owner}}
              - {{user: bob, role: {bob_role}}}
              - carol
              {extra_member}
            messages:
              - {{sender: alice, content: "Welcome!"}}
              - {{sender: bob, content: "Hi"}}
              - {{sender: bob, content: "Hi"}}
              - {{sender: carol, content: "hey", client_id: "carol-1"}}
          - id: {b}
            title: Secret
            members: [{{user: dave, role: owner}}, erin]
        """


def _members(database_url, chat_id):
    return dict(
        query(database_url, "SELECT user_id, role FROM chat_members WHERE chat_id = %s", (chat_id,))
    )


def _messages(database_url, chat_id):
    return query(
        database_url,
        "SELECT id, seq, sender_id, content, client_id FROM messages WHERE chat_id = %s"
        " ORDER BY seq",
        (chat_id,),
    )


def test_seed_file_creates_chats_members_and_messages_in_order(chatctl, database_url, tmp_path):
    a, b = _ids()
    result = chatctl("seed", _write(tmp_path, "seed.yaml", _seed_yaml(a, b)))
    assert result.exit_code == 0, result.output
    assert "chats: 2 created" in result.stdout
    assert "messages: 4 sent, 0 already there" in result.stdout
    assert _members(database_url, a) == {"alice": "owner", "bob": "admin", "carol": "member"}
    assert _members(database_url, b) == {"dave": "owner", "erin": "member"}
    rows = _messages(database_url, a)
    assert [(r[1], r[2], r[3]) for r in rows] == [
        (1, "alice", "Welcome!"),
        (2, "bob", "Hi"),
        (3, "bob", "Hi"),
        (4, "carol", "hey"),
    ]
    assert rows[3][4] == "carol-1"
    # Deterministic ids for the others, distinct even for a repeated text.
    assert len({r[4] for r in rows}) == 4
    assert query(database_url, "SELECT visibility, last_seq FROM chats WHERE id = %s", (a,)) == [
        ("public", 4)
    ]


def test_seeding_the_same_file_twice_changes_nothing(chatctl, database_url, tmp_path):
    a, b = _ids()
    path = _write(tmp_path, "seed.yaml", _seed_yaml(a, b))
    assert chatctl("seed", path).exit_code == 0
    before = _messages(database_url, a), _members(database_url, a), _members(database_url, b)
    again = chatctl("seed", path)
    assert again.exit_code == 0, again.output
    assert "chats: 0 created, 2 already there" in again.stdout
    assert "members: 0 added, 0 re-roled" in again.stdout
    assert "messages: 0 sent, 4 already there" in again.stdout
    after = _messages(database_url, a), _members(database_url, a), _members(database_url, b)
    assert after == before


def test_seeding_an_existing_chat_reconciles_members_and_roles(chatctl, database_url, tmp_path):
    a, b = _ids()
    assert chatctl("seed", _write(tmp_path, "one.yaml", _seed_yaml(a, b))).exit_code == 0
    changed = _seed_yaml(a, b, bob_role="member", extra_member="- {user: frank, role: admin}")
    result = chatctl("seed", _write(tmp_path, "two.yaml", changed))
    assert result.exit_code == 0, result.output
    assert "members: 1 added, 1 re-roled" in result.stdout
    assert _members(database_url, a) == {
        "alice": "owner",
        "bob": "member",
        "carol": "member",
        "frank": "admin",
    }


def test_seed_json_file_works_like_yaml(chatctl, database_url, tmp_path):
    a, _ = _ids()
    doc = [{"id": a, "title": "J", "members": [{"user_id": "alice", "role": "owner"}, "bob"],
            "messages": [{"sender": "bob", "content": "from json"}]}]  # fmt: skip
    path = tmp_path / "seed.json"
    path.write_bytes(orjson.dumps(doc))
    result = chatctl("seed", str(path))
    assert result.exit_code == 0, result.output
    assert [r[3] for r in _messages(database_url, a)] == ["from json"]


@pytest.mark.parametrize(
    "name, text, expected",
    [
        (
            "bad-role.yaml",
            """\
            chats:
              - id: {a}
                title: ok
                members: [{{user: alice, role: owner}}]
              - id: {b}
                title: ok
                members:
                  - {{user: alice, role: boss}}
            """,
            "line 8: chats[1].members[0].role: role must be",
        ),
        (
            "syntax.yaml",
            """\
            chats:
              - id: {a}
                title: [unclosed
            """,
            "line 4, column 1:",
        ),
        (
            "missing-title.yaml",
            """\
            - id: {a}
              title: ok
              members: [{{user: alice, role: owner}}]
            - id: {b}
              members: [{{user: alice, role: owner}}]
            """,
            "line 4: [1].title: title must be a non-empty string",
        ),
        (
            "outsider.yaml",
            """\
            chats:
              - id: {a}
                title: ok
                members: [{{user: alice, role: owner}}]
                messages:
                  - {{sender: alice, content: fine}}
                  - {{sender: mallory, content: sneaky}}
            """,
            "line 7: chats[0].messages[1].sender: 'mallory' is not listed in the members",
        ),
        (
            "syntax.json",
            '{{"chats": [\n  {{"id": "{a}",\n   "title": "t",}}\n]}}',
            "line 3, column 16: trailing comma is not allowed",
        ),
        (
            "bad-id.json",
            '[{{"id": "{a}", "title": "t", "members": [{{"user": "x", "role": "owner"}}]}},'
            ' {{"id": "no good"}}]',
            "[1].id: id must be 1-64 characters",
        ),
    ],
)
def test_bad_seed_file_names_line_or_key_and_writes_nothing(
    chatctl, database_url, tmp_path, name, text, expected
):
    a, b = _ids()
    path = _write(tmp_path, name, text.format(a=a, b=b))
    done = chatctl.process("seed", path)
    assert done.returncode == 2, done.stderr
    assert expected in one_line_error(done.stderr)
    assert query(database_url, "SELECT id FROM chats WHERE id IN (%s, %s)", (a, b)) == []


def test_seed_demo_creates_chats_with_messages_and_reruns_cleanly(chatctl, database_url):
    # demo ids are fixed (demo-1 ...): earlier runs on this database are fine,
    # the command reconciles rather than fails.
    first = chatctl("seed", "--demo", "--chats", "2", "--messages", "30")
    assert first.exit_code == 0, first.output
    rows = query(
        database_url,
        "SELECT chat_id, count(*), max(seq) FROM messages"
        " WHERE chat_id IN ('demo-1', 'demo-2') GROUP BY chat_id ORDER BY chat_id",
    )
    assert rows == [("demo-1", 30, 30), ("demo-2", 30, 30)]
    again = chatctl("seed", "--demo", "--chats", "2", "--messages", "30")
    assert "messages: 0 sent, 60 already there" in again.stdout
    assert "seeding" in again.stderr  # the progress bar's label


def test_seed_needs_exactly_one_of_file_and_demo(chatctl, tmp_path):
    assert chatctl("seed").exit_code == 2
    path = _write(tmp_path, "x.yaml", "[]")
    assert chatctl("seed", path, "--demo").exit_code == 2


@pytest.mark.gen_test(timeout=60)
async def test_seeded_messages_reach_running_chatd_sockets_and_history(
    chatctl, chatd, api, chat_id, tmp_path
):
    await api.create_chat(chat_id, members=["bob"])
    await api.send(chat_id, "before the seed")
    history = await api.get(f"/chats/{chat_id}/messages")  # warms the page cache
    assert len(history.json["messages"]) == 1
    client = await SocketClient(f"http://127.0.0.1:{chatd.port}", user="bob").connect()
    try:
        assert (await client.call("join-chat", chat_id))["ok"]
        path = _write(
            tmp_path,
            "live.yaml",
            f"""\
            - id: {chat_id}
              title: Test chat
              members: [{{user: alice, role: owner}}, bob]
              messages:
                - {{sender: bob, content: "seeded one"}}
                - {{sender: alice, content: "seeded two"}}
            """,
        )
        result = await asyncio.to_thread(chatctl, "seed", path)
        assert result.exit_code == 0, result.output
        await client.wait_for("new-message", lambda m: m["content"] == "seeded two")
        assert [m["seq"] for m in client.of("new-message")] == [2, 3]
    finally:
        await client.close()
    # The page cache was kept in step by the domain: history is complete.
    history = await api.get(f"/chats/{chat_id}/messages")
    contents = [m["content"] for m in history.json["messages"]]
    assert contents == ["before the seed", "seeded one", "seeded two"]


@pytest.mark.slow
def test_two_seeds_of_one_file_at_once_write_each_message_once_in_file_order(
    chatctl, database_url, tmp_path
):
    a, _ = _ids()
    lines = "\n".join(f"      - {{sender: alice, content: 'msg {i}'}}" for i in range(40))
    path = _write(tmp_path, "race.yaml", f"""\
        - id: {a}
          title: Race
          members: [{{user: alice, role: owner}}, bob]
          messages:
    """)  # fmt: skip
    with open(path, "a") as f:
        f.write(lines + "\n")
    procs = [chatctl.spawn("seed", path) for _ in range(2)]
    codes = [p.proc.wait(60) for p in procs]
    for p in procs:
        p.finish(signal.SIGTERM)
    assert codes == [0, 0], [p.err for p in procs]
    rows = _messages(database_url, a)
    assert [(r[1], r[3]) for r in rows] == [(i + 1, f"msg {i}") for i in range(40)]


def test_seed_takes_replies_and_reactions_once(chatctl, database_url, tmp_path):
    a, _ = _ids()
    text = f"""\
        chats:
          - id: {a}
            title: Threads
            members: [{{user: alice, role: owner}}, bob, carol]
            messages:
              - {{sender: alice, content: "question"}}
              - sender: bob
                content: "answer"
                reply_to: 0
                reactions: {{"👍🏽": [alice, carol], ":tada:": [alice]}}
        """
    path = _write(tmp_path, "threads.yaml", text)
    for reactions_added in (3, 0):  # the second run changes nothing
        result = chatctl("seed", path)
        assert result.exit_code == 0, result.output
        assert f"reactions: {reactions_added} added" in result.stdout
    rows = query(
        database_url,
        "SELECT seq, reply_to, reply_count, reactions::text, version FROM messages"
        " WHERE chat_id = %s ORDER BY seq",
        (a,),
    )
    first_id = _messages(database_url, a)[0][0]
    assert [(r[0], r[1], r[2]) for r in rows] == [(1, None, 1), (2, first_id, 0)]
    assert orjson.loads(rows[1][3]) == [
        {"emoji": "👍🏽", "count": 2, "users": ["alice", "carol"]},
        {"emoji": ":tada:", "count": 1, "users": ["alice"]},
    ]
    assert rows[1][4] == 6  # 2 sends, the parent's reply count, 3 reactions


@pytest.mark.parametrize(
    ("message", "key"),
    [
        ('{sender: alice, content: "x", reply_to: 0}', "reply_to"),
        ('{sender: alice, content: "x", reactions: {"nope": [alice]}}', "reactions.nope"),
        ('{sender: alice, content: "x", reactions: {"👍": [mallory]}}', "reactions.👍"),
    ],
)
def test_seed_refuses_bad_replies_and_reactions_by_key(chatctl, tmp_path, message, key):
    a, _ = _ids()
    text = f"""\
        chats:
          - id: {a}
            title: Bad
            members: [{{user: alice, role: owner}}]
            messages:
              - {message}
        """
    result = chatctl("seed", _write(tmp_path, "bad.yaml", text))
    assert result.exit_code == 2, result.output
    assert f"messages[0].{key}" in result.output


@pytest.mark.gen_test(timeout=60)
async def test_seed_tells_running_chatd_of_new_chats_reactions_and_replies(
    chatctl, chatd, tmp_path
):
    """Through the write-only emitter: chat-added to the members' sockets, and
    the reply's parent and each reaction as message-updated, in version order."""
    a, _ = _ids()
    client = await SocketClient(f"http://127.0.0.1:{chatd.port}", user="bob").connect()
    try:
        path = _write(
            tmp_path,
            "live2.yaml",
            f"""\
            - id: {a}
              title: Live
              members: [{{user: alice, role: owner}}, bob]
              messages:
                - {{sender: alice, content: "q", reactions: {{":ok:": [bob]}}}}
            """,
        )
        result = await asyncio.to_thread(chatctl, "seed", path)
        assert result.exit_code == 0, result.output
        added = await client.wait_for("chat-added")
        assert added["chat"]["id"] == a and added["chat"]["title"] == "Live"
        assert "members" not in added["chat"]
        assert (await client.call("join-chat", {"chat_id": a, "since_version": 0}))["ok"]
        path2 = _write(
            tmp_path,
            "live3.yaml",
            f"""\
            - id: {a}
              title: Live
              members: [{{user: alice, role: owner}}, bob]
              messages:
                - {{sender: alice, content: "q", reactions: {{":ok:": [bob]}}}}
                - {{sender: bob, content: "a", reply_to: 0, reactions: {{":ok:": [alice]}}}}
            """,
        )
        result = await asyncio.to_thread(chatctl, "seed", path2)
        assert result.exit_code == 0, result.output
        await client.wait_for("message-updated", lambda m: m["content"] == "a")
        updated = [(m["content"], m["version"]) for m in client.of("message-updated")]
        assert updated == [("q", 4), ("a", 5)]  # the parent's reply count, then the reaction
        assert [m["version"] for m in client.of("new-message")] == [3]
    finally:
        await client.close()
