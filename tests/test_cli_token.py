"""chatctl token: mints tokens that chatd's verifier and a running chatd accept."""

import asyncio
import time

import pytest

from chatd.auth import TokenVerifier

from .clitools import chatctl_fixture, one_line_error  # noqa: F401
from .helpers import SECRET


def test_token_verifies_with_chatd_verifier_and_carries_ttl_and_claims(chatctl):
    import jwt

    result = chatctl("token", "alice", "--ttl", "15m", "--claim", "team=blue")
    assert result.exit_code == 0, result.output
    tok = result.stdout.strip()
    assert TokenVerifier(SECRET).verify(tok) == "alice"
    claims = jwt.decode(tok, SECRET, algorithms=["HS256"])
    assert claims["team"] == "blue"
    assert abs(claims["exp"] - (time.time() + 900)) < 60


def test_token_gets_configured_audience_and_issuer(chatctl):
    result = chatctl("token", "bob", JWT_AUDIENCE="chat", JWT_ISSUER="auth")
    tok = result.stdout.strip()
    verifier = TokenVerifier(SECRET, audience="chat", issuer="auth")
    assert verifier.verify(tok) == "bob"


@pytest.mark.parametrize(
    "args", [("alice", "--ttl", "soon"), ("alice", "--claim", "novalue"), ("",)]
)
def test_token_rejects_bad_input_as_usage_error(chatctl, args):
    result = chatctl("token", *args)
    assert result.exit_code == 2


def test_token_usage_errors_are_one_line_from_the_console_script(chatctl):
    done = chatctl.process("token", "alice", "--ttl", "0s")
    assert done.returncode == 2
    assert "--ttl" in one_line_error(done.stderr)


@pytest.mark.gen_test
async def test_running_chatd_accepts_a_chatctl_token(chatctl, api, chat_id):
    await api.create_chat(chat_id, owner="carol")
    tok = chatctl("token", "carol").stdout.strip()
    resp = await api.get(f"/chats/{chat_id}", auth=f"Bearer {tok}")
    assert resp.status == 200, resp
    assert resp.json["members"][0]["user_id"] == "carol"
    expired = chatctl("token", "carol", "--ttl", "1s").stdout.strip()
    await asyncio.sleep(1.2)
    resp = await api.get(f"/chats/{chat_id}", auth=f"Bearer {expired}")
    assert resp.status == 401
