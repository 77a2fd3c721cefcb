"""docs/API.md, the reference frontend developers read, says what chatd has:
every route and socket event chatd has is in it, and everything in it exists
(version 2 items may be listed before they land). And the repository's
Markdown links only to files that a clone has."""

from __future__ import annotations

import re
from pathlib import Path

from chatd import openapi, web
from chatd.realtime import ChatNamespace

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "API.md"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE")


def _section(text: str, heading: str) -> str:
    """The text under ``heading`` up to the next heading of the same level or above."""
    level = heading.split(" ")[0]
    start = text.index("\n" + heading + "\n")
    rest = text[start + len(heading) + 2 :]
    stop = re.search(rf"^#{{1,{len(level)}}} ", rest, re.M)
    return rest[: stop.start()] if stop else rest


def _documented_routes(section: str) -> set[tuple[str, str]]:
    rows = re.findall(rf"^\| ({'|'.join(METHODS)}) \| `([^`]+)` \|", section, re.M)
    return {(method, path) for method, path in rows}


def _documented_events(section: str) -> set[str]:
    return set(re.findall(r"^\| `([a-z][a-z-]*)` \|", section, re.M))


def _v2() -> tuple[set[tuple[str, str]], set[str], set[str]]:
    section = _section(DOC.read_text(), "## Version 2 (being built)")
    routes = set(re.findall(rf"^\| route \| `({'|'.join(METHODS)}) ([^`]+)` \|", section, re.M))
    client = set(re.findall(r"^\| client event \| `([a-z-]+)` \|", section, re.M))
    server = set(re.findall(r"^\| server event \| `([a-z-]+)` \|", section, re.M))
    return routes, client, server


def code_routes() -> set[tuple[str, str]]:
    return {(m, route) for _p, handler, route in web.ROUTE_TABLE for m in handler.METHODS}


def code_client_events() -> set[str]:
    return set(ChatNamespace(None, None).handlers)


def code_server_events() -> set[str]:
    """Every event name chatd emits to sockets, from its source: a literal
    first argument of an emit (internal ``chatd:`` events carry a colon)."""
    names: set[str] = set()
    for source in (ROOT / "chatd").rglob("*.py"):
        names |= set(
            re.findall(r"\b_?emit(?:_message)?\(\s*\"([a-z][a-z-]*)\"", source.read_text())
        )
    return names


def test_the_route_table_and_the_openapi_document_agree():
    doc = openapi.document()["paths"]
    from_openapi = {(m.upper(), path) for path, ops in doc.items() for m in ops}
    assert from_openapi == code_routes()


def test_every_route_is_documented_and_every_documented_route_exists():
    text = DOC.read_text()
    documented = _documented_routes(_section(text, "## REST"))
    v2_routes, _, _ = _v2()
    routes = code_routes()
    assert routes - documented - v2_routes == set(), "routes missing from docs/API.md"
    assert documented - routes == set(), "docs/API.md documents routes chatd does not have"
    for method, path in sorted(routes & documented):
        if path.startswith("/chats") or path.startswith("/message"):
            assert f"### {method} {path}" in text or f"{method} {path}" in text, (method, path)


def test_every_socket_event_is_documented_and_every_documented_event_exists():
    text = DOC.read_text()
    socketio = _section(text, "## Socket.IO")
    client_doc = _documented_events(_section(socketio, "### Client to server"))
    server_doc = _documented_events(_section(socketio, "### Server to client"))
    _, v2_client, v2_server = _v2()
    client, server = code_client_events(), code_server_events()
    assert {"join-chat", "send-message"} <= client and {"new-message", "presence"} <= server
    assert client - client_doc - v2_client == set(), "client events missing from docs/API.md"
    assert client_doc - client == set(), "docs/API.md documents client events chatd lacks"
    assert server - server_doc - v2_server == set(), "server events missing from docs/API.md"
    assert server_doc - server == set(), "docs/API.md documents server events chatd lacks"


def test_every_error_code_is_documented():
    from chatd import errors

    codes = {"internal"}
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.ApiError):
            codes.add(cls.code)
    codes |= {"token_expired", "chat_not_found", "message_not_found"}
    table = _section(DOC.read_text(), "## Errors")
    documented = set(re.findall(r"^\| \d{3} \| `([a-z_]+)` \|", table, re.M))
    assert codes - {"internal"} <= documented, codes - documented


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def test_readme_and_docs_link_only_to_files_in_the_repository():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    checked = 0
    for page in pages:
        for target in _LINK.findall(page.read_text()):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue  # a URL, or an anchor in the same page
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.is_relative_to(ROOT), f"{page.name} links outside the repository: {target}"
            assert path.exists(), f"{page.name} links to a missing file: {target}"
            checked += 1
    assert checked >= 5
    readme = (ROOT / "README.md").read_text()
    assert "(docs/API.md)" in readme  # the reference is linked from the README
