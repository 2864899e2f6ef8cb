"""Unit tests of the monolith's public API (snet.server.app), served in memory by StubTreq over
in-memory fakes of Accounts, Social, FeedCache and the ChatGateway. The fakes stand in for
MySQL, Redis and the chat service in route and validation logic only: the integration tests
(tests/integration/test_server_storage.py, test_feed.py) check the real stores."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import date
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock

from snet.server.accounts import NoSuchUser, Profile, User, WrongPassword
from snet.server.actions import MAX_DIALOG_PAGES
from snet.server.app import ServerAPI
from snet.server.gateway import ChatReply, ChatUnavailable, NoChatInstance
from snet.server.ratelimit import Network
from snet.server.social import NoSuchFriend, NoSuchPost, NotAuthor, Post, SelfFriendship
from snet.server.validation import parse_feed_limit, parse_offset
from snet.testing import result_of
from snet.web.draining import InFlight
from snet.web.errors import BadRequest, ErrorCode
from snet.web.metrics import HTTPMetrics

BASE = "http://server.test"
TODAY = date(2026, 11, 27)
GOOD = {
    "first_name": "Иван",
    "second_name": "Петров",
    "birthdate": "1990-05-17",
    "biography": "chess",
    "city": "Moscow",
    "password": "password1",
}


class FakeAccounts:
    """Accounts' behaviour in dicts: passwords are compared as given, tokens are "t<id>"."""

    def __init__(self) -> None:
        self.users: dict[int, User] = {}
        self.passwords: dict[int, str] = {}
        self.revoked: set[str] = set()
        self.ping_result: Deferred[None] | None = None

    def today(self) -> date:
        return TODAY

    def register(self, profile: Profile, password: str) -> Deferred[int]:
        user_id = len(self.users) + 1
        self.users[user_id] = User(user_id, profile)
        self.passwords[user_id] = password
        return succeed(user_id)

    def login(self, user_id: int, password: str) -> Deferred[str]:
        if user_id not in self.users:
            return fail(NoSuchUser("no such user"))
        if self.passwords[user_id] != password:
            return fail(WrongPassword("wrong id or password"))
        return succeed(f"t{user_id}" + "x" * 20)

    def authenticate(self, token: str) -> Deferred[int | None]:
        for user_id in self.users:
            if token == f"t{user_id}" + "x" * 20 and token not in self.revoked:
                return succeed(user_id)
        return succeed(None)

    def logout(self, token: str) -> Deferred[None]:
        self.revoked.add(token)
        return succeed(None)

    def get(self, user_id: int) -> Deferred[User | None]:
        return succeed(self.users.get(user_id))

    def exists(self, user_id: int) -> Deferred[bool]:
        return succeed(user_id in self.users)

    def search(self, first: str, second: str, limit: int) -> Deferred[list[User]]:
        self.searched = (first, second, limit)
        found = [
            u
            for u in self.users.values()
            if u.profile.first_name.lower().startswith(first.lower())
            and u.profile.second_name.lower().startswith(second.lower())
        ]
        return succeed(found[:limit])

    def ping(self) -> Deferred[None]:
        return self.ping_result if self.ping_result is not None else succeed(None)


class FakeSocial:
    """Social's behaviour in a set of follows and a dict of posts."""

    def __init__(self, accounts: FakeAccounts) -> None:
        self.accounts = accounts
        self.follows: set[tuple[int, int]] = set()
        self.posts: dict[int, Post] = {}

    def _check(self, user_id: int, friend_id: int) -> None:
        if user_id == friend_id:
            raise SelfFriendship("self")
        if friend_id not in self.accounts.users:
            raise NoSuchFriend("no such user")

    def befriend(self, user_id: int, friend_id: int) -> Deferred[bool]:
        try:
            self._check(user_id, friend_id)
        except Exception as e:
            return fail(e)
        new = (user_id, friend_id) not in self.follows
        self.follows.add((user_id, friend_id))
        return succeed(new)

    def unfriend(self, user_id: int, friend_id: int) -> Deferred[bool]:
        try:
            self._check(user_id, friend_id)
        except Exception as e:
            return fail(e)
        had = (user_id, friend_id) in self.follows
        self.follows.discard((user_id, friend_id))
        return succeed(had)

    def create_post(self, author_id: int, text: str) -> Deferred[Post]:
        post = Post(len(self.posts) + 100, author_id, text)
        self.posts[post.id] = post
        return succeed(post)

    def _own(self, author_id: int, post_id: int) -> Post:
        if post_id not in self.posts:
            raise NoSuchPost("no such post")
        if self.posts[post_id].author_id != author_id:
            raise NotAuthor("not yours")
        return self.posts[post_id]

    def update_post(self, author_id: int, post_id: int, text: str) -> Deferred[Post]:
        try:
            self._own(author_id, post_id)
        except Exception as e:
            return fail(e)
        self.posts[post_id] = Post(post_id, author_id, text)
        return succeed(self.posts[post_id])

    def delete_post(self, author_id: int, post_id: int) -> Deferred[Post]:
        try:
            post = self._own(author_id, post_id)
        except Exception as e:
            return fail(e)
        del self.posts[post_id]
        return succeed(post)

    def get_post(self, post_id: int) -> Deferred[Post | None]:
        return succeed(self.posts.get(post_id))

    def friends(self, user_id: int, limit: int = 500) -> Deferred[list[int]]:
        return succeed(sorted(f for u, f in self.follows if u == user_id)[:limit])


class FakeFeed:
    """Records what FeedCache was told; ``read`` answers from FakeSocial."""

    def __init__(self, social: FakeSocial) -> None:
        self.social = social
        self.events: list[tuple[str, object]] = []
        self.reads: list[tuple[int, int, int]] = []

    def read(self, user_id: int, offset: int, limit: int) -> Deferred[list[Post]]:
        self.reads.append((user_id, offset, limit))
        followed = {friend for follower, friend in self.social.follows if follower == user_id}
        posts = sorted(
            (p for p in self.social.posts.values() if p.author_id in followed),
            key=lambda p: -p.id,
        )
        return succeed(posts[offset : offset + limit])

    def _event(self, name: str, value: object) -> Deferred[None]:
        self.events.append((name, value))
        return succeed(None)

    def post_created(self, post: Post) -> Deferred[None]:
        return self._event("created", post.id)

    def post_updated(self, post: Post) -> Deferred[None]:
        return self._event("updated", post.id)

    def post_deleted(self, post: Post) -> Deferred[None]:
        return self._event("deleted", post.id)

    def follows_changed(self, user_id: int) -> Deferred[None]:
        return self._event("follows", user_id)


class FakeChat:
    """A ChatGateway that records calls and answers from ``replies`` (or fails)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.replies: list[ChatReply] = []
        self.failure: Exception | None = None

    def _answer(self, name: str, kwargs: dict[str, Any]) -> Deferred[ChatReply]:
        self.calls.append((name, kwargs))
        if self.failure is not None:
            return fail(self.failure)
        if self.replies:
            return succeed(self.replies.pop(0))
        return succeed(ChatReply(201, {"message": {}}, "chat-1"))

    def send(self, **kwargs: Any) -> Deferred[ChatReply]:
        return self._answer("send", kwargs)

    def list(self, **kwargs: Any) -> Deferred[ChatReply]:
        return self._answer("list", kwargs)

    def unread(self, **kwargs: Any) -> Deferred[ChatReply]:
        return self._answer("unread", kwargs)


class Harness:
    def __init__(self, trusted_proxies: Sequence[Network] = (), direct: bool = True) -> None:
        self.accounts = FakeAccounts()
        self.social = FakeSocial(self.accounts)
        self.feed = FakeFeed(self.social)
        self.chat = FakeChat()
        self.in_flight = InFlight()
        self.clock = Clock()
        self.api = ServerAPI(
            accounts=self.accounts,  # type: ignore[arg-type]
            social=self.social,  # type: ignore[arg-type]
            feed=self.feed,  # type: ignore[arg-type]
            chat=self.chat,
            in_flight=self.in_flight,
            metrics=HTTPMetrics(),
            version="1.2.3",
            clock=self.clock,
            trusted_proxies=trusted_proxies,
        )
        self.treq = StubTreq(self.api.resource(direct=direct))

    def call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        token: str | None = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> tuple[int, Any, Any]:
        sent = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        response = result_of(self.treq.request(method, BASE + path, data=data, headers=sent))
        content = result_of(response.content())
        return response.code, (json.loads(content) if content else None), response.headers

    def user(self, first: str = "Ivan", second: str = "Petrov") -> tuple[int, str]:
        status, body, _ = self.call(
            "POST", "/user/register", {**GOOD, "first_name": first, "second_name": second}
        )
        assert status == 200, body
        user_id = int(body["user_id"])
        status, body, _ = self.call("POST", "/login", {"id": str(user_id), "password": "password1"})
        assert status == 200, body
        return user_id, body["token"]


@pytest.fixture(params=[True, False], ids=["direct", "klein"])
def h(request: pytest.FixtureRequest) -> Harness:
    """The API with its send run directly, as served, and by Klein (snet.web.direct): every
    test that takes it holds for both."""
    return Harness(direct=request.param)


def assert_error(status: int, body: Any, expected_status: int, code: int | None = None) -> None:
    assert status == expected_status, body
    assert set(body) == {"message", "request_id", "code"}
    if code is not None:
        assert body["code"] == code, body


# --- users ----------------------------------------------------------------------------------


def test_register_answers_the_new_id_as_a_string(h: Harness) -> None:
    """Registration answers {"user_id": "<decimal id>"} and stores the checked profile."""
    status, body, _ = h.call("POST", "/user/register", {**GOOD, "first_name": "  Иван "})
    assert status == 200
    assert body == {"user_id": "1"}
    assert h.accounts.users[1].profile == Profile(
        "Иван", "Петров", date(1990, 5, 17), "chess", "Moscow"
    )


def test_register_without_optional_fields_stores_empty_biography_and_city(h: Harness) -> None:
    """biography and city may be left out."""
    body = {k: v for k, v in GOOD.items() if k not in ("biography", "city")}
    assert h.call("POST", "/user/register", body)[0] == 200
    assert h.accounts.users[1].profile.city == ""


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"birthdate": "2023-02-30"}, ErrorCode.INVALID_FIELD),
        ({"birthdate": "2026-11-28"}, ErrorCode.INVALID_FIELD),
        ({"birthdate": "17.05.1990"}, ErrorCode.INVALID_FIELD),
        ({"birthdate": 19900517}, ErrorCode.INVALID_FIELD),
        ({"first_name": ""}, ErrorCode.INVALID_FIELD),
        ({"first_name": "   "}, ErrorCode.INVALID_FIELD),
        ({"first_name": None}, ErrorCode.INVALID_FIELD),
        ({"second_name": "x" * 101}, ErrorCode.INVALID_FIELD),
        ({"second_name": "a\x00b"}, ErrorCode.INVALID_FIELD),
        ({"city": "x" * 101}, ErrorCode.INVALID_FIELD),
        ({"biography": "x" * 2001}, ErrorCode.INVALID_FIELD),
        ({"biography": ["list"]}, ErrorCode.INVALID_FIELD),
        ({"password": "1234567"}, ErrorCode.INVALID_FIELD),
        ({"password": "x" * 257}, ErrorCode.INVALID_FIELD),
        ({"password": 12345678}, ErrorCode.INVALID_FIELD),
    ],
)
def test_register_refuses_invalid_fields_and_stores_nothing(
    h: Harness, change: dict[str, object], code: int
) -> None:
    """Every invalid field is a 400 with the JSON error body; nothing is stored."""
    status, body, _ = h.call("POST", "/user/register", {**GOOD, **change})
    assert_error(status, body, 400, code)
    assert h.accounts.users == {}


@pytest.mark.parametrize(
    ("raw", "content_type", "code"),
    [
        (b"{not json", "application/json", ErrorCode.INVALID_JSON),
        (b"[1, 2]", "application/json", ErrorCode.INVALID_JSON),
        (b'{"first_name": NaN}', "application/json", ErrorCode.INVALID_JSON),
        (b"first_name=a", "application/x-www-form-urlencoded", ErrorCode.UNSUPPORTED_CONTENT_TYPE),
    ],
)
def test_register_refuses_malformed_bodies(
    h: Harness, raw: bytes, content_type: str, code: int
) -> None:
    """Bodies that are not a JSON object are 400s."""
    status, body, _ = h.call(
        "POST", "/user/register", raw=raw, headers={"Content-Type": content_type}
    )
    assert_error(status, body, 400, code)


def test_login_answers_a_token_404_for_unknown_users_400_for_wrong_passwords(h: Harness) -> None:
    """Login: a token for the right pair, 404 for an unknown id, 400 for a wrong password or
    an id that is not a string of digits."""
    user_id, token = h.user()
    assert token
    status, body, _ = h.call("POST", "/login", {"id": "99", "password": "password1"})
    assert_error(status, body, 404, ErrorCode.USER_NOT_FOUND)
    status, body, _ = h.call("POST", "/login", {"id": str(user_id), "password": "nope-nope"})
    assert_error(status, body, 400, ErrorCode.WRONG_PASSWORD)
    for bad_id in (user_id, "0", "-1", "1.0", "", None, "x"):
        status, body, _ = h.call("POST", "/login", {"id": bad_id, "password": "password1"})
        assert_error(status, body, 400, ErrorCode.INVALID_PARAMETER)
    status, body, _ = h.call("POST", "/login", {"id": str(user_id)})
    assert_error(status, body, 400, ErrorCode.INVALID_FIELD)


def test_get_user_answers_the_public_profile(h: Harness) -> None:
    """/user/get/{id}: the User, 400 for an id of the wrong shape, 404 for an unknown one."""
    user_id, _ = h.user()
    status, body, _ = h.call("GET", f"/user/get/{user_id}")
    assert status == 200
    assert body == {
        "id": str(user_id),
        "first_name": "Ivan",
        "second_name": "Petrov",
        "birthdate": "1990-05-17",
        "biography": "chess",
        "city": "Moscow",
    }
    for bad in ("abc", "0", "01", "-1", str(2**63)):
        assert_error(*h.call("GET", f"/user/get/{bad}")[:2], 400)
    assert_error(*h.call("GET", "/user/get/12345")[:2], 404, ErrorCode.USER_NOT_FOUND)


def test_search_needs_both_prefixes_and_caps_the_results(h: Harness) -> None:
    """/user/search: both parameters required (1-100 characters); the store is asked for at
    most 100 users."""
    h.user("Konstantin", "Osipov")
    h.user("Ivan", "Osipov")
    status, body, _ = h.call("GET", "/user/search?first_name=Kon&last_name=Os")
    assert status == 200
    assert [u["first_name"] for u in body] == ["Konstantin"]
    assert h.accounts.searched == ("Kon", "Os", 100)
    for query in (
        "first_name=Kon",
        "last_name=Os",
        "first_name=&last_name=Os",
        f"first_name={'x' * 101}&last_name=Os",
    ):
        assert_error(*h.call("GET", f"/user/search?{query}")[:2], 400)


# --- authentication -------------------------------------------------------------------------

PROTECTED = [
    ("PUT", "/friend/set/1"),
    ("PUT", "/friend/delete/1"),
    ("POST", "/post/create"),
    ("PUT", "/post/update"),
    ("PUT", "/post/delete/1"),
    ("GET", "/post/feed"),
    ("POST", "/dialog/1/send"),
    ("GET", "/dialog/1/list"),
    ("GET", "/dialog/unread"),
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
def test_protected_routes_answer_401_without_a_valid_bearer_token(
    h: Harness, method: str, path: str
) -> None:
    """No token, a wrong scheme or an unknown token: 401 with ``WWW-Authenticate: Bearer``."""
    h.user()
    for headers, challenge in (
        ({}, b"Bearer"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, b'Bearer error="invalid_token"'),
        ({"Authorization": "Bearer"}, b'Bearer error="invalid_token"'),
        ({"Authorization": "Bearer not-a-token-of-anyone"}, b'Bearer error="invalid_token"'),
    ):
        status, body, response_headers = h.call(method, path, {"text": "x"}, headers=headers)
        assert_error(status, body, 401, ErrorCode.UNAUTHORIZED)
        assert response_headers.getRawHeaders(b"WWW-Authenticate") == [challenge]
    assert h.chat.calls == [] and h.feed.events == [] and h.social.posts == {}


# --- friends and posts ----------------------------------------------------------------------


def test_friend_set_and_delete_are_idempotent_and_invalidate_the_feed_on_change(
    h: Harness,
) -> None:
    """Befriending twice is fine; the follower's feed is invalidated only when the friendship
    really changed. Oneself, unknown users and bad ids are 400s."""
    alice, token = h.user()
    bob, _ = h.user("Bob")
    assert h.call("PUT", f"/friend/set/{bob}", token=token)[:2] == (200, {})
    assert h.call("PUT", f"/friend/set/{bob}", token=token)[:2] == (200, {})
    assert h.feed.events == [("follows", alice)]
    assert h.call("PUT", f"/friend/delete/{bob}", token=token)[:2] == (200, {})
    assert h.call("PUT", f"/friend/delete/{bob}", token=token)[:2] == (200, {})
    assert h.feed.events == [("follows", alice), ("follows", alice)]
    assert_error(
        *h.call("PUT", f"/friend/set/{alice}", token=token)[:2], 400, ErrorCode.SELF_FRIENDSHIP
    )
    assert_error(*h.call("PUT", "/friend/set/999", token=token)[:2], 400, ErrorCode.NO_SUCH_USER)
    assert_error(
        *h.call("PUT", "/friend/set/bob", token=token)[:2], 400, ErrorCode.INVALID_PARAMETER
    )
    assert_error(*h.call("GET", f"/friend/set/{bob}", token=token)[:2], 405)


def test_posts_are_created_as_string_ids_and_changed_by_their_authors(h: Harness) -> None:
    """create answers the id as a JSON string; update and delete are the author's alone (400
    for others and for unknown posts: the contract lists no 403 or 404 there); each change
    tells the feed."""
    _alice, alice_token = h.user()
    _bob, bob_token = h.user("Bob")
    status, post_id, _ = h.call("POST", "/post/create", {"text": "hello"}, token=alice_token)
    assert status == 200 and post_id == "100"
    assert h.call("GET", f"/post/get/{post_id}")[1] == {
        "id": "100",
        "text": "hello",
        "author_user_id": "1",
    }
    status, body, _ = h.call(
        "PUT", "/post/update", {"id": post_id, "text": "mine now"}, token=bob_token
    )
    assert_error(status, body, 400, ErrorCode.NOT_AUTHOR)
    assert_error(*h.call("PUT", f"/post/delete/{post_id}", token=bob_token)[:2], 400)
    status, body, _ = h.call("PUT", "/post/update", {"id": "555", "text": "x"}, token=alice_token)
    assert_error(status, body, 400, ErrorCode.NO_SUCH_POST)
    for bad in (
        {"id": 100, "text": "x"},
        {"text": "x"},
        {"id": post_id},
        {"id": post_id, "text": " "},
    ):
        assert_error(*h.call("PUT", "/post/update", bad, token=alice_token)[:2], 400)
    assert h.call("PUT", "/post/update", {"id": post_id, "text": "edited"}, token=alice_token)[
        :2
    ] == (200, {})
    assert h.call("PUT", f"/post/delete/{post_id}", token=alice_token)[:2] == (200, {})
    assert_error(*h.call("GET", f"/post/get/{post_id}")[:2], 400, ErrorCode.NO_SUCH_POST)
    assert h.feed.events == [("created", 100), ("updated", 100), ("deleted", 100)]


@pytest.mark.parametrize("text", ["", "   ", None, 5, ["a"], "x" * 10_001, "\ud800"])
def test_post_create_refuses_invalid_text(h: Harness, text: object) -> None:
    """Post texts must be non-blank strings of at most 10,000 characters."""
    _alice, token = h.user()
    status, body, _ = h.call("POST", "/post/create", {"text": text}, token=token)
    assert_error(status, body, 400, ErrorCode.INVALID_TEXT)
    assert h.social.posts == {}


def test_feed_defaults_to_the_first_ten_and_checks_offset_and_limit(h: Harness) -> None:
    """/post/feed passes offset (default 0) and limit (default 10, 1 to 1000) to the feed."""
    alice, token = h.user()
    bob, bob_token = h.user("Bob")
    h.call("PUT", f"/friend/set/{bob}", token=token)
    for i in range(3):
        h.call("POST", "/post/create", {"text": f"p{i}"}, token=bob_token)
    status, body, _ = h.call("GET", "/post/feed", token=token)
    assert status == 200
    assert [p["text"] for p in body] == ["p2", "p1", "p0"]
    assert h.call("GET", "/post/feed?offset=1&limit=1", token=token)[1][0]["text"] == "p1"
    assert h.feed.reads == [(alice, 0, 10), (alice, 1, 1)]
    for query in ("limit=0", "limit=1001", "limit=-1", "limit=x", "offset=-1", "offset=1.5"):
        assert_error(*h.call("GET", f"/post/feed?{query}", token=token)[:2], 400)


# --- dialogs --------------------------------------------------------------------------------


def test_dialog_send_forwards_the_clients_idempotency_key(h: Harness) -> None:
    """A send goes to the gateway with the caller, the peer, the text, the request id and the
    client's Idempotency-Key; the answer names the chat instance."""
    alice, token = h.user()
    bob, _ = h.user("Bob")
    status, body, headers = h.call(
        "POST",
        f"/dialog/{bob}/send",
        {"text": "привет"},
        token=token,
        headers={"Idempotency-Key": "key-1", "X-Request-ID": "rid-1"},
    )
    assert (status, body) == (200, {})
    assert headers.getRawHeaders(b"X-Snet-Chat-Instance") == [b"chat-1"]
    assert h.chat.calls == [
        (
            "send",
            {
                "request_id": "rid-1",
                "user_id": alice,
                "peer_id": bob,
                "text": "привет",
                "idempotency_key": "key-1",
            },
        )
    ]


def test_dialog_send_makes_an_idempotency_key_when_the_client_gives_none(h: Harness) -> None:
    """Without Idempotency-Key, each send gets a fresh uuid4 hex key."""
    _alice, token = h.user()
    bob, _ = h.user("Bob")
    h.call("POST", f"/dialog/{bob}/send", {"text": "a"}, token=token)
    h.call("POST", f"/dialog/{bob}/send", {"text": "a"}, token=token)
    keys = [kwargs["idempotency_key"] for _, kwargs in h.chat.calls]
    assert len(keys) == 2 and keys[0] != keys[1]
    assert all(len(key) == 32 and int(key, 16) >= 0 for key in keys)


@pytest.mark.parametrize(
    ("peer", "body", "headers", "code"),
    [
        ("2", {"text": "hi"}, {"Idempotency-Key": "bad key!"}, ErrorCode.INVALID_PARAMETER),
        ("2", {"text": "  "}, {}, ErrorCode.INVALID_TEXT),
        ("2", {"text": "x" * 4097}, {}, ErrorCode.INVALID_TEXT),
        ("2", {}, {}, ErrorCode.INVALID_TEXT),
        ("1", {"text": "hi"}, {}, ErrorCode.SELF_DIALOG),
        ("77", {"text": "hi"}, {}, ErrorCode.NO_SUCH_USER),
        ("bob", {"text": "hi"}, {}, ErrorCode.INVALID_PARAMETER),
    ],
)
def test_dialog_send_refuses_bad_input_without_calling_the_chat(
    h: Harness, peer: str, body: dict[str, Any], headers: dict[str, str], code: int
) -> None:
    """Bad keys, texts and recipients (oneself, unknown users) are 400s; the chat is never
    called."""
    _alice, token = h.user()
    h.user("Bob")
    status, answer, _ = h.call("POST", f"/dialog/{peer}/send", body, token=token, headers=headers)
    assert_error(status, answer, 400, code)
    assert h.chat.calls == []


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (NoChatInstance(), ErrorCode.NO_CHAT_INSTANCE),
        (ChatUnavailable("all failed"), ErrorCode.CHAT_UNAVAILABLE),
    ],
)
def test_dialog_calls_answer_503_with_retry_after_when_the_chat_is_unavailable(
    h: Harness, failure: Exception, code: int
) -> None:
    """No chat instance, or every instance failing: 503, Retry-After, a distinct code."""
    _alice, token = h.user()
    bob, _ = h.user("Bob")
    h.chat.failure = failure
    for method, path in (
        ("POST", f"/dialog/{bob}/send"),
        ("GET", f"/dialog/{bob}/list"),
        ("GET", "/dialog/unread"),
    ):
        status, body, headers = h.call(method, path, {"text": "hi"}, token=token)
        assert_error(status, body, 503, code)
        assert headers.getRawHeaders(b"Retry-After") == [b"1"]


def test_dialog_chat_4xx_is_passed_on_and_5xx_becomes_503(h: Harness) -> None:
    """A chat 4xx keeps its status, message and code; a chat 5xx is a 503 with Retry-After.
    Both name the instance."""
    _alice, token = h.user()
    bob, _ = h.user("Bob")
    h.chat.replies = [
        ChatReply(409, {"message": "idempotency key reused", "code": 40901}, "chat-2"),
        ChatReply(500, {"message": "boom", "code": 50000}, "chat-3"),
    ]
    status, body, headers = h.call("POST", f"/dialog/{bob}/send", {"text": "a"}, token=token)
    assert_error(status, body, 409, 40901)
    assert body["message"] == "idempotency key reused"
    assert headers.getRawHeaders(b"X-Snet-Chat-Instance") == [b"chat-2"]
    status, body, headers = h.call("POST", f"/dialog/{bob}/send", {"text": "a"}, token=token)
    assert_error(status, body, 503, ErrorCode.CHAT_UNAVAILABLE)
    assert headers.getRawHeaders(b"Retry-After") == [b"1"]
    assert headers.getRawHeaders(b"X-Snet-Chat-Instance") == [b"chat-3"]


def _message(i: int, sender: int, recipient: int) -> dict[str, Any]:
    return {
        "id": i,
        "sender_id": sender,
        "recipient_id": recipient,
        "text": f"m{i}",
        "created_at": "2026-11-27T00:00:00.000000Z",
    }


def test_dialog_list_pages_through_the_whole_dialog_oldest_first(h: Harness) -> None:
    """/dialog/{id}/list follows next_after_id with pages of 500 and answers every message as
    {"from", "to", "text"} with string ids."""
    alice, token = h.user()
    bob, _ = h.user("Bob")
    h.chat.replies = [
        ChatReply(
            200,
            {"messages": [_message(1, alice, bob), _message(2, bob, alice)], "next_after_id": 2},
            "chat-1",
        ),
        ChatReply(200, {"messages": [_message(3, alice, bob)], "next_after_id": None}, "chat-2"),
    ]
    status, body, headers = h.call("GET", f"/dialog/{bob}/list", token=token)
    assert status == 200
    assert body == [
        {"from": str(alice), "to": str(bob), "text": "m1"},
        {"from": str(bob), "to": str(alice), "text": "m2"},
        {"from": str(alice), "to": str(bob), "text": "m3"},
    ]
    assert [(c["after_id"], c["limit"], c["user_id"], c["peer_id"]) for _, c in h.chat.calls] == [
        (None, 500, alice, bob),
        (2, 500, alice, bob),
    ]
    assert headers.getRawHeaders(b"X-Snet-Chat-Instance") == [b"chat-2"]


def test_dialog_list_stops_after_the_page_cap(h: Harness) -> None:
    """A dialog longer than MAX_DIALOG_PAGES pages is cut there."""
    alice, token = h.user()
    bob, _ = h.user("Bob")
    h.chat.replies = [
        ChatReply(200, {"messages": [_message(i, alice, bob)], "next_after_id": i}, "chat-1")
        for i in range(1, MAX_DIALOG_PAGES + 5)
    ]
    status, body, _ = h.call("GET", f"/dialog/{bob}/list", token=token)
    assert status == 200 and len(body) == MAX_DIALOG_PAGES
    assert len(h.chat.calls) == MAX_DIALOG_PAGES


def test_dialog_unread_answers_counts_with_string_ids(h: Harness) -> None:
    """/dialog/unread turns the chat's counts into {"total", "dialogs": [{"user_id", "count"}]}."""
    alice, token = h.user()
    h.chat.replies = [
        ChatReply(
            200,
            {"total": 5, "dialogs": [{"peer_id": 2, "count": 3}, {"peer_id": 9, "count": 2}]},
            "chat-7",
        )
    ]
    status, body, headers = h.call("GET", "/dialog/unread", token=token)
    assert status == 200
    assert body == {
        "total": 5,
        "dialogs": [{"user_id": "2", "count": 3}, {"user_id": "9", "count": 2}],
    }
    assert h.chat.calls[0][1]["user_id"] == alice
    assert headers.getRawHeaders(b"X-Snet-Chat-Instance") == [b"chat-7"]


# --- operations -----------------------------------------------------------------------------


def test_health_reports_mysql_and_draining(h: Harness) -> None:
    """/health is 200 while MySQL answers, 503 with Retry-After when it does not (within the
    timeout) or while draining."""
    assert h.call("GET", "/health")[:2] == (200, {"status": "ok", "version": "1.2.3"})
    h.accounts.ping_result = Deferred()
    d = h.treq.get(BASE + "/health")
    h.clock.advance(1.5)
    h.treq.flush()
    response = result_of(d)
    assert response.code == 503
    assert result_of(response.json())["code"] == ErrorCode.MYSQL_UNAVAILABLE
    h.accounts.ping_result = None
    h.in_flight.start_draining()
    status, body, _ = h.call("GET", "/health")
    assert status == 503 and body["code"] == ErrorCode.DRAINING


def test_metrics_count_requests_by_route_template_on_the_admin_listener_only(h: Harness) -> None:
    """/metrics serves Prometheus text with requests counted by route template, on the
    admin listener; the public port does not have it."""
    h.call("GET", "/user/get/5")
    status, _, _ = h.call("GET", "/health")
    assert h.call("GET", "/metrics")[0] == 404
    admin = StubTreq(h.api.admin_resource())
    response = result_of(admin.get(BASE + "/metrics"))
    text = result_of(response.text())
    assert response.code == 200 and status == 200
    assert 'route="/user/get/<user_id>"' in text and 'status="404"' in text
    assert result_of(admin.get(BASE + "/health")).code == 200


# --- parsers --------------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=999_999_999))
def test_offset_accepts_non_negative_integers(n: int) -> None:
    assert parse_offset(str(n)) == n


@given(st.integers(min_value=1, max_value=1000))
def test_limit_accepts_1_to_1000(n: int) -> None:
    assert parse_feed_limit(str(n)) == n


@given(st.text().filter(lambda s: not (s.isascii() and s.isdigit() and 1 <= int(s) <= 1000)))
def test_limit_refuses_everything_else(text: str) -> None:
    with pytest.raises(BadRequest):
        parse_feed_limit(text)
