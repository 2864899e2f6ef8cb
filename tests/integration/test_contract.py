"""Every operation of the public OpenAPI contract, called on a running monolith.

The contract is docs/openapi/otus-highload-architect-1.2.0.json (the shared file, kept in the
repository). For each of its operations this module makes valid and invalid calls against a
real ``twistd -n snet-server`` (with a real chat instance, Consul agent, MariaDB and Redis)
and checks that every status code answered is one the operation documents, that 200 bodies
match the documented schema, and that every error body has the documented error shape.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from snet.testing.fleet import ChatFleet
from snet.testing.monolith_stack import monolith_with_one_chat
from snet.testing.processes import http_json
from snet.testing.servers import ConsulAgent, MariaDB, Redis

pytestmark = pytest.mark.integration

SPEC_PATH = Path(__file__).parents[2] / "docs" / "openapi" / "otus-highload-architect-1.2.0.json"
SPEC: dict[str, Any] = json.loads(SPEC_PATH.read_text())


def resolve(node: Any) -> Any:
    """The schema with every local ``$ref`` replaced by what it points to."""
    if isinstance(node, dict):
        if "$ref" in node:
            target: Any = SPEC
            for part in node["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return resolve(target)
        return {key: resolve(value) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(item) for item in node]
    return node


ERROR_SCHEMA = resolve(SPEC["components"]["responses"]["5xx"]["content"]["application/json"])[
    "schema"
]


def documented(path: str, method: str) -> dict[str, Any]:
    responses: dict[str, Any] = SPEC["paths"][path][method]["responses"]
    return responses


def check(
    path: str, method: str, status: int, headers: dict[str, str], body: Any, checked: set[str]
) -> None:
    """Assert that this answer is one the contract allows for the operation."""
    checked.add(f"{method.upper()} {path}")
    responses = documented(path, method)
    allowed = {key for key in responses if key.isdigit()}
    assert str(status) in allowed or (status >= 500 and "5xx" in responses), (
        f"{method.upper()} {path} answered {status}, documented: {sorted(responses)}: {body}"
    )
    if status == 200:
        content = resolve(responses["200"]).get("content")
        if content:
            assert headers.get("Content-Type", "").startswith("application/json")
            jsonschema.validate(body, content["application/json"]["schema"])
    else:
        assert headers.get("Content-Type", "").startswith("application/json"), headers
        jsonschema.validate(body, ERROR_SCHEMA)
        assert body["message"]
        assert body["request_id"] == headers.get("X-Request-Id")
    if status == 503:
        assert int(headers["Retry-After"]) >= 1


@pytest.fixture(scope="module")
def stack(
    consul_agent: ConsulAgent, mariadb: MariaDB, redis_server: Redis
) -> Iterator[tuple[str, ChatFleet]]:
    with monolith_with_one_chat(
        consul_agent, mariadb, redis_server, name="contract", chat_redis_db=3, server_redis_db=4
    ) as running:
        yield running


@pytest.fixture(scope="module")
def checked() -> Iterator[set[str]]:
    seen: set[str] = set()
    yield seen
    operations = {f"{m.upper()} {p}" for p, ops in SPEC["paths"].items() for m in ops}
    missing = operations - seen
    assert not missing, f"operations never called: {sorted(missing)}"


class Api:
    """Calls of the monolith's public API, each checked against the contract."""

    def __init__(self, base: str, checked: set[str]) -> None:
        self.base = base
        self.checked = checked

    def __call__(
        self, template: str, method: str, **kwargs: Any
    ) -> tuple[int, dict[str, str], Any]:
        return call(self.base, template, method, self.checked, **kwargs)

    def status(self, template: str, method: str, **kwargs: Any) -> int:
        return self(template, method, **kwargs)[0]


def call(
    base: str,
    template: str,
    method: str,
    checked: set[str],
    *,
    path: str | None = None,
    body: object | None = None,
    token: str | None = None,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], Any]:
    headers = {"X-Request-ID": uuid.uuid4().hex}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    status, got, answer = http_json(
        method.upper(), base + (path or template), body, headers, timeout=10, raw=raw
    )
    check(template, method, status, got, answer, checked)
    return status, got, answer


def register(api: Api, first: str = "Ivan", second: str = "Petrov") -> str:
    status, _, body = api(
        "/user/register",
        "post",
        body={
            "first_name": first,
            "second_name": second,
            "birthdate": "1991-02-03",
            "biography": "chess",
            "city": "Kazan",
            "password": "correct horse",
        },
    )
    assert status == 200
    return str(body["user_id"])


def login(api: Api, user_id: str) -> str:
    status, _, body = api("/login", "post", body={"id": user_id, "password": "correct horse"})
    assert status == 200
    return str(body["token"])


def test_users_register_log_in_get_and_search(
    stack: tuple[str, ChatFleet], checked: set[str]
) -> None:
    api = Api(stack[0], checked)
    tag = uuid.uuid4().hex[:6]
    user = register(api, f"Kon{tag}", f"Osi{tag}")
    login(api, user)

    status, _, body = api("/user/get/{id}", "get", path=f"/user/get/{user}")
    assert status == 200 and body["id"] == user and body["first_name"] == f"Kon{tag}"
    status, _, body = api(
        "/user/search",
        "get",
        path=f"/user/search?first_name=Kon{tag}&last_name=Osi{tag}",
    )
    assert status == 200 and [u["id"] for u in body] == [user]

    bad_registrations: list[object] = [
        {},
        {"first_name": "A", "second_name": "B", "birthdate": "2023-02-30", "password": "pw123456"},
        {"first_name": "A", "second_name": "B", "birthdate": "1990-01-01", "password": 5},
        {
            "first_name": "x" * 1000,
            "second_name": "B",
            "birthdate": "1990-01-01",
            "password": "pw123456",
        },
        ["not", "an", "object"],
    ]
    for bad in bad_registrations:
        assert api.status("/user/register", "post", body=bad) == 400
    assert api.status("/user/register", "post", raw=b"{nope") == 400
    assert api.status("/login", "post", body={"id": user, "password": "wrong!!"}) in (
        400,
        404,
    )
    assert api.status("/login", "post", body={"id": "999999999", "password": "x"}) in (
        400,
        404,
    )
    assert api.status("/login", "post", body={"id": "abc", "password": "x"}) == 400
    assert api.status("/user/get/{id}", "get", path="/user/get/999999999") == 404
    assert api.status("/user/get/{id}", "get", path="/user/get/not-an-id") == 400
    assert api.status("/user/search", "get", path="/user/search?first_name=K") == 400


def test_friends_posts_and_feed(stack: tuple[str, ChatFleet], checked: set[str]) -> None:
    api = Api(stack[0], checked)
    reader, author = register(api), register(api)
    token, author_token = login(api, reader), login(api, author)

    for template in ("/friend/set/{user_id}", "/friend/delete/{user_id}"):
        route = template.replace("{user_id}", author)
        assert api.status(template, "put", path=route) == 401
        assert api.status(template, "put", path=route, token="bogus") == 401
        bad = template.replace("{user_id}", "x")
        assert api.status(template, "put", path=bad, token=token) == 400
    assert (
        api.status("/friend/set/{user_id}", "put", path=f"/friend/set/{author}", token=token) == 200
    )

    status, _, post_id = api(
        "/post/create", "post", body={"text": "first post"}, token=author_token
    )
    assert status == 200 and isinstance(post_id, str)
    assert api.status("/post/create", "post", body={"text": ""}, token=author_token) == 400
    assert api.status("/post/create", "post", body={"text": "x"}) == 401

    status, _, post = api("/post/get/{id}", "get", path=f"/post/get/{post_id}")
    assert status == 200 and post == {"id": post_id, "text": "first post", "author_user_id": author}
    assert api.status("/post/get/{id}", "get", path="/post/get/x") == 400

    assert (
        api.status(
            "/post/update", "put", body={"id": post_id, "text": "edited"}, token=author_token
        )
        == 200
    )
    assert api.status("/post/update", "put", body={"id": post_id}, token=author_token) == 400
    assert api.status(
        "/post/update", "put", body={"id": post_id, "text": "mine now"}, token=token
    ) in (400, 401)

    status, _, feed = api("/post/feed", "get", token=token)
    assert status == 200 and [p["text"] for p in feed] == ["edited"]
    assert api.status("/post/feed", "get", path="/post/feed?limit=0", token=token) == 400
    assert api.status("/post/feed", "get", path="/post/feed?offset=-1", token=token) == 400
    assert api.status("/post/feed", "get") == 401

    route = f"/post/delete/{post_id}"
    assert api.status("/post/delete/{id}", "put", path=route, token=token) in (400, 401)
    assert api.status("/post/delete/{id}", "put", path=route, token=author_token) == 200
    assert api("/post/feed", "get", token=token)[2] == []
    assert (
        api.status("/friend/delete/{user_id}", "put", path=f"/friend/delete/{author}", token=token)
        == 200
    )


def test_dialogs(stack: tuple[str, ChatFleet], checked: set[str]) -> None:
    api, fleet = Api(stack[0], checked), stack[1]
    alice, bob = register(api), register(api)
    token = login(api, alice)

    send = "/dialog/{user_id}/send"
    status, headers, _ = api(
        send, "post", path=f"/dialog/{bob}/send", body={"text": "hi"}, token=token
    )
    assert status == 200 and headers["X-Snet-Chat-Instance"] == fleet.instance_id(0)
    for bad in ({"text": ""}, {}, {"text": 1}):
        assert api.status(send, "post", path=f"/dialog/{bob}/send", body=bad, token=token) == 400
    assert api.status(send, "post", path="/dialog/x/send", body={"text": "hi"}, token=token) == 400
    assert api.status(send, "post", path=f"/dialog/{bob}/send", body={"text": "hi"}) == 401

    listing = "/dialog/{user_id}/list"
    status, _, messages = api(listing, "get", path=f"/dialog/{bob}/list", token=token)
    assert status == 200 and messages == [{"from": alice, "to": bob, "text": "hi"}]
    assert api.status(listing, "get", path="/dialog/x/list", token=token) == 400
    assert api.status(listing, "get", path=f"/dialog/{bob}/list") == 401
