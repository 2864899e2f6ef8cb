"""Integration tests of the monolith's public API and its feed against a real MariaDB and a
real Redis, over real HTTP on 127.0.0.1: the feed stays correct through post creates,
updates and deletes and friendship changes, is rebuilt after FLUSHALL, pages and caps as
documented, fans out to 5,000 followers in batches after the request has returned, falls
back to MySQL when Redis is down, answers 503 when MySQL is down, and bad input changes no
table.

The servers come from the session fixtures ``mariadb`` and ``redis_server``; the Redis-down
test starts a Redis of its own. Chat calls are not made here (the gateway is a stub).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from attrs import define, field
from treq.client import HTTPClient
from twisted.enterprise import adbapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.logger import capturedLogs
from twisted.web.client import Agent, HTTPConnectionPool

from snet.config import MySQLConfig, RedisConfig
from snet.server.accounts import Accounts, PasswordHasher, ScryptParameters
from snet.server.app import ServerAPI
from snet.server.feed import JOBS_KEY, FeedCache, FeedFanout, feed_key
from snet.server.gateway import ChatReply, NoChatInstance
from snet.server.schema import apply_server_schema
from snet.server.social import Social
from snet.storage import RedisPool, mysql_pool, redis_pool
from snet.testing.servers import MariaDB, Redis, free_port
from snet.testing.waiting import eventually
from snet.web.draining import InFlight
from snet.web.limits import LimitedSite
from snet.web.metrics import HTTPMetrics

pytestmark = pytest.mark.integration

REDIS_DB = 5
"""A Redis database of this module's own on the shared server."""
TABLES = ("user_tokens", "friendships", "posts", "users")


class NoChat:
    """A ChatGateway with no instance at all."""

    def send(self, **kwargs: Any) -> Deferred[ChatReply]:
        return fail(NoChatInstance())

    def list(self, **kwargs: Any) -> Deferred[ChatReply]:
        return fail(NoChatInstance())

    def unread(self, **kwargs: Any) -> Deferred[ChatReply]:
        return fail(NoChatInstance())


@define
class Response:
    status: int
    body: Any
    headers: dict[str, str]


@define
class Stack:
    """The monolith's API on a real port, with its stores and fan-out worker."""

    accounts: Accounts
    social: Social
    feed: FeedCache
    fanout: FeedFanout
    url: str
    port: Any
    http_pool: HTTPConnectionPool
    http: HTTPClient = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.http = HTTPClient(Agent(reactor, pool=self.http_pool))

    async def call(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        token: str | None = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        sent = {"Content-Type": "application/json", **(headers or {})}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        response = await self.http.request(method, self.url + path, data=data, headers=sent)
        content = await response.content()
        decoded = json.loads(content) if content else None
        names = {k.decode().lower(): v[0].decode() for k, v in response.headers.getAllRawHeaders()}
        return Response(response.code, decoded, names)

    async def user(self, name: str = "Ivan") -> tuple[str, str]:
        """Register and log in a user: (user id, token)."""
        registered = await self.call(
            "POST",
            "/user/register",
            {
                "first_name": name,
                "second_name": "Test",
                "birthdate": "1990-01-01",
                "password": "password1",
            },
        )
        assert registered.status == 200, registered
        user_id = registered.body["user_id"]
        login = await self.call("POST", "/login", {"id": user_id, "password": "password1"})
        assert login.status == 200, login
        return user_id, login.body["token"]

    async def feed_texts(self, token: str, query: str = "") -> list[str]:
        response = await self.call("GET", "/post/feed" + query, token=token)
        assert response.status == 200, response
        return [post["text"] for post in response.body]

    async def close(self) -> None:
        if self.fanout.running:
            await self.fanout.stopService()
        await self.port.stopListening()
        await self.http_pool.closeCachedConnections()


async def start_stack(
    pool: adbapi.ConnectionPool,
    redis: RedisPool,
    *,
    interval: float = 0.01,
    batches_per_tick: int = 10,
    start_fanout: bool = True,
) -> Stack:
    accounts = Accounts(pool, reactor, PasswordHasher(ScryptParameters(n=2**4)))
    social = Social(pool, reactor)
    feed = FeedCache(social, redis)
    fanout = FeedFanout(feed, clock=reactor, interval=interval, batches_per_tick=batches_per_tick)
    api = ServerAPI(
        accounts=accounts,
        social=social,
        feed=feed,
        chat=NoChat(),
        in_flight=InFlight(),
        metrics=HTTPMetrics(),
        version="test",
        clock=reactor,
    )
    port = reactor.listenTCP(0, LimitedSite(api.resource()), interface="127.0.0.1")
    if start_fanout:
        fanout.startService()
    return Stack(
        accounts,
        social,
        feed,
        fanout,
        f"http://127.0.0.1:{port.getHost().port}",
        port,
        HTTPConnectionPool(reactor, persistent=True),
    )


@pytest.fixture(scope="module")
def mysql_config(mariadb: MariaDB) -> MySQLConfig:
    return MySQLConfig.from_url(mariadb.create_database("server_feed_test"))


@pytest_twisted.async_yield_fixture
async def pool(mysql_config: MySQLConfig) -> AsyncIterator[adbapi.ConnectionPool]:
    pool = mysql_pool(mysql_config, min=1, max=8)
    try:
        await apply_server_schema(pool)
        for table in TABLES:
            await pool.runOperation(f"DELETE FROM {table}")
        yield pool
    finally:
        pool.close()


@pytest_twisted.async_yield_fixture
async def stack(pool: adbapi.ConnectionPool, redis: RedisPool) -> AsyncIterator[Stack]:
    stack = await start_stack(pool, redis)
    try:
        yield stack
    finally:
        await stack.close()


# --- correctness ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_feed_follows_creates_updates_and_deletes(stack: Stack) -> None:
    """A follower's feed shows the followed authors' posts newest first, never the follower's
    own or strangers' posts, and reflects updates and deletes."""
    alice_id, alice = await stack.user("Alice")
    bob_id, bob = await stack.user("Bob")
    carol_id, carol = await stack.user("Carol")
    _dave_id, dave = await stack.user("Dave")
    assert (await stack.call("PUT", f"/friend/set/{bob_id}", token=alice)).status == 200
    assert (await stack.call("PUT", f"/friend/set/{carol_id}", token=alice)).status == 200
    assert await stack.feed_texts(alice) == []  # the feed is built (empty) now

    created = {}
    for author, text in ((bob, "b1"), (carol, "c1"), (dave, "d1"), (alice, "a1"), (bob, "b2")):
        response = await stack.call("POST", "/post/create", {"text": text}, token=author)
        assert response.status == 200 and isinstance(response.body, str), response
        created[text] = response.body

    async def shows(expected: list[str]) -> bool:
        return await stack.feed_texts(alice) == expected

    await eventually(lambda: shows(["b2", "c1", "b1"]), 15, "the feed to show the new posts")
    post = await stack.call("GET", f"/post/get/{created['b2']}")
    assert post.body == {"id": created["b2"], "text": "b2", "author_user_id": bob_id}

    updated = await stack.call(
        "PUT", "/post/update", {"id": created["c1"], "text": "c1 edited"}, token=carol
    )
    assert updated.status == 200
    assert await stack.feed_texts(alice) == ["b2", "c1 edited", "b1"]

    assert (await stack.call("PUT", f"/post/delete/{created['b2']}", token=bob)).status == 200
    assert await stack.feed_texts(alice) == ["c1 edited", "b1"]
    full = await stack.call("GET", "/post/feed", token=alice)
    assert full.body == [
        {"id": created["c1"], "text": "c1 edited", "author_user_id": carol_id},
        {"id": created["b1"], "text": "b1", "author_user_id": bob_id},
    ]
    # The removal fan-out takes the deleted id out of the cached feed too.
    await eventually(
        lambda: stack.feed.redis.call("zscore", feed_key(int(alice_id)), created["b2"]).addCallback(
            lambda score: score is None
        ),
        15,
        "the deleted post to leave the feed",
    )
    assert await stack.feed_texts(bob) == []


@pytest_twisted.ensureDeferred
async def test_feed_follows_friendship_changes(stack: Stack) -> None:
    """Unfriending removes an author's posts from the feed at once; befriending again brings
    them back."""
    alice_id, alice = await stack.user("Alice")
    bob_id, bob = await stack.user("Bob")
    carol_id, carol = await stack.user("Carol")
    await stack.call("PUT", f"/friend/set/{bob_id}", token=alice)
    await stack.call("PUT", f"/friend/set/{carol_id}", token=alice)
    await stack.call("POST", "/post/create", {"text": "from bob"}, token=bob)
    await stack.call("POST", "/post/create", {"text": "from carol"}, token=carol)
    assert await stack.feed_texts(alice) == ["from carol", "from bob"]

    assert (await stack.call("PUT", f"/friend/delete/{carol_id}", token=alice)).status == 200
    assert await stack.feed_texts(alice) == ["from bob"]
    assert (await stack.call("PUT", f"/friend/delete/{carol_id}", token=alice)).status == 200
    assert (await stack.call("PUT", f"/friend/set/{carol_id}", token=alice)).status == 200
    assert await stack.feed_texts(alice) == ["from carol", "from bob"]
    assert alice_id != bob_id


@pytest_twisted.ensureDeferred
async def test_feed_is_rebuilt_from_mysql_after_flushall(stack: Stack, redis_server: Redis) -> None:
    """After Redis loses everything, the feed reads the same, rebuilt from MySQL."""
    _alice_id, alice = await stack.user("Alice")
    bob_id, bob = await stack.user("Bob")
    await stack.call("PUT", f"/friend/set/{bob_id}", token=alice)
    for i in range(5):
        await stack.call("POST", "/post/create", {"text": f"p{i}"}, token=bob)
    before = await stack.feed_texts(alice)
    assert before == ["p4", "p3", "p2", "p1", "p0"]
    redis_server.flushall()
    assert await stack.feed_texts(alice) == before
    assert await stack.feed_texts(alice, "?offset=1&limit=2") == ["p3", "p2"]


@pytest_twisted.ensureDeferred
async def test_feed_pages_and_keeps_the_newest_thousand(
    stack: Stack, pool: adbapi.ConnectionPool
) -> None:
    """offset/limit page the feed; it holds the newest 1,000 posts, so pages beyond them are
    short or empty."""
    _alice_id, alice = await stack.user("Alice")
    bob_id, _bob = await stack.user("Bob")
    await stack.call("PUT", f"/friend/set/{bob_id}", token=alice)

    def insert(txn: adbapi.Transaction) -> None:
        txn.executemany(
            "INSERT INTO posts (author_id, text, created_at, updated_at)"
            " VALUES (%s, %s, UTC_TIMESTAMP(6), UTC_TIMESTAMP(6))",
            [(int(bob_id), f"p{i}") for i in range(1005)],
        )

    await pool.runInteraction(insert)
    assert await stack.feed_texts(alice) == [f"p{i}" for i in range(1004, 994, -1)]
    assert await stack.feed_texts(alice, "?offset=10&limit=3") == ["p994", "p993", "p992"]
    assert await stack.feed_texts(alice, "?offset=990&limit=100") == [
        f"p{i}" for i in range(14, 4, -1)
    ]
    assert await stack.feed_texts(alice, "?offset=1000&limit=10") == []
    everything = await stack.feed_texts(alice, "?limit=1000")
    assert len(everything) == 1000 and everything[0] == "p1004" and everything[-1] == "p5"
    assert (await stack.call("GET", "/post/feed?limit=1001", token=alice)).status == 400


# --- fan-out --------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_fanout_to_5000_followers_runs_in_batches_after_the_request(
    pool: adbapi.ConnectionPool, redis: RedisPool
) -> None:
    """Creating a post by an author with 5,000 followers returns before the fan-out is done;
    the worker then reaches every follower's feed, 500 at a time."""
    stack = await start_stack(pool, redis, interval=0.05, batches_per_tick=1)
    try:
        author_id, author = await stack.user("Popular")

        def followers(txn: adbapi.Transaction) -> list[int]:
            txn.executemany(
                "INSERT INTO users (first_name, second_name, birthdate, password_hash,"
                " created_at) VALUES (%s, %s, %s, %s, UTC_TIMESTAMP(6))",
                [("Fan", f"N{i}", "2000-01-01", "scrypt$x") for i in range(5000)],
            )
            txn.execute("SELECT id FROM users WHERE first_name = 'Fan' ORDER BY id")
            ids = [int(row[0]) for row in txn.fetchall()]
            txn.executemany(
                "INSERT INTO friendships (user_id, friend_id, created_at)"
                " VALUES (%s, %s, UTC_TIMESTAMP(6))",
                [(fan, int(author_id)) for fan in ids],
            )
            return ids

        fans: list[int] = await pool.runInteraction(followers)
        started = time.monotonic()
        response = await stack.call("POST", "/post/create", {"text": "hello fans"}, token=author)
        answered_in = time.monotonic() - started
        assert response.status == 200
        post_id = response.body
        last_score = await redis.call("zscore", feed_key(fans[-1]), post_id)
        assert last_score is None, "the last follower was reached before the request returned"

        count_script = """
        local n = 0
        for _, key in ipairs(KEYS) do
            if redis.call('ZSCORE', key, ARGV[1]) then n = n + 1 end
        end
        return n
        """

        async def reached() -> int:
            return int(
                await redis.call("eval", count_script, [feed_key(f) for f in fans], [post_id])
            )

        partial = await reached()
        assert partial < len(fans)
        await eventually(
            lambda: Deferred.fromCoroutine(reached()).addCallback(lambda n: n == 5000),
            15,
            "every follower's feed to have the post",
        )
        # Ten full batches leave one continuation that finds no one left.
        await eventually(
            lambda: redis.call("llen", JOBS_KEY).addCallback(lambda n: n == 0),
            15,
            "the fan-out queue to empty",
        )
        batches = stack.feed.metrics.batches.labels(op="add")._value.get()
        assert batches == 10
        assert answered_in < 5.0
    finally:
        await stack.close()


# --- failures -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_feed_falls_back_to_mysql_while_redis_is_down(pool: adbapi.ConnectionPool) -> None:
    """With Redis stopped, feeds are read from MySQL (logged once), posts are still created,
    and their fan-out happens once Redis is back."""
    with Redis() as own_redis:
        config = RedisConfig.from_url(own_redis.url)
        client = redis_pool(config, timeout=0.5)
        stack = await start_stack(pool, client)
        try:
            _alice_id, alice = await stack.user("Alice")
            bob_id, bob = await stack.user("Bob")
            await stack.call("PUT", f"/friend/set/{bob_id}", token=alice)
            await stack.call("POST", "/post/create", {"text": "before"}, token=bob)
            assert await stack.feed_texts(alice) == ["before"]

            own_redis.stop()
            with capturedLogs() as events:
                created = await stack.call("POST", "/post/create", {"text": "during"}, token=bob)
                assert created.status == 200
                assert await stack.feed_texts(alice) == ["during", "before"]
                assert await stack.feed_texts(alice) == ["during", "before"]
            degraded = [e for e in events if "serving feeds from MySQL" in e.get("log_format", "")]
            assert len(degraded) == 1
            assert stack.feed.pending > 0

            own_redis.start()
            await eventually(lambda: stack.feed.pending == 0, 15, "the kept writes to be applied")
            assert await stack.feed_texts(alice) == ["during", "before"]
            assert await client.call("zscore", feed_key(int(_alice_id)), created.body) is not None
        finally:
            await stack.close()
            await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_mysql_down_answers_503_with_retry_after(redis: RedisPool) -> None:
    """With MySQL unreachable, protected and public calls answer 503 with Retry-After and the
    JSON error body; /health says unavailable."""
    dead = mysql_pool(
        MySQLConfig("127.0.0.1", free_port(), "nobody", "", "nothing"), connect_timeout=1
    )
    stack = await start_stack(dead, redis, start_fanout=False)
    try:
        for method, path, token in (
            ("GET", "/post/feed", "a" * 43),
            ("GET", "/user/get/1", None),
            ("GET", "/health", None),
        ):
            response = await stack.call(method, path, token=token)
            assert response.status == 503, (path, response)
            assert response.headers["retry-after"] == "1"
            assert set(response.body) >= {"message", "request_id", "code"}
    finally:
        await stack.close()
        dead.close()


@pytest_twisted.ensureDeferred
async def test_bad_input_changes_no_table(stack: Stack, pool: adbapi.ConnectionPool) -> None:
    """Malformed or invalid requests answer 4xx with the JSON error body and leave every
    table exactly as it was."""
    alice_id, alice = await stack.user("Alice")
    bob_id, bob = await stack.user("Bob")
    post = (await stack.call("POST", "/post/create", {"text": "mine"}, token=bob)).body

    async def snapshot() -> list[Any]:
        rows = []
        for table in TABLES:
            rows.append(await pool.runQuery(f"CHECKSUM TABLE {table}"))
            rows.append(await pool.runQuery(f"SELECT COUNT(*) FROM {table}"))
        return rows

    before = await snapshot()
    good = {
        "first_name": "A",
        "second_name": "B",
        "birthdate": "2000-01-01",
        "password": "password1",
    }
    bad_requests: list[tuple[str, str, Any, str | None, int]] = [
        ("POST", "/user/register", {**good, "birthdate": "2023-02-30"}, None, 400),
        ("POST", "/user/register", {**good, "birthdate": "2999-01-01"}, None, 400),
        ("POST", "/user/register", {**good, "first_name": "x" * 101}, None, 400),
        ("POST", "/user/register", {**good, "city": 5}, None, 400),
        ("POST", "/user/register", {**good, "password": "short"}, None, 400),
        ("POST", "/user/register", b"{not json", None, 400),
        ("POST", "/login", {"id": alice_id, "password": "wrong password"}, None, 400),
        ("POST", "/login", {"id": "999999999", "password": "password1"}, None, 404),
        ("POST", "/login", {"id": 1, "password": "password1"}, None, 400),
        ("PUT", f"/friend/set/{alice_id}", None, alice, 400),
        ("PUT", "/friend/set/999999999", None, alice, 400),
        ("PUT", "/friend/set/abc", None, alice, 400),
        ("PUT", f"/friend/set/{bob_id}", None, "x" * 43, 401),
        ("PUT", f"/friend/set/{bob_id}", None, None, 401),
        ("POST", "/post/create", {"text": ""}, alice, 400),
        ("POST", "/post/create", {"text": "x" * 10_001}, alice, 400),
        ("POST", "/post/create", {"text": ["no"]}, alice, 400),
        ("PUT", "/post/update", {"id": post, "text": "hijack"}, alice, 400),
        ("PUT", "/post/update", {"id": "999999999", "text": "nothing"}, bob, 400),
        ("PUT", "/post/update", {"id": int(post), "text": "number id"}, bob, 400),
        ("PUT", f"/post/delete/{post}", None, alice, 400),
        ("PUT", "/post/delete/0", None, bob, 400),
    ]
    for method, path, body, token, status in bad_requests:
        raw = body if isinstance(body, bytes) else None
        response = await stack.call(
            method, path, None if raw is not None else body, token=token, raw=raw
        )
        assert response.status == status, (method, path, body, response)
        assert set(response.body) == {"message", "request_id", "code"}
        if status == 401:
            assert response.headers["www-authenticate"].startswith("Bearer")
    assert await snapshot() == before
