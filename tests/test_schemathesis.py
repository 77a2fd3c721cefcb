"""schemathesis (in the test extra) against chatd's own OpenAPI document (GET /openapi.json): for
requests the document allows and requests it does not (positive and negative
generation), a real chatd process never answers 5xx, and every error is the
JSON error shape of API.md."""

from __future__ import annotations

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from chatd.openapi import document

from .conftest import chatd_env
from .helpers import Api, ChatdProcess, token

schema = schemathesis.openapi.from_dict(document())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])

FUZZ_CHAT = "fuzz"  # a chat the fuzzer's user owns, so some paths hit real rows


@pytest.fixture(scope="module")
def server(database_url, redis_prefix):
    proc = ChatdProcess.start(chatd_env(database_url, redis_prefix))
    yield proc
    proc.stop()
    proc.log_path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def seeded(server):
    import asyncio

    async def seed():
        api = Api(server.url)
        resp = await api.post("/chats", {"id": FUZZ_CHAT, "title": "fuzz"}, user="fuzzer")
        assert resp.status in (201, 409), resp
        await api.send(FUZZ_CHAT, "hello", user="fuzzer")

    asyncio.run(seed())
    return server


def _header(response, name: str) -> str:
    # schemathesis keeps headers as {name: [values]}; compare names case-blind.
    for key, value in response.headers.items():
        if key.lower() == name:
            return value[0] if isinstance(value, list) else value
    return ""


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_gets_a_server_error_or_a_non_json_error(case, seeded):
    response = case.call(
        base_url=seeded.url, headers={"Authorization": f"Bearer {token('fuzzer')}"}, timeout=10
    )
    where = f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    assert response.status_code < 500, where
    if response.status_code >= 400:
        assert _header(response, "content-type").startswith("application/json"), where
        body = orjson.loads(response.content)
        assert list(body) == ["error"], where
        assert isinstance(body["error"]["code"], str) and body["error"]["code"], where
        assert isinstance(body["error"]["message"], str), where
