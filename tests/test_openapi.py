"""The OpenAPI document (GET /openapi.json) against the app that serves it:
valid OpenAPI 3, every route and method the app serves is documented (and
nothing else), and every documented response code is produced by a real
request whose body matches the documented schema."""

from __future__ import annotations

import dataclasses
import re
import uuid

import psycopg2
import pytest
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate

from chatd import migrations, web
from chatd.openapi import document
from chatd.server import Chatd

from .conftest import fresh_database
from .helpers import Api, pg_query, token

BIG = b'{"content": "' + b"x" * (70 * 1024) + b'"}'
DOC = document()


def test_document_is_valid_openapi_3():
    validate(DOC)


def test_every_served_route_and_method_is_documented_and_nothing_else():
    served = {handler.ROUTE: handler for _pattern, handler, _route in web.ROUTE_TABLE}
    assert set(served) == set(DOC["paths"])
    for route, handler in served.items():
        documented = {m.upper() for m in DOC["paths"][route]}
        assert documented == set(handler.METHODS), route
    # And each documented path, with sample values, is routed to its handler.
    ctx = web.Context(domain=None, verifier=None)
    table = [(re.compile(p + "$"), h) for p, h, _ctx in web.routes(ctx)]
    for route in DOC["paths"]:
        concrete = re.sub(r"\{[^}]+\}", "sample-1", route)
        matches = [h for rx, h in table if rx.match(concrete)]
        assert matches and route == matches[0].ROUTE, (route, matches)


def _operations():
    for path, item in DOC["paths"].items():
        for method, op in item.items():
            yield path, method.upper(), op


def _deref(node):
    """The schema with every $ref inlined (chatd's schemas have no cycles)."""
    if isinstance(node, dict):
        if "$ref" in node:
            target = DOC
            for part in node["$ref"].lstrip("#/").split("/"):
                target = target[part]
            return _deref(target)
        return {k: _deref(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_deref(v) for v in node]
    return node


class World:
    """Chats and messages the scenarios act on; users alice (owner), bob (member)."""

    def __init__(self, api: Api):
        self.api = api
        self.tag = uuid.uuid4().hex[:10]
        self.private = f"oa-priv-{self.tag}"
        self.public = f"oa-pub-{self.tag}"
        self.pins = 0
        self.db = ""

    async def setup(self) -> None:
        await self.api.create_chat(self.private, members=["bob"])
        await self.api.create_chat(self.public, visibility="public")

    async def message(self, user: str = "alice") -> int:
        resp = await self.api.send(self.private, f"m-{uuid.uuid4().hex[:6]}", user=user)
        assert resp.status == 201, resp
        return resp.json["id"]


def _path(route: str, w: World, **values) -> str:
    values = {"chat_id": w.private, "user_id": "bob", "id": "1", "message_id": "1",
              "emoji": "%F0%9F%91%8D", **values}  # fmt: skip
    return re.sub(r"\{([^}]+)\}", lambda m: str(values[m.group(1)]), route)


async def _scenario(w: World, route: str, method: str, code: int):
    """A request that should be answered ``code``; None if there is none here."""
    api = w.api
    p = lambda **v: _path(route, w, **v)  # noqa: E731
    if code == 401:
        return await api.request(method, p(), user=None)
    if code == 413:
        return await api.request(method, p(), raw=BIG)
    key = (route, method, code)
    chat = f"oa-new-{uuid.uuid4().hex[:8]}"
    if key == ("/chats", "GET", 200):
        return await api.get("/chats")
    if key == ("/chats", "POST", 201):
        return await api.post("/chats", {"id": chat, "title": "New"})
    if key == ("/chats", "POST", 400):
        return await api.post("/chats", {"id": chat})
    if key == ("/chats", "POST", 409):
        return await api.post("/chats", {"id": w.private, "title": "Taken"})
    if route == "/chats/{chat_id}" and code in (200, 400, 404):
        cid = {200: w.private, 400: "bad!id", 404: f"nope-{w.tag}"}[code]
        return await api.get(p(chat_id=cid))
    if route == "/chats/{chat_id}/messages" and method == "GET":
        query = {200: "?limit=10", 400: "?limit=0", 404: ""}[code]
        cid = w.private if code != 404 else f"nope-{w.tag}"
        return await api.get(p(chat_id=cid) + query)
    if route == "/chats/{chat_id}/messages" and method == "POST":
        if code == 201:
            return await api.post(p(), {"content": "hi", "client_id": f"c-{w.tag}"})
        if code == 200:  # the same client_id again
            await api.post(p(), {"content": "hi", "client_id": f"r-{w.tag}"})
            return await api.post(p(), {"content": "hi", "client_id": f"r-{w.tag}"})
        if code == 400:
            return await api.post(p(), {"content": "   "})
        if code == 404:
            return await api.post(p(), {"content": "hi"}, user="mallory")
    if route == "/chats/{chat_id}/members/{user_id}":
        if (method, code) == ("PUT", 200):
            return await api.put(p(user_id="carol"), {"role": "member"})
        if (method, code) == ("DELETE", 204):
            await api.put(p(user_id="dave"), {})
            return await api.delete(p(user_id="dave"))
        if code == 400:
            return await api.request(method, p(user_id="carol"), {"role": "emperor"}) if (
                method == "PUT") else await api.delete(p(chat_id="bad!id"))  # fmt: skip
        if code == 403:
            return await api.request(method, p(user_id="alice"), {"role": "member"}, user="bob")
        if code == 404:
            return await api.request(method, p(), {"role": "member"}, user="mallory")
        if code == 409:  # the only owner demoting or removing themselves
            return await api.request(method, p(user_id="alice"), {"role": "member"})
    if route == "/chats/{chat_id}/read":
        body, user, cid = {"seq": 1}, "alice", w.private
        if code == 400:
            body = {"seq": "one"}
        elif code == 403:
            user, cid = "mallory", w.public
        elif code == 404:
            user = "mallory"
        return await api.post(p(chat_id=cid), body, user=user)
    if route in ("/message/", "/messages/{id}") and method == "DELETE":
        mid = await w.message()
        target = {204: mid, 400: "abc", 403: mid, 404: 2**52}[code]
        user = "bob" if code == 403 else "alice"
        if route == "/message/":
            return await api.delete("/message/" + ("" if code == 400 else f"?id={target}"),
                                    user=user)  # fmt: skip
        return await api.delete(p(id=target), user=user)
    if route == "/messages/{id}" and method == "PATCH":
        mid = await w.message()
        target = 2**52 if code == 404 else mid
        body = {"content": "" if code == 400 else "edited"}
        return await api.patch(p(id=target), body, user="bob" if code == 403 else "alice")
    # -- version 2 --
    gone = f"nope-{w.tag}"
    if route == "/chats/{chat_id}/changes":
        query = {200: "?since_version=0", 400: "?since_version=-1", 404: ""}[code]
        return await api.get(p(chat_id=gone if code == 404 else w.private) + query)
    if route == "/chats/{chat_id}/pins" and method == "GET":
        return await api.get(p(chat_id={200: w.private, 400: "bad!id", 404: gone}[code]))
    if route == "/chats/{chat_id}/pins/{message_id}":
        mid = await w.message()
        if code == 200:
            return await api.request(method, p(message_id=mid))
        if code == 400:
            return await api.request(method, p(message_id="x"))
        if code == 403:
            return await api.request(method, p(message_id=mid), user="bob")
        if code == 404:
            return await api.request(method, p(message_id=mid), user="mallory")
        if code == 409:
            for _ in range(50 - w.pins):
                await api.put(p(message_id=await w.message()))
            w.pins = 50
            return await api.put(p(message_id=mid))
    if route in ("/messages/{id}/replies", "/messages/{id}/history"):
        mid = await w.message()
        if code == 200:
            return await api.get(p(id=mid))
        if code == 400:
            return await api.get(p(id="x"))
        if code == 404:
            return await api.get(p(id=mid), user="mallory")
    if route == "/messages/{id}/reactions/{emoji}":
        mid = await w.message()
        if code == 200:
            return await api.request(method, p(id=mid))
        if code == 400:
            return await api.request(method, p(id=mid, emoji="abc"))
        if code == 403:
            pub = await api.send(w.public, "pub")
            return await api.request(method, p(id=pub.json["id"]), user="mallory")
        if code == 404:
            return await api.request(method, p(id=mid), user="mallory")
        if code == 409:
            for i in range(20):
                await api.put(p(id=mid, emoji=f":e{i}:"))
            return await api.put(p(id=mid))
    if route == "/search":
        query = {200: "?q=hello", 400: "?q=%20", 404: f"?q=hello&chat_id={gone}"}[code]
        return await api.get(route + query)
    if route == "/mentions":
        return await api.get(route + {200: "?unread=true", 400: "?unread=maybe"}[code])
    if route == "/direct/{user_id}":
        if code == 201:
            return await api.put(p(user_id=f"u-{uuid.uuid4().hex[:8]}"), None)
        if code == 200:
            await api.put(p(user_id="bob"), None)
            return await api.put(p(user_id="bob"), None)
        if code == 400:
            return await api.put(p(user_id="%01"), None)
        if code == 409:  # a group chat holding the id (made before ids were reserved)
            from chatd.text import direct_chat_id

            taken = direct_chat_id("alice", "squatted")
            pg_query(
                w.db, f"INSERT INTO chats (id, title, created_by) VALUES ('{taken}', 'x', 'm')"
            )
            return await api.put(p(user_id="squatted"), None)
    if code == 200 and route in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        return await api.get(route, user=None)
    return None


def _check(resp, route, method, code, op) -> None:
    assert resp is not None, f"no scenario for {method} {route} -> {code}"
    assert resp.status == code, (method, route, code, resp)
    spec = op["responses"][str(code)]
    spec = _deref(spec)
    content = spec.get("content", {})
    if "application/json" in content:
        OAS30Validator(content["application/json"]["schema"]).validate(resp.json)
    elif not content:
        assert resp.body == b"", (method, route, code)


@pytest.mark.gen_test(timeout=60)
async def test_every_documented_response_code_is_produced(api, database_url):
    world = World(api)
    world.db = database_url
    await world.setup()
    checked = 0
    for route, method, op in _operations():
        for code in sorted(int(c) for c in op["responses"]):
            if code in (429, 503):
                continue  # below: a tight send budget; PostgreSQL gone
            resp = await _scenario(world, route, method, code)
            _check(resp, route, method, code, op)
            checked += 1
    assert checked >= 60


@pytest.mark.gen_test(timeout=60)
async def test_every_documented_429_is_produced_over_the_send_budget(io_loop, settings, chat_id):
    daemon = Chatd(dataclasses.replace(settings, rate_limit_sends=(1, 60.0)))
    await daemon.start()
    try:
        api = Api(f"http://127.0.0.1:{daemon.port}")
        await api.create_chat(chat_id)
        checked = 0
        for route, method, op in _operations():
            if "429" not in op["responses"]:
                continue
            assert (route, method.lower()) == ("/chats/{chat_id}/messages", "post")
            user = f"rl-{uuid.uuid4().hex[:8]}"
            await api.put(f"/chats/{chat_id}/members/{user}", {}, user="alice")
            assert (await api.send(chat_id, "first", user=user)).status == 201
            resp = await api.send(chat_id, "second", user=user)
            _check(resp, route, method, 429, op)
            assert 1 <= int(resp.headers["Retry-After"]) <= 60
            checked += 1
        assert checked == 1
    finally:
        await daemon.stop()


@pytest.mark.gen_test(timeout=60)
async def test_what_malformed_requests_get_is_documented(api):
    """The other direction: bad input of every kind gets a documented code (and
    never a 500)."""
    world = World(api)
    await world.setup()
    expired = f"Bearer {token('alice', ttl=-10)}"
    for route, method, op in _operations():
        documented = {int(c) for c in op["responses"]}
        path = _path(route, world)
        probes = [
            dict(raw=b"{not json"),
            dict(raw=b"[1, 2]"),
            dict(raw=b'{"content": 5, "title": [], "seq": -1, "role": 7}'),
            dict(raw=b"", auth=expired),
            dict(raw=b"", auth="Basic YWxpY2U6eA=="),
        ]
        for probe in probes:
            resp = await api.request(method, path + "?limit=x&id=-1", **probe)
            assert resp.status in documented, (method, route, probe, resp)


@pytest.mark.gen_test(timeout=60)
async def test_every_documented_503_is_produced_when_postgres_is_gone(io_loop, settings):
    """The app on a database that disappears: each operation documenting 503 says so."""
    with fresh_database() as url:
        migrations.migrate(url)
        daemon = Chatd(dataclasses.replace(settings, database_url=url, db_timeout=2.0))
        await daemon.start()
        try:
            api = Api(f"http://127.0.0.1:{daemon.port}")
            world = World(api)
            await world.setup()
            mid = await world.message()
            _drop(url)
            for route, method, op in _operations():
                if "503" not in op["responses"]:
                    continue
                path = _path(route, world, id=mid)
                if route == "/message/":
                    path += f"?id={mid}"
                if route == "/search":
                    path += "?q=x"
                body = {"/chats": {"title": "x"}, "/chats/{chat_id}/read": {"seq": 1}}.get(
                    route, {"content": "x", "role": "member"}
                )
                if method in ("GET", "DELETE"):
                    body = None
                resp = await api.request(method, path, body, user=None if route == "/readyz"
                                         else "alice")  # fmt: skip
                _check(resp, route, method, 503, op)
                assert resp.error_code == "unavailable"
                if route == "/readyz":
                    assert "postgres" in resp.json["error"]["message"]
        finally:
            await daemon.stop()


def _drop(url: str) -> None:
    from urllib.parse import urlsplit

    from .conftest import _admin

    name = urlsplit(url).path.lstrip("/")
    _admin(f'DROP DATABASE "{name}" WITH (FORCE)')
    with pytest.raises(psycopg2.OperationalError):
        psycopg2.connect(url).close()
