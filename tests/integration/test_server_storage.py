"""Integration tests of the monolith's MySQL stores (snet.server.accounts, snet.server.social)
against a real MariaDB: registration and login with real scrypt hashes, tokens stored only as
digests and expiring, the prefix search (escaping, order, cap) and its index over 100,000
users, friendships and posts.

The server comes from the session fixture ``mariadb`` (tests/conftest.py).
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import AsyncIterator, Iterator
from datetime import date

import pymysql
import pymysql.cursors
import pytest
import pytest_twisted
from twisted.enterprise import adbapi
from twisted.internet.task import Clock

from snet.config import MySQLConfig
from snet.server.accounts import (
    SEARCH_SQL,
    TOKEN_TTL,
    Accounts,
    NoSuchUser,
    PasswordHasher,
    Profile,
    ScryptParameters,
    WrongPassword,
    like_prefix,
)
from snet.server.schema import apply_server_schema, schema_sql
from snet.server.social import NoSuchFriend, NoSuchPost, NotAuthor, Post, SelfFriendship, Social
from snet.storage import mysql_pool, split_statements
from snet.testing.servers import MariaDB

pytestmark = pytest.mark.integration

PROFILE = Profile("Иван", "Петров", date(1990, 5, 17), "шахматы", "Москва")
BULK_USERS = 100_000


@pytest.fixture(scope="module")
def mysql_config(mariadb: MariaDB) -> MySQLConfig:
    return MySQLConfig.from_url(mariadb.create_database("server_storage_test"))


@pytest_twisted.async_yield_fixture
async def pool(mysql_config: MySQLConfig) -> AsyncIterator[adbapi.ConnectionPool]:
    pool = mysql_pool(mysql_config, min=1, max=4)
    try:
        await apply_server_schema(pool)
        for table in ("user_tokens", "friendships", "posts", "users"):
            await pool.runOperation(f"DELETE FROM {table}")
        yield pool
    finally:
        pool.close()


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(time.time())
    return clock


@pytest.fixture
def accounts(pool: adbapi.ConnectionPool, clock: Clock) -> Accounts:
    """Accounts with the real default scrypt parameters, hashing in the reactor's threads."""
    return Accounts(pool, clock)


@pytest.fixture
def social(pool: adbapi.ConnectionPool, clock: Clock) -> Social:
    return Social(pool, clock)


async def _rows(pool: adbapi.ConnectionPool, sql: str) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = await pool.runQuery(sql)
    return list(rows)


# --- accounts -------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_registered_user_reads_back_and_logs_in_with_a_token(accounts: Accounts) -> None:
    """A registered user can be read back, log in with the password and be authenticated by
    the token."""
    user_id = await accounts.register(PROFILE, "correct horse battery")
    user = await accounts.get(user_id)
    assert user is not None and user.profile == PROFILE
    assert user.to_json()["id"] == str(user_id)
    token = await accounts.login(user_id, "correct horse battery")
    assert await accounts.authenticate(token) == user_id
    assert await accounts.authenticate(token[:-1] + ("A" if token[-1] != "A" else "B")) is None
    assert await accounts.exists(user_id)
    assert not await accounts.exists(user_id + 1)


@pytest_twisted.ensureDeferred
async def test_login_refuses_wrong_passwords_and_unknown_users(accounts: Accounts) -> None:
    """A wrong password is refused with a message that says only that the pair does not
    match; an unknown user is no user; neither creates a token."""
    user_id = await accounts.register(PROFILE, "correct horse battery")
    with pytest.raises(WrongPassword) as wrong:
        await accounts.login(user_id, "incorrect horse")
    assert "password" in str(wrong.value)
    with pytest.raises(NoSuchUser):
        await accounts.login(user_id + 1000, "correct horse battery")
    assert await _rows(accounts.pool, "SELECT * FROM user_tokens") == []


@pytest_twisted.ensureDeferred
async def test_passwords_and_tokens_are_stored_only_as_hashes(accounts: Accounts) -> None:
    """The users table holds a salted scrypt hash with its parameters, never the password; the
    tokens table holds the token's SHA-256, never the token."""
    first = await accounts.register(PROFILE, "correct horse battery")
    second = await accounts.register(PROFILE, "correct horse battery")
    hashes = [
        str(row[0])
        for row in await _rows(accounts.pool, "SELECT password_hash FROM users ORDER BY id")
    ]
    assert all(h.startswith("scrypt$16384$8$1$") for h in hashes)
    assert hashes[0] != hashes[1], "the same password must hash differently (salt)"
    assert all("horse" not in h for h in hashes)
    token = await accounts.login(first, "correct horse battery")
    stored = await _rows(accounts.pool, "SELECT token_hash, user_id FROM user_tokens")
    assert stored == [(hashlib.sha256(token.encode()).digest(), first)]
    assert second != first


@pytest_twisted.ensureDeferred
async def test_tokens_expire(accounts: Accounts, clock: Clock) -> None:
    """A token works until TOKEN_TTL seconds after its login, and not after."""
    user_id = await accounts.register(PROFILE, "correct horse battery")
    token = await accounts.login(user_id, "correct horse battery")
    clock.advance(TOKEN_TTL - 5)
    assert await accounts.authenticate(token) == user_id
    clock.advance(10)
    assert await accounts.authenticate(token) is None


@pytest_twisted.ensureDeferred
async def test_malformed_tokens_are_refused_without_a_lookup(accounts: Accounts) -> None:
    """Tokens of the wrong shape (too short, other characters) are simply not valid."""
    for token in ("", "short", "x" * 300, "a b c d e f g h i j k l m n", "' OR 1=1 --xxxxxxxx"):
        assert await accounts.authenticate(token) is None


@pytest_twisted.ensureDeferred
async def test_search_matches_both_prefixes_case_insensitively_in_id_order(
    pool: adbapi.ConnectionPool, clock: Clock
) -> None:
    """The search returns users whose first and second names start with the prefixes, ignoring
    case, ordered by id, at most the limit."""
    cheap = Accounts(pool, clock, PasswordHasher(ScryptParameters(n=2**4)))
    names = [("Konstantin", "Osipov"), ("konstantin", "osipova"), ("Kon", "Os"), ("Ivan", "Os")]
    ids = [await cheap.register(Profile(f, s, date(2000, 1, 1)), "password1") for f, s in names]
    found = await cheap.search("kon", "OS")
    assert [user.id for user in found] == ids[:3]
    assert [user.id for user in await cheap.search("Konst", "Osipova")] == [ids[1]]
    assert [user.id for user in await cheap.search("kon", "os", 2)] == ids[:2]
    assert await cheap.search("Konstantin ", "Osipov") == []


@pytest_twisted.ensureDeferred
async def test_search_treats_like_wildcards_as_plain_characters(
    pool: adbapi.ConnectionPool, clock: Clock
) -> None:
    """``%``, ``_`` and ``\\`` in a prefix match only themselves."""
    cheap = Accounts(pool, clock, PasswordHasher(ScryptParameters(n=2**4)))
    literal = await cheap.register(Profile("a_%\\b", "x", date(2000, 1, 1)), "password1")
    await cheap.register(Profile("abcb", "x", date(2000, 1, 1)), "password1")
    await cheap.register(Profile("a\\b", "x", date(2000, 1, 1)), "password1")
    assert [u.id for u in await cheap.search("a_", "x")] == [literal]
    assert [u.id for u in await cheap.search("a_%", "x")] == [literal]
    assert [u.id for u in await cheap.search("a_%\\", "x")] == [literal]
    assert await cheap.search("%", "x") == []
    assert await cheap.search("_", "x") == []


# --- the search index over 100,000 users ----------------------------------------------------

SYLLABLES = ["ka", "to", "mi", "ra", "se", "lu", "no", "vi", "da", "pe", "zo", "gu", "fi", "be"]


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()


@pytest.fixture(scope="module")
def bulk_database(mariadb: MariaDB) -> Iterator[str]:
    """A database of its own holding BULK_USERS users with random names (multi-row INSERTs
    on one blocking connection, before any test of the module runs on the reactor)."""
    url = mariadb.create_database("server_search_bulk")
    config = MySQLConfig.from_url(url)
    connection = pymysql.connect(
        host=config.host,
        port=config.port,
        user=config.user,
        password=config.password,
        database=config.database,
        autocommit=True,
        charset="utf8mb4",
    )
    rng = random.Random(20261127)
    try:
        with connection.cursor() as cursor:
            for statement in split_statements(schema_sql()):
                cursor.execute(statement)
            rows = [
                (_name(rng), _name(rng), "1990-01-01", "", "", "scrypt$x", "2026-01-01")
                for _ in range(BULK_USERS)
            ]
            for start in range(0, BULK_USERS, 10_000):
                cursor.executemany(
                    "INSERT INTO users (first_name, second_name, birthdate, biography, city,"
                    " password_hash, created_at) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    rows[start : start + 10_000],
                )
            cursor.execute("ANALYZE TABLE users")
            cursor.fetchall()
        yield url
    finally:
        connection.close()
        mariadb.drop_database("server_search_bulk")


def test_search_over_100k_users_uses_the_names_index(bulk_database: str) -> None:
    """EXPLAIN of the search shows a range (or ref) read of ix_users_names that examines far
    fewer rows than the table holds."""
    config = MySQLConfig.from_url(bulk_database)
    connection = pymysql.connect(
        host=config.host,
        port=config.port,
        user=config.user,
        password=config.password,
        database=config.database,
        charset="utf8mb4",
        cursorclass=pymysql.cursors.DictCursor,
    )
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT COUNT(*) AS n FROM users")
            assert cursor.fetchone()["n"] == BULK_USERS
            # (prefix, prefix, the most rows the plan may examine): one first syllable in
            # 14 starts with "K", a three-syllable prefix matches about one name in 2,700.
            for first, second, most in (
                ("Kato", "Mi", 1_000),
                ("Bebebe", "B", 200),
                ("Ka", "To", BULK_USERS // 5),
                ("K", "Z", BULK_USERS // 5),
            ):
                cursor.execute(
                    "EXPLAIN " + SEARCH_SQL, (like_prefix(first), like_prefix(second), 100)
                )
                (plan,) = cursor.fetchall()
                assert plan["key"] == "ix_users_names", plan
                assert plan["type"] in ("range", "ref"), plan
                assert int(plan["rows"]) <= most, plan
            cursor.execute(SEARCH_SQL, (like_prefix("Kato"), like_prefix("Mi"), 100))
            found = cursor.fetchall()
            assert found, "the random names include some Kato* Mi*"
            assert all(
                r["first_name"].startswith("Kato") and r["second_name"].startswith("Mi")
                for r in found
            )
            assert [r["id"] for r in found] == sorted(r["id"] for r in found)
    finally:
        connection.close()


# --- friends and posts ----------------------------------------------------------------------


async def _users(accounts: Accounts, count: int) -> list[int]:
    cheap = Accounts(accounts.pool, accounts.clock, PasswordHasher(ScryptParameters(n=2**4)))
    return [await cheap.register(PROFILE, "password1") for _ in range(count)]


@pytest_twisted.ensureDeferred
async def test_friendships_are_idempotent_one_way_follows(
    accounts: Accounts, social: Social
) -> None:
    """Befriending twice stores one row and says so; unfriending is as idempotent; a follow
    is one-directional; oneself and unknown users are refused."""
    alice, bob = await _users(accounts, 2)
    assert await social.befriend(alice, bob) is True
    assert await social.befriend(alice, bob) is False
    assert await social.followers(bob, after=0, limit=10) == [alice]
    assert await social.followers(alice, after=0, limit=10) == []
    with pytest.raises(SelfFriendship):
        await social.befriend(alice, alice)
    with pytest.raises(NoSuchFriend):
        await social.befriend(alice, bob + 1000)
    assert await social.unfriend(alice, bob) is True
    assert await social.unfriend(alice, bob) is False
    assert await social.followers(bob, after=0, limit=10) == []


@pytest_twisted.ensureDeferred
async def test_posts_are_created_read_updated_and_deleted_by_their_author_only(
    accounts: Accounts, social: Social
) -> None:
    """Only the author may update or delete a post; unknown posts are refused too."""
    alice, bob = await _users(accounts, 2)
    post = await social.create_post(alice, "первый пост")
    assert await social.get_post(post.id) == Post(post.id, alice, "первый пост")
    with pytest.raises(NotAuthor, match="author"):
        await social.update_post(bob, post.id, "hijacked")
    with pytest.raises(NotAuthor, match="author"):
        await social.delete_post(bob, post.id)
    with pytest.raises(NoSuchPost, match="no such post"):
        await social.update_post(alice, post.id + 1000, "nothing")
    assert await social.update_post(alice, post.id, "edited") == Post(post.id, alice, "edited")
    assert (await social.get_post(post.id)) == Post(post.id, alice, "edited")
    assert await social.delete_post(alice, post.id) == Post(post.id, alice, "edited")
    assert await social.get_post(post.id) is None
    with pytest.raises(NoSuchPost, match="no such post"):
        await social.delete_post(alice, post.id)


@pytest_twisted.ensureDeferred
async def test_feed_queries_read_followed_authors_newest_first(
    accounts: Accounts, social: Social
) -> None:
    """The feed queries list the posts of followed authors only, newest first, with offset and
    limit."""
    alice, bob, carol, dave = await _users(accounts, 4)
    await social.befriend(alice, bob)
    await social.befriend(alice, carol)
    posts = [
        await social.create_post(author, f"p{i}")
        for i, author in enumerate([bob, carol, dave, bob])
    ]
    expected = [posts[3], posts[1], posts[0]]
    assert await social.feed_ids(alice) == [p.id for p in expected]
    assert await social.feed_page(alice, 0, 10) == expected
    assert await social.feed_page(alice, 1, 1) == [posts[1]]
    assert await social.posts([posts[2].id, posts[0].id, 999_999]) == {
        posts[2].id: posts[2],
        posts[0].id: posts[0],
    }
    assert await social.feed_ids(bob) == []
