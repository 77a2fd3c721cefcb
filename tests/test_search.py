"""API.md version 2, "Search", "Mentions" and "Direct chats", over real HTTP
and sockets against real PostgreSQL and Redis (one process; the
cross-process cases are in tests/test_search_cluster.py).

The run shares one database, so every test uses users and words of its own
(``World``): results are exact, not "contains"."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from urllib.parse import quote

import pytest

from chatd import config
from chatd.server import Chatd
from chatd.text import direct_chat_id, fold, mention_candidates

from .helpers import Api, SocketClient


@pytest.fixture
def url(chatd) -> str:
    return f"http://127.0.0.1:{chatd.port}"


class World:
    """Users and a word unique to one test."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:8]
        self.a, self.b, self.c, self.d = (f"{n}{tag}" for n in ("ann", "ben", "cat", "dan"))
        self.word = f"zq{tag}"

    def chat(self) -> str:
        return f"t-{uuid.uuid4().hex[:16]}"


async def sent(api: Api, chat_id: str, content: str, user: str, **extra) -> dict:
    resp = await api.send(chat_id, content, user=user, **extra)
    assert resp.status == 201, resp
    return resp.json


async def search(api: Api, user: str, q: str, status: int = 200, **params) -> dict:
    extra = "".join(f"&{k}={quote(str(v), safe='')}" for k, v in params.items())
    resp = await api.get(f"/search?q={quote(q, safe='')}{extra}", user=user)
    assert resp.status == status, resp
    return resp.json


def ids(page: dict) -> list[int]:
    return [m["id"] for m in page["messages"]]


# -- text rules (chatd.text) ------------------------------------------------------


def test_fold_drops_accents_and_case_the_same_way_for_content_and_query():
    assert fold("Crème BRÛLÉE") == "creme brulee"
    assert fold("Straße") == "strasse"  # casefold, not lower
    assert fold("ﬁ ①") == "fi 1"  # NFKD compatibility forms
    assert fold("Ωμέγα") == fold("ωμεγα")


def test_mention_candidates_follow_the_contract_grammar():
    text = "@ann hi @ben, and @ann again (@cat) mail@dan x @eve! @fay. @gus:\n@hal?"
    assert mention_candidates(text) == ["ann", "ben", "eve", "fay", "gus", "hal"]
    assert mention_candidates("@ @@ann") == ["@ann"]
    assert mention_candidates("no mention") == []


# -- search ---------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_search_ignores_case_and_accents_and_keeps_the_content_as_written(api):
    w = World()
    chat = w.chat()
    await api.create_chat(chat, owner=w.a)
    msg = await sent(api, chat, f"Crème BRÛLÉE at the CAFÉ {w.word}", w.a)
    await sent(api, chat, f"creme only {w.word}", w.a)
    for q in (f"brulee {w.word}", f"BRÛLÉE {w.word}", f"cafe {w.word}", f"Café {w.word}"):
        page = await search(api, w.a, q)
        assert ids(page) == [msg["id"]], q
        assert page["messages"][0]["content"] == f"Crème BRÛLÉE at the CAFÉ {w.word}"
        assert page["has_more"] is False


@pytest.mark.gen_test(timeout=60)
async def test_web_search_syntax_words_phrase_exclusion_and_or(api):
    w = World()
    chat = w.chat()
    await api.create_chat(chat, owner=w.a)
    red_apple = await sent(api, chat, f"{w.word} red apple", w.a)
    apple_red = await sent(api, chat, f"{w.word} apple is red", w.a)
    green = await sent(api, chat, f"{w.word} green pear", w.a)
    # Words: all must match.
    assert ids(await search(api, w.a, f"{w.word} red apple")) == [apple_red["id"], red_apple["id"]]
    # A phrase: in that order, adjacent.
    assert ids(await search(api, w.a, f'{w.word} "red apple"')) == [red_apple["id"]]
    # -word excludes.
    assert ids(await search(api, w.a, f"{w.word} apple -is")) == [red_apple["id"]]
    # or.
    assert ids(await search(api, w.a, f"{w.word} pear or apple")) == [
        green["id"], apple_red["id"], red_apple["id"]
    ]  # fmt: skip


@pytest.mark.gen_test(timeout=60)
async def test_search_scope_is_the_callers_chats_or_one_readable_chat(api):
    w = World()
    mine, theirs, public = w.chat(), w.chat(), w.chat()
    await api.create_chat(mine, owner=w.b, members=[w.a])
    await api.create_chat(theirs, owner=w.c)
    await api.create_chat(public, owner=w.c, visibility="public")
    m1 = await sent(api, mine, f"{w.word} one", w.b)
    await sent(api, theirs, f"{w.word} two", w.c)
    p = await sent(api, public, f"{w.word} three", w.c)
    # The caller's chats only: not a private chat of others, not a public
    # chat they never joined.
    assert ids(await search(api, w.a, w.word)) == [m1["id"]]
    # One chat: a public one anyone may read ...
    assert ids(await search(api, w.a, w.word, chat_id=public)) == [p["id"]]
    assert ids(await search(api, w.a, w.word, chat_id=mine)) == [m1["id"]]
    # ... but not a private chat the caller is not in, nor one that does not
    # exist: the same 404, so existence does not leak.
    for chat in (theirs, f"nope-{w.word}"):
        err = await search(api, w.a, w.word, 404, chat_id=chat)
        assert err["error"]["code"] == "chat_not_found"
    assert (await search(api, w.a, w.word, 400, chat_id="bad!id"))["error"]["code"] == (
        "validation_error"
    )
    # Leaving a chat takes its messages out of the caller's results.
    assert (await api.delete(f"/chats/{mine}/members/{w.a}", user=w.a)).status == 204
    assert ids(await search(api, w.a, w.word)) == []
    assert ids(await search(api, w.b, w.word)) == [m1["id"]]


@pytest.mark.gen_test(timeout=60)
async def test_deleted_messages_never_match_and_edits_reindex(api):
    w = World()
    chat = w.chat()
    await api.create_chat(chat, owner=w.a)
    gone = await sent(api, chat, f"{w.word} secret", w.a)
    kept = await sent(api, chat, f"{w.word} before", w.a)
    assert (await api.delete(f"/messages/{gone['id']}", user=w.a)).status == 204
    assert ids(await search(api, w.a, f"{w.word} secret")) == []
    assert ids(await search(api, w.a, w.word)) == [kept["id"]]
    edited = await api.patch(f"/messages/{kept['id']}", {"content": f"{w.word} Après"}, user=w.a)
    assert edited.status == 200
    assert ids(await search(api, w.a, f"{w.word} before")) == []
    page = await search(api, w.a, f"{w.word} apres")
    assert ids(page) == [kept["id"]] and page["messages"][0]["content"] == f"{w.word} Après"


@pytest.mark.gen_test(timeout=90)
async def test_search_is_newest_first_with_keyset_paging_and_limits(api):
    w = World()
    chat = w.chat()
    await api.create_chat(chat, owner=w.a)
    made = [(await sent(api, chat, f"{w.word} n{i}", w.a))["id"] for i in range(25)]
    newest_first = made[::-1]
    first = await search(api, w.a, w.word)  # default limit 20
    assert ids(first) == newest_first[:20] and first["has_more"] is True
    rest = await search(api, w.a, w.word, before_id=ids(first)[-1])
    assert ids(rest) == newest_first[20:] and rest["has_more"] is False
    page = await search(api, w.a, w.word, limit=100)
    assert ids(page) == newest_first and page["has_more"] is False
    exact = await search(api, w.a, w.word, limit=25)
    assert ids(exact) == newest_first and exact["has_more"] is False
    for bad in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"before_id": 0},
                {"before_id": "-1"}):  # fmt: skip
        err = await search(api, w.a, w.word, 400, **bad)
        assert err["error"]["code"] == "validation_error", bad


@pytest.mark.gen_test(timeout=60)
async def test_hostile_queries_get_a_json_answer_never_a_500(api):
    w = World()
    chat = w.chat()
    await api.create_chat(chat, owner=w.a)
    msg = await sent(api, chat, f"{w.word} emoji 🎉 text", w.a)
    # Empty, blank, missing, too long, NUL, not UTF-8: validation_error.
    for raw in ("", "%20%20%09", "%00", "a%00b", "%FF%FE", "x" * 501):
        resp = await api.get(f"/search?q={raw}", user=w.a)
        assert resp.status == 400 and resp.error_code == "validation_error", (raw, resp)
    resp = await api.get("/search", user=w.a)
    assert resp.status == 400 and resp.error_code == "validation_error"
    # 500 characters is allowed.
    assert (await search(api, w.a, "y" * 500))["messages"] == []
    # Only operators, punctuation, odd Unicode: nothing to search for, 200 [].
    for q in ("-", "or", '"', '""', "- - or or", "!", "&|!():*", "'", "\\", "-or", "OR OR",
              "\u200b", "\u0301", "\u202e", "\ufeff", "a:*", "'; DROP TABLE messages;--",
              "%", "_", "((((((", "<->"):  # fmt: skip
        page = await search(api, w.a, q)
        assert page["messages"] == [], (q, page)
    # tsquery's own operators are not operators of web-search syntax: text.
    assert ids(await search(api, w.a, f"{w.word} & emoji")) == [msg["id"]]
    # Only exclusions: nothing to look for, so nothing (not every message).
    assert (await search(api, w.a, f"-{w.word} -nope"))["messages"] == []
    assert ids(await search(api, w.a, f"{w.word} -nope")) == [msg["id"]]
    assert ids(await search(api, w.a, f"{w.word}:* emoji")) == [msg["id"]]
    assert ids(await search(api, w.a, f"{w.word} emoji 🎉")) == [msg["id"]]
    # The table survived, and the query still works.
    assert ids(await search(api, w.a, f"{w.word} text")) == [msg["id"]]


@pytest.mark.gen_test(timeout=60)
async def test_a_query_of_only_stop_words_matches_nothing_and_word_forms_follow_search_language(
    io_loop, settings
):
    w = World()
    daemon = Chatd(dataclasses.replace(settings, search_language="english"))
    await daemon.start()
    try:
        api = Api(f"http://127.0.0.1:{daemon.port}")
        chat = w.chat()
        await api.create_chat(chat, owner=w.a)
        msg = await sent(api, chat, f"{w.word} the cats were running", w.a)
        # english stems: "cat" finds "cats", "runs" finds "running".
        assert ids(await search(api, w.a, f"{w.word} cat runs")) == [msg["id"]]
        # Only stop-words: 200 and nothing (not an error, not everything).
        assert (await search(api, w.a, "the were"))["messages"] == []
    finally:
        await daemon.stop()


def test_search_language_must_name_a_configuration(settings):
    env = {"ACCESS_TOKEN_SECRET": "x" * 32, "DATABASE_URL": "postgresql://h/d"}
    assert config.load({**env, "SEARCH_LANGUAGE": "german"}, use_dotenv=False).search_language == (
        "german"
    )
    assert config.load(env, use_dotenv=False).search_language == "simple"
    for bad in ("simple; DROP", "a b", "1abc", "x" * 70):
        with pytest.raises(config.ConfigError, match="SEARCH_LANGUAGE"):
            config.load({**env, "SEARCH_LANGUAGE": bad}, use_dotenv=False)


@pytest.mark.gen_test(timeout=60)
async def test_chatd_refuses_to_start_with_a_search_language_postgresql_lacks(io_loop, settings):
    daemon = Chatd(dataclasses.replace(settings, search_language="klingon"))
    with pytest.raises(config.ConfigError, match="klingon"):
        await daemon.start()
    await daemon.stop()


# -- mentions --------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_mentions_are_members_only_unique_in_order_and_decided_again_on_edit(api):
    w = World()
    chat = w.chat()
    await api.create_chat(chat, owner=w.a, members=[w.b, w.c])
    text = f"@{w.c} hi @{w.b}, @{w.c} again @{w.d} (@{w.a}) x@{w.b} @{w.a}!"
    msg = await sent(api, chat, text, w.a)
    # d is not a member; "(@a" is not at a word start; a names themselves.
    assert msg["mentions"] == [w.c, w.b, w.a]
    edited = await api.patch(f"/messages/{msg['id']}", {"content": f"now @{w.d} @{w.b}"}, user=w.a)
    assert edited.json["mentions"] == [w.b]
    # d joins: an edit decides again.
    await api.put(f"/chats/{chat}/members/{w.d}", {}, user=w.a)
    edited = await api.patch(f"/messages/{msg['id']}", {"content": f"@{w.d} @{w.b}"}, user=w.a)
    assert edited.json["mentions"] == [w.d, w.b]
    # Everyone reads the same JSON; a tombstone mentions nobody.
    page = (await api.get(f"/chats/{chat}/messages", user=w.c)).json["messages"]
    assert page[-1]["mentions"] == [w.d, w.b]
    await api.delete(f"/messages/{msg['id']}", user=w.a)
    page = (await api.get(f"/chats/{chat}/messages?include_deleted=true", user=w.c)).json
    assert page["messages"][-1]["mentions"] == []


@pytest.mark.gen_test(timeout=90)
async def test_at_most_fifty_mentions_the_first_fifty_members_named(api):
    w = World()
    chat = w.chat()
    users = [f"u{i:02d}{w.word}" for i in range(60)]
    await api.create_chat(chat, owner=w.a, members=users)
    msg = await sent(api, chat, " ".join(f"@{w.d} @{u}" for u in users), w.a)
    assert msg["mentions"] == users[:50]
    # Replies and group-committed sends decide mentions the same way.
    reply = await sent(api, chat, f"@{users[59]} @{w.d}", w.a, reply_to=msg["id"])
    assert reply["mentions"] == [users[59]]
    burst = await asyncio.gather(
        *(api.send(chat, f"@{users[i]} burst", user=users[i + 1]) for i in range(10))
    )
    assert sorted(r.json["mentions"][0] for r in burst) == sorted(users[:10])


@pytest.mark.gen_test(timeout=90)
async def test_mention_feed_newest_first_unread_only_live_messages_in_chats_still_joined(api):
    w = World()
    one, two = w.chat(), w.chat()
    await api.create_chat(one, owner=w.a, members=[w.b])
    await api.create_chat(two, owner=w.a, members=[w.b])
    m1 = await sent(api, one, f"@{w.b} first", w.a)
    await sent(api, one, "no mention", w.a)
    m2 = await sent(api, two, f"hey @{w.b}", w.a)
    m3 = await sent(api, one, f"@{w.b}: third", w.a)
    gone = await sent(api, one, f"@{w.b} deleted soon", w.a)
    await api.delete(f"/messages/{gone['id']}", user=w.a)

    async def feed(q: str = "", user: str = w.b) -> dict:
        resp = await api.get(f"/mentions{q}", user=user)
        assert resp.status == 200, resp
        return resp.json

    assert ids(await feed()) == [m3["id"], m2["id"], m1["id"]]
    assert (await feed())["has_more"] is False
    page = await feed("?limit=2")
    assert ids(page) == [m3["id"], m2["id"]] and page["has_more"] is True
    assert ids(await feed(f"?before_id={m2['id']}")) == [m1["id"]]
    assert ids(await feed(user=w.a)) == []
    # unread: above the read marker of each chat.
    await api.post(f"/chats/{one}/read", {"seq": m1["seq"]}, user=w.b)
    assert ids(await feed("?unread=true")) == [m3["id"], m2["id"]]
    assert ids(await feed("?unread=false")) == [m3["id"], m2["id"], m1["id"]]
    chats = {c["id"]: c for c in (await api.get("/chats", user=w.b)).json["chats"]}
    assert (chats[one]["unread_mentions"], chats[two]["unread_mentions"]) == (1, 1)
    assert chats[one]["unread_count"] == 2  # "no mention" and m3 (the tombstone not)
    chats = {c["id"]: c for c in (await api.get("/chats", user=w.a)).json["chats"]}
    assert chats[one]["unread_mentions"] == 0
    # An edit that drops the mention drops it from the feed and the count.
    await api.patch(f"/messages/{m2['id']}", {"content": "nobody"}, user=w.a)
    assert ids(await feed()) == [m3["id"], m1["id"]]
    # Leaving a chat takes its mentions out of the feed.
    await api.delete(f"/chats/{one}/members/{w.b}", user=w.b)
    assert ids(await feed()) == []
    for bad in ("?limit=0", "?limit=101", "?before_id=0", "?unread=maybe"):
        resp = await api.get(f"/mentions{bad}", user=w.b)
        assert resp.status == 400 and resp.error_code == "validation_error", bad


@pytest.mark.gen_test(timeout=60)
async def test_mention_event_reaches_every_socket_of_the_user_joined_or_not(api, url):
    w = World()
    chat = w.chat()
    await api.create_chat(chat, owner=w.a, members=[w.b, w.c])
    joined = await SocketClient(url, user=w.b).connect()
    elsewhere = await SocketClient(url, user=w.b).connect()
    other = await SocketClient(url, user=w.c).connect()
    try:
        assert (await joined.call("join-chat", chat))["ok"]
        msg = await sent(api, chat, f"ping @{w.b}", w.a)
        for sock in (joined, elsewhere):
            got = await sock.wait_for("mention")
            assert got == {"chat_id": chat, "message": msg}
        # An edit tells only the users it newly mentions.
        edited = await api.patch(
            f"/messages/{msg['id']}", {"content": f"@{w.b} and @{w.c}"}, user=w.a
        )
        got = await other.wait_for("mention")
        assert got == {"chat_id": chat, "message": edited.json}
        await sent(api, chat, f"@{w.c} marker", w.a)
        await other.wait_for("mention", lambda d: d["message"]["content"].endswith("marker"))
        await asyncio.sleep(0.2)
        assert len(joined.of("mention")) == 1 and len(elsewhere.of("mention")) == 1
    finally:
        for sock in (joined, elsewhere, other):
            await sock.close()


@pytest.mark.gen_test(timeout=60)
async def test_racing_edits_tell_a_newly_mentioned_user_exactly_once(api, url):
    """Edits that add the same mention, all in flight at once: the first to
    commit newly mentions the user, the others replace a text that already
    did, so one `mention` event in all (each edit compares with the mentions
    it replaced in its own transaction, not with a read made before)."""
    w = World()
    chat = w.chat()
    await api.create_chat(chat, owner=w.a, members=[w.b])
    watcher = await SocketClient(url, user=w.b).connect()
    try:
        for round_ in range(3):
            msg = await sent(api, chat, f"plain {round_}", w.a)
            answers = await asyncio.gather(
                *(
                    api.patch(f"/messages/{msg['id']}", {"content": f"@{w.b} v{i}"}, user=w.a)
                    for i in range(6)
                )
            )
            assert all(a.status == 200 for a in answers), answers
            await sent(api, chat, f"@{w.b} marker {round_}", w.a)
            await watcher.wait_for(
                "mention", lambda d, r=round_: d["message"]["content"] == f"@{w.b} marker {r}"
            )
            about = [m for m in watcher.of("mention") if m["message"]["id"] == msg["id"]]
            assert len(about) == 1, about
    finally:
        await watcher.close()


# -- direct chats ------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=60)
async def test_a_direct_chat_is_one_private_chat_per_pair_the_same_from_both_sides(api, url):
    w = World()
    watcher = await SocketClient(url, user=w.b).connect()
    try:
        first = await api.put(f"/direct/{w.b}", user=w.a)
        assert first.status == 201, first
        chat = first.json
        assert chat["kind"] == "direct" and chat["visibility"] == "private"
        assert chat["title"] == "" and chat["id"] == direct_chat_id(w.a, w.b)
        assert sorted((m["user_id"], m["role"]) for m in chat["members"]) == sorted(
            [(w.a, "member"), (w.b, "member")]
        )
        added = await watcher.wait_for("chat-added")
        assert added["chat"]["id"] == chat["id"] and "members" not in added["chat"]
        again = await api.put(f"/direct/{w.a}", user=w.b)
        assert again.status == 200 and again.json["id"] == chat["id"]
        assert (await api.put(f"/direct/{w.b}", user=w.a)).status == 200
        # A stranger cannot read it.
        resp = await api.get(f"/chats/{chat['id']}", user=w.c)
        assert resp.status == 404 and resp.error_code == "chat_not_found"
        listed = {c["id"]: c for c in (await api.get("/chats", user=w.b)).json["chats"]}
        assert listed[chat["id"]]["kind"] == "direct"
        # Group chats say so.
        group = w.chat()
        assert (await api.create_chat(group, owner=w.a))["kind"] == "group"
    finally:
        await watcher.close()


@pytest.mark.gen_test(timeout=60)
async def test_a_direct_chat_with_oneself_has_one_member(api):
    w = World()
    resp = await api.put(f"/direct/{w.a}", user=w.a)
    assert resp.status == 201
    assert [m["user_id"] for m in resp.json["members"]] == [w.a]
    assert resp.json["id"] == direct_chat_id(w.a, w.a) != direct_chat_id(w.a, w.b)
    assert (await api.put(f"/direct/{w.a}", user=w.a)).status == 200


@pytest.mark.gen_test(timeout=60)
async def test_concurrent_opens_from_both_sides_make_one_chat(api, database_url):
    from .helpers import pg_query

    w = World()
    calls = [api.put(f"/direct/{w.b}", user=w.a) for _ in range(8)] + [
        api.put(f"/direct/{w.a}", user=w.b) for _ in range(8)
    ]
    answers = await asyncio.gather(*calls)
    assert sorted(r.status for r in answers) == [200] * 15 + [201]
    assert len({r.json["id"] for r in answers}) == 1
    rows = pg_query(
        database_url,
        "SELECT count(*) FROM chat_members WHERE chat_id = %s",
        (direct_chat_id(w.a, w.b),),
    )
    assert rows == [(2,)]


@pytest.mark.gen_test(timeout=60)
async def test_no_member_is_added_or_re_roled_and_a_member_may_leave_and_come_back(api):
    w = World()
    chat = (await api.put(f"/direct/{w.b}", user=w.a)).json["id"]
    for target, role in ((w.c, "member"), (w.b, "admin"), (w.a, "owner"), (w.a, "member")):
        resp = await api.put(f"/chats/{chat}/members/{target}", {"role": role}, user=w.a)
        assert resp.status == 409 and resp.error_code == "conflict", (target, role)
    # Nobody removes the other one.
    resp = await api.delete(f"/chats/{chat}/members/{w.b}", user=w.a)
    assert resp.status == 403
    assert (await api.delete(f"/chats/{chat}/members/{w.a}", user=w.a)).status == 204
    assert chat not in [c["id"] for c in (await api.get("/chats", user=w.a)).json["chats"]]
    assert (await api.get(f"/chats/{chat}", user=w.a)).status == 404
    back = await api.put(f"/direct/{w.b}", user=w.a)
    assert back.status == 200 and back.json["id"] == chat
    assert sorted(m["user_id"] for m in back.json["members"]) == sorted([w.a, w.b])
    # b leaves; a's PUT does not bring b back (only the caller returns).
    await api.delete(f"/chats/{chat}/members/{w.b}", user=w.b)
    assert [m["user_id"] for m in (await api.put(f"/direct/{w.b}", user=w.a)).json["members"]] == [
        w.a
    ]
    back = await api.put(f"/direct/{w.a}", user=w.b)
    assert back.status == 200 and len(back.json["members"]) == 2


@pytest.mark.gen_test(timeout=60)
async def test_direct_ids_are_reserved_and_bad_user_ids_are_refused(api):
    w = World()
    reserved = direct_chat_id(w.a, w.b)
    resp = await api.post("/chats", {"id": reserved, "title": "squat"}, user=w.c)
    assert resp.status == 409 and resp.error_code == "conflict"
    assert (await api.put(f"/direct/{w.b}", user=w.a)).status == 201
    for bad in ("%01", "x" * 129, "%F0"):
        resp = await api.put(f"/direct/{bad}", user=w.a)
        assert resp.status in (400, 404) and resp.error_code in ("validation_error", "not_found")


# -- who may ----------------------------------------------------------------------------


@pytest.mark.gen_test(timeout=120)
async def test_authorisation_matrix(api, url):
    """Search, mentions and direct chats x owner, admin, member, non-member of
    a private chat, non-member of a public chat, no token; and the mention
    event x who gets it."""
    w = World()
    owner, admin, member, outsider = w.a, w.b, w.c, w.d
    priv, pub = w.chat(), w.chat()
    for cid, vis in ((priv, "private"), (pub, "public")):
        await api.create_chat(cid, owner=owner, members=[member], visibility=vis)
        await api.put(f"/chats/{cid}/members/{admin}", {"role": "admin"}, user=owner)
    msg = {
        cid: await sent(api, cid, f"{w.word} @{owner} @{admin} @{member} @{outsider}", owner)
        for cid in (priv, pub)
    }
    # The outsider is named but is no member: not a mention, in either chat.
    assert msg[priv]["mentions"] == msg[pub]["mentions"] == [owner, admin, member]

    want = {}
    got = {}
    for user in (owner, admin, member, outsider, None):
        for cid in (priv, pub):
            resp = await api.get(f"/search?q={w.word}&chat_id={cid}", user=user)
            got[("search-chat", cid, user)] = (
                resp.status,
                ids(resp.json) if resp.status == 200 else None,
            )
            if user is None:
                want[("search-chat", cid, user)] = (401, None)
            elif user == outsider and cid == priv:
                want[("search-chat", cid, user)] = (404, None)
            else:
                want[("search-chat", cid, user)] = (200, [msg[cid]["id"]])
        resp = await api.get(f"/search?q={w.word}", user=user)
        got[("search", user)] = (resp.status, ids(resp.json) if resp.status == 200 else None)
        want[("search", user)] = (
            (401, None) if user is None
            else (200, []) if user == outsider
            else (200, [msg[pub]["id"], msg[priv]["id"]])
        )  # fmt: skip
        resp = await api.get("/mentions", user=user)
        got[("mentions", user)] = (resp.status, ids(resp.json) if resp.status == 200 else None)
        want[("mentions", user)] = (
            (401, None) if user is None
            else (200, []) if user == outsider
            else (200, [msg[pub]["id"], msg[priv]["id"]])
        )  # fmt: skip
        resp = await api.put(f"/direct/{member}", user=user)
        got[("direct", user)] = resp.status
        # Anyone signed in opens their own direct chat with anyone (the
        # member with themselves: a chat of one).
        want[("direct", user)] = 401 if user is None else 201
    assert got == want
    # Adding a member or re-roling in a direct chat: 409 for everyone in it,
    # 404 for everyone outside it, 401 without a token.
    dm = direct_chat_id(owner, member)
    for user, code in ((owner, 409), (member, 409), (admin, 404), (None, 401)):
        resp = await api.put(f"/chats/{dm}/members/{admin}", {}, user=user)
        assert resp.status == code, (user, resp)
    # The mention event goes to the mentioned user's sockets only.
    socks = {u: await SocketClient(url, user=u).connect() for u in (member, outsider, admin)}
    try:
        hit = await sent(api, pub, f"@{member} @{outsider} only", owner)
        assert (await socks[member].wait_for("mention"))["message"]["id"] == hit["id"]
        marker = await sent(api, pub, f"@{admin} marker", owner)
        await socks[admin].wait_for("mention", lambda d: d["message"]["id"] == marker["id"])
        await asyncio.sleep(0.2)
        assert socks[outsider].of("mention") == []
        assert len(socks[admin].of("mention")) == 1
    finally:
        for sock in socks.values():
            await sock.close()


@pytest.mark.gen_test(timeout=60)
async def test_hostile_content_is_stored_and_searchable_never_a_500(api):
    """A word longer than PostgreSQL indexes, thousands of @candidates, and
    text that NFKD expands 18-fold are all sent and searched normally."""
    w = World()
    chat = w.chat()
    await api.create_chat(chat, owner=w.a, members=[w.b])
    long_word = await sent(api, chat, f"{w.word} " + "x" * 3000, w.a)
    assert long_word["content"].endswith("x" * 3000)
    assert ids(await search(api, w.a, w.word)) == [long_word["id"]]
    crowd = " ".join(f"@n{i}" for i in range(600)) + f" @{w.b}"
    msg = await sent(api, chat, crowd, w.a)
    assert msg["mentions"] == [w.b]
    wide = await sent(api, chat, f"{w.word}b " + "\ufdfa" * 1000, w.a)
    assert ids(await search(api, w.a, f"{w.word}b")) == [wide["id"]]
