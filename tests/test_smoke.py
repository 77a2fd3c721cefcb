"""The fixtures themselves: an in-process chatd and a real chatd process both
answer, and a socket client sees a REST send."""

import pytest

from .helpers import Api, SocketClient


@pytest.mark.gen_test
async def test_in_process_chatd_serves_rest(api, chat_id):
    chat = await api.create_chat(chat_id, members=["bob"])
    assert [m["user_id"] for m in chat["members"]] == ["alice", "bob"]
    resp = await api.send(chat_id, "  hello  ", user="bob")
    assert resp.status == 201
    assert resp.json["content"] == "hello"
    assert resp.json["seq"] == 1


@pytest.mark.gen_test
async def test_socket_client_gets_new_message_after_rest_send(chatd, api, chat_id):
    await api.create_chat(chat_id, members=["bob"])
    client = await SocketClient(f"http://127.0.0.1:{chatd.port}", user="bob").connect()
    try:
        ack = await client.call("join-chat", chat_id)
        assert ack == {
            "ok": True,
            "chat_id": chat_id,
            "last_seq": 0,
            "missed": [],
            "has_more": False,
        }
        sent = (await api.send(chat_id, "over rest")).json
        event = await client.wait_for("new-message")
        assert event == sent
    finally:
        await client.close()


@pytest.mark.slow
@pytest.mark.gen_test(timeout=60)
async def test_real_process_relays_between_two_sockets(spawn, chat_id):
    proc = spawn()
    api = Api(proc.url)
    await api.create_chat(chat_id, members=["bob"])
    alice = await SocketClient(proc.url, user="alice").connect()
    bob = await SocketClient(proc.url, user="bob").connect()
    try:
        assert (await bob.call("join-chat", {"chat_id": chat_id}))["ok"]
        ack = await alice.call("send-message", {"chat_id": chat_id, "content": "hi bob"})
        assert ack["ok"] is True
        event = await bob.wait_for("new-message")
        assert event == ack["message"]
    finally:
        await alice.close()
        await bob.close()
