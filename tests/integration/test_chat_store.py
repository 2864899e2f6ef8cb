"""Integration tests of the chat storage against a real MariaDB and a real Redis: sends stored
once per idempotency key (even racing), conflicts, paging, read marks, counter rebuilds, sends
that stay stored while Redis is down, concurrent schema setup and retries on dead connections.

The servers come from the session fixtures ``mariadb`` and ``redis_server`` (tests/conftest.py);
the test that stops Redis starts a Redis of its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

import pymysql
import pytest
import pytest_twisted
from twisted.enterprise import adbapi
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults

from snet.chat.schema import SCHEMA_LOCK, apply_chat_schema, schema_sql
from snet.chat.store import (
    Dialogs,
    IdempotencyKeyReused,
    Message,
    MessageStore,
    _Send,
    _send_batch,
    chat_pool,
)
from snet.chat.unread import UnreadIndex, UnreadRepairs, unread_key
from snet.config import MySQLConfig, RedisConfig
from snet.rediswire import RedisWire, redis_wire
from snet.storage import (
    RedisPool,
    apply_schema,
    begin_snapshot,
    mysql_pool,
    run_with_retry,
)
from snet.testing.servers import MariaDB, Redis
from snet.testing.waiting import eventually

pytestmark = pytest.mark.integration

T = TypeVar("T")

ALICE, BOB, CAROL, DAVE = 101, 102, 103, 104
REDIS_DB = 3
"""A Redis database of this module's own on the shared server."""


@pytest.fixture(scope="module")
def mysql_config(mariadb: MariaDB) -> MySQLConfig:
    return MySQLConfig.from_url(mariadb.create_database("chat_store_test"))


@pytest_twisted.async_yield_fixture
async def pool(mysql_config: MySQLConfig) -> AsyncIterator[adbapi.ConnectionPool]:
    pool = chat_pool(mysql_config, min=1, max=8)
    try:
        await apply_chat_schema(pool)
        await pool.runOperation("DELETE FROM chat_messages")
        await pool.runOperation("DELETE FROM chat_reads")
        yield pool
    finally:
        pool.close()


@pytest.fixture
def store(pool: adbapi.ConnectionPool) -> MessageStore:
    return MessageStore(pool)


@pytest.fixture
def counters(chat_redis: RedisWire) -> UnreadIndex:
    return UnreadIndex(chat_redis)


@pytest.fixture
def dialogs(store: MessageStore, counters: UnreadIndex) -> Dialogs:
    return dialogs_over(store, counters)


def dialogs_over(store: MessageStore, counters: UnreadIndex) -> Dialogs:
    return Dialogs(store, counters, UnreadRepairs(store.pool, counters), reactor)


async def rows(pool: adbapi.ConnectionPool) -> list[tuple[Any, ...]]:
    return list(
        await pool.runQuery(
            "SELECT id, sender_id, recipient_id, text, idempotency_key FROM chat_messages"
            " ORDER BY id"
        )
    )


# --- sends ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_send_is_stored_once_under_a_repeated_key(
    store: MessageStore, pool: adbapi.ConnectionPool
) -> None:
    first, created = await store.send(ALICE, BOB, "hello 👋", "key-1")
    again, created_again = await store.send(ALICE, BOB, "hello 👋", "key-1")
    assert (created, created_again) == (True, False)
    assert again == first
    assert first.text == "hello 👋"
    assert first.created_at.tzinfo is not None
    assert await rows(pool) == [(first.id, ALICE, BOB, "hello 👋", "key-1")]


async def session_counter(pool: adbapi.ConnectionPool, name: str) -> int:
    rows = await pool.runQuery("SHOW SESSION STATUS LIKE %s", (name,))
    return int(rows[0][1])


async def counting_statements(
    pool: adbapi.ConnectionPool,
) -> Callable[[], Coroutine[Any, Any, int]]:
    """A function that tells how many statements the one connection of *pool* has run since
    it was last called (or since this call): its session's ``Questions``, less its own reads
    of that counter."""
    first = await session_counter(pool, "Questions")
    reading = await session_counter(pool, "Questions") - first
    last = [await session_counter(pool, "Questions")]

    async def since() -> int:
        now = await session_counter(pool, "Questions")
        ran = now - last[0] - reading
        last[0] = now
        return ran

    return since


@pytest_twisted.ensureDeferred
async def test_a_send_costs_mariadb_one_statement_and_no_commit(
    mysql_config: MySQLConfig,
) -> None:
    """On one connection of the chat's pool, the statements MariaDB counts for a new send
    (its session's ``Questions``, less what reading that counter costs) are the INSERT ...
    RETURNING alone, and no COMMIT is sent; a replayed send still answers with the stored
    message."""
    pool = chat_pool(mysql_config, min=1, max=1)
    try:
        await apply_chat_schema(pool)  # when run alone
        store = MessageStore(pool)
        await store.send(ALICE, BOB, "warm the connection", "key-warm")
        commits = await session_counter(pool, "Com_commit")
        statements = await counting_statements(pool)
        message, created = await store.send(ALICE, BOB, "counted", "key-counted")
        assert (created, await statements()) == (True, 1)
        assert await session_counter(pool, "Com_commit") == commits
        again, created_again = await store.send(ALICE, BOB, "counted", "key-counted")
        assert (again, created_again) == (message, False)
    finally:
        pool.close()


def _insert_in_a_transaction(txn: adbapi.Transaction, text: str) -> None:
    txn.execute("START TRANSACTION")
    txn.execute(
        "INSERT INTO chat_messages (sender_id, recipient_id, dialog_low, dialog_high, text,"
        " idempotency_key, created_at) VALUES (%s, %s, %s, %s, %s, %s, UTC_TIMESTAMP(6))",
        (CAROL, DAVE, CAROL, DAVE, text, "key-" + text),
    )


@pytest_twisted.ensureDeferred
async def test_the_chat_pool_still_commits_a_transaction_an_interaction_opens(
    mysql_config: MySQLConfig, mariadb: MariaDB, pool: adbapi.ConnectionPool
) -> None:
    """Skipping the COMMIT is only for autocommitted statements: a write in an explicit
    transaction is committed at the interaction's end (another connection sees it), and a
    snapshot read ends with its COMMIT, leaving no transaction open."""
    await pool.runInteraction(_insert_in_a_transaction, "explicit")
    other = mariadb.connect(mysql_config.database)
    try:
        with other.cursor() as cursor:
            cursor.execute("SELECT text FROM chat_messages WHERE sender_id = %s", (CAROL,))
            assert cursor.fetchall() == (("explicit",),)
    finally:
        other.close()

    def snapshot_then_state(txn: adbapi.Transaction) -> bool:
        begin_snapshot(txn)
        txn.execute("SELECT COUNT(*) FROM chat_messages")
        txn.fetchall()
        return bool(txn.connection.in_transaction)

    single = chat_pool(mysql_config, min=1, max=1)
    try:
        commits = await session_counter(single, "Com_commit")
        assert await single.runInteraction(snapshot_then_state) is True
        assert await session_counter(single, "Com_commit") == commits + 1
    finally:
        single.close()


@pytest_twisted.ensureDeferred
async def test_two_racing_sends_with_the_same_key_store_one_message_counted_once(
    counters: UnreadIndex, pool: adbapi.ConnectionPool
) -> None:
    # Four stores, as four instances: each stores its send at once in a pool thread of its
    # own (one store would queue the three later sends behind the first).
    instances = [dialogs_over(MessageStore(pool), counters) for _ in range(4)]
    for round_ in range(5):
        key = f"race-{round_}"
        results = await DeferredList(
            [started(dialogs.send(ALICE, BOB, f"race {round_}", key)) for dialogs in instances],
            fireOnOneErrback=True,
            consumeErrors=True,
        )
        outcomes = [result for _ok, result in results]
        assert sorted(created for _msg, created in outcomes) == [False, False, False, True]
        assert len({msg for msg, _created in outcomes}) == 1
    assert len(await rows(pool)) == 5
    assert await counters.counts(BOB) == {ALICE: 5}


def started(coroutine: Coroutine[Any, Any, T]) -> Deferred[T]:
    """Run *coroutine* now, as a Deferred (so that several run at once)."""
    return Deferred.fromCoroutine(coroutine)


# --- sends stored in batches ---------------------------------------------------------------


async def outcomes(sends: list[Deferred[tuple[Message, bool]]]) -> list[Any]:
    """What each send fired with: (message, created), or its exception."""
    results = await DeferredList(sends, consumeErrors=True)
    return [result if ok else result.value for ok, result in results]


@pytest_twisted.ensureDeferred
async def test_sends_that_queue_are_stored_together_by_one_statement(
    mysql_config: MySQLConfig,
) -> None:
    """A send that comes while none is stored is stored at once; the nine that come while it
    is stored wait, then go in by one statement (the session's ``Questions``, less what
    reading that counter costs), their ids in (sender, key) order."""
    pool = chat_pool(mysql_config, min=1, max=1)
    try:
        await apply_chat_schema(pool)  # when run alone
        store = MessageStore(pool)
        await store.send(ALICE, BOB, "warm the connection", "q-warm")
        statements = await counting_statements(pool)
        batches = store.batches
        keys = [f"q-{9 - i}" for i in range(10)]
        results = await outcomes([store.send(ALICE, BOB, f"to {key}", key) for key in keys])
        assert (store.batches - batches, await statements()) == (2, 2)
        assert [created for _message, created in results] == [True] * 10
        assert [message.text for message, _ in results] == [f"to {key}" for key in keys]
        stored = {row[0]: row[1:] for row in await rows(pool)}
        for key, (message, _created) in zip(keys, results, strict=True):
            assert stored[message.id] == (ALICE, BOB, f"to {key}", key)
        # q-9 went alone; then q-0 ... q-8 in key order
        by_id = [key for _id, (*_, key) in sorted(stored.items()) if key in keys]
        assert by_id == ["q-9", *(f"q-{i}" for i in range(9))]
    finally:
        pool.close()


@pytest_twisted.ensureDeferred
async def test_a_batch_calls_sends_are_stored_by_one_statement_and_each_counted_once(
    mysql_config: MySQLConfig, counters: UnreadIndex
) -> None:
    """``Dialogs.send_many`` (the chat's batch route): the sends go in together, by one
    batch even with none being stored before them; each outcome is its own (a
    replay, a reused key), and every stored one is counted unread in Redis once."""
    pool = chat_pool(mysql_config, min=1, max=1)
    try:
        await apply_chat_schema(pool)  # when run alone
        store = MessageStore(pool)
        dialogs = dialogs_over(store, counters)
        before, _ = await store.send(DAVE, CAROL, "before", "m-0")
        statements = await counting_statements(pool)
        batches = store.batches
        results = await dialogs.send_many(
            [
                (DAVE, ALICE, "one", "m-1"),
                (DAVE, BOB, "two", "m-2"),
                (DAVE, CAROL, "before", "m-0"),  # a replay
                (DAVE, ALICE, "other", "m-1"),  # m-1 reused for another message
            ],
            ["r-1", "r-2", "r-0", "r-3"],
        )
        # One batch: its INSERT meets m-0, a read answers it, and the INSERT goes again.
        assert (store.batches - batches, await statements()) == (1, 3)
        (one, one_new), (two, two_new), replayed, reused = results
        assert (one.text, one_new, two.text, two_new) == ("one", True, "two", True)
        assert replayed == (before, False)
        assert isinstance(reused, IdempotencyKeyReused)
        assert [row[1:] for row in await rows(pool) if row[1] == DAVE] == [
            (DAVE, CAROL, "before", "m-0"),
            (DAVE, ALICE, "one", "m-1"),
            (DAVE, BOB, "two", "m-2"),
        ]
        assert (await counters.counts(ALICE)).get(DAVE) == 1
        assert (await counters.counts(BOB)).get(DAVE) == 1
    finally:
        pool.close()


@pytest_twisted.ensureDeferred
async def test_a_key_twice_in_one_batch_is_stored_once_and_reused_only_fails_its_send(
    store: MessageStore, pool: adbapi.ConnectionPool
) -> None:
    blocker = store.send(ALICE, BOB, "stored alone", "b-0")
    batches = store.batches
    results = await outcomes(
        [
            store.send(ALICE, BOB, "twice", "b-1"),
            store.send(ALICE, BOB, "twice", "b-1"),  # a replay
            store.send(ALICE, CAROL, "twice", "b-1"),  # the key reused for another message
            store.send(BOB, ALICE, "twice", "b-1"),  # another sender's key
        ]
    )
    await blocker
    assert store.batches - batches == 1
    (message, created), replayed, reused, (others, others_created) = results
    assert (created, replayed) == (True, (message, False))
    assert isinstance(reused, IdempotencyKeyReused)
    assert others_created and others.sender_id == BOB
    assert [row[1:] for row in await rows(pool)] == [
        (ALICE, BOB, "stored alone", "b-0"),
        (ALICE, BOB, "twice", "b-1"),
        (BOB, ALICE, "twice", "b-1"),
    ]


@pytest_twisted.ensureDeferred
async def test_a_batch_that_meets_stored_keys_answers_them_and_inserts_the_rest(
    mysql_config: MySQLConfig,
) -> None:
    """A replay in a batch fails its multi-row INSERT, which then stored nothing: one locking
    read answers the keys stored before (the replay gets its message, a reused key fails),
    and one more INSERT stores the others: three statements, not one per send."""
    pool = chat_pool(mysql_config, min=1, max=1)
    try:
        await apply_chat_schema(pool)  # when run alone
        store = MessageStore(pool)
        original, _ = await store.send(ALICE, BOB, "original", "s-old")
        statements = await counting_statements(pool)
        blocker = store.send(ALICE, BOB, "stored alone", "s-alone")
        batches = store.batches
        results = await outcomes(
            [
                store.send(ALICE, BOB, "new 1", "s-new-1"),
                store.send(ALICE, BOB, "original", "s-old"),
                store.send(ALICE, BOB, "changed", "s-old"),
                store.send(ALICE, BOB, "new 2", "s-new-2"),
            ]
        )
        await blocker
        assert (store.batches - batches, await statements()) == (1, 1 + 3)
        new_1, replay, reused, new_2 = results
        assert (new_1[0].text, new_1[1], new_2[0].text, new_2[1]) == ("new 1", True, "new 2", True)
        assert replay == (original, False)
        assert isinstance(reused, IdempotencyKeyReused)
        assert sorted(row[3:] for row in await rows(pool) if row[4].startswith("s-")) == [
            ("new 1", "s-new-1"),
            ("new 2", "s-new-2"),
            ("original", "s-old"),
            ("stored alone", "s-alone"),
        ]
    finally:
        pool.close()


@pytest_twisted.ensureDeferred
async def test_a_row_mysql_refuses_fails_only_its_own_send(
    store: MessageStore, pool: adbapi.ConnectionPool
) -> None:
    """A text longer than the column fails the batch's statement, which stored nothing;
    each send is then stored by itself, and only that one fails."""
    blocker = store.send(ALICE, BOB, "stored alone", "r-alone")
    batches = store.batches
    results = await outcomes(
        [
            store.send(ALICE, BOB, "new 1", "r-new-1"),
            store.send(ALICE, BOB, "x" * 5000, "r-too-long"),
            store.send(ALICE, BOB, "new 2", "r-new-2"),
        ]
    )
    await blocker
    assert store.batches - batches == 1
    new_1, too_long, new_2 = results
    assert (new_1[0].text, new_1[1], new_2[0].text, new_2[1]) == ("new 1", True, "new 2", True)
    assert isinstance(too_long, pymysql.err.DataError)
    assert [row[3:] for row in await rows(pool)] == [
        ("stored alone", "r-alone"),
        ("new 1", "r-new-1"),
        ("new 2", "r-new-2"),
    ]


@pytest_twisted.ensureDeferred
async def test_two_batches_of_the_same_keys_in_opposite_orders_do_not_deadlock(
    mysql_config: MySQLConfig, pool: adbapi.ConnectionPool
) -> None:
    """A client's retry can reach another instance while its first try is still queued: two
    instances' batches then share keys. Each batch inserts in (sender, key) order, so they
    take their locks in one order; in their queue order, started together, InnoDB broke a
    deadlock between them in most rounds. Run here straight, without run_with_retry's retry
    of a deadlock, the two statements started at once on two connections."""
    other_pool = chat_pool(mysql_config, min=1, max=1)
    together = threading.Barrier(2, timeout=10)

    def at_once(txn: adbapi.Transaction, sends: list[_Send]) -> list[Any]:
        together.wait()
        return _send_batch(txn, sends)

    try:
        for round_ in range(20):
            sends = [_Send(ALICE, BOB, f"d{round_}-{i:02}", f"d{round_}-{i:02}") for i in range(50)]
            results = await gatherResults(
                [
                    pool.runInteraction(at_once, sends),
                    other_pool.runInteraction(at_once, sends[::-1]),
                ],
                consumeErrors=True,
            )
            outcomes_ = [outcome for batch in results for outcome in batch]
            assert not [outcome for outcome in outcomes_ if isinstance(outcome, Exception)]
            created = sorted(message.text for message, created in outcomes_ if created)
            assert created == [send.text for send in sends]
    finally:
        other_pool.close()


@pytest.mark.parametrize(("recipient", "text"), [(BOB, "changed"), (CAROL, "original")])
@pytest_twisted.ensureDeferred
async def test_a_key_reused_for_a_different_message_is_a_conflict(
    store: MessageStore, pool: adbapi.ConnectionPool, recipient: int, text: str
) -> None:
    stored, _ = await store.send(ALICE, BOB, "original", "k")
    with pytest.raises(IdempotencyKeyReused):
        await store.send(ALICE, recipient, text, "k")
    assert await rows(pool) == [(stored.id, ALICE, BOB, "original", "k")]


@pytest_twisted.ensureDeferred
async def test_keys_are_per_sender_and_case_sensitive(store: MessageStore) -> None:
    _, a = await store.send(ALICE, BOB, "x", "Key")
    _, b = await store.send(CAROL, BOB, "x", "Key")
    _, c = await store.send(ALICE, BOB, "x", "key")
    assert (a, b, c) == (True, True, True)


@pytest_twisted.ensureDeferred
async def test_the_longest_text_is_stored_exactly(store: MessageStore) -> None:
    text = "𝄞" * 4096  # four bytes each in UTF-8
    message, _ = await store.send(ALICE, BOB, text, "long")
    [listed] = await store.list_dialog(BOB, ALICE)
    assert listed.text == message.text == text


@pytest_twisted.ensureDeferred
async def test_when_redis_is_down_a_send_is_stored_and_its_counter_repaired_later(
    store: MessageStore, pool: adbapi.ConnectionPool
) -> None:
    """A committed message is never undone for a counter's sake: with Redis down the send
    succeeds within the counter timeout, and once Redis is back the repair makes the counter
    what MySQL says."""
    own_redis = Redis().start()
    client = redis_wire(RedisConfig.from_url(own_redis.url), reactor, timeout=1.0)
    try:
        counters = UnreadIndex(client)
        dialogs = dialogs_over(store, counters)
        await dialogs.send(ALICE, BOB, "before", "k0")
        own_redis.stop()
        began = time.monotonic()
        _message, created = await dialogs.send(ALICE, BOB, "while down", "k1")
        assert created
        assert time.monotonic() - began < 5
        assert [row[4] for row in await rows(pool)] == ["k0", "k1"]
        assert await dialogs.unread_counts(BOB) == {ALICE: 2}, "from MySQL meanwhile"

        # Back up, empty (Redis keeps nothing on disk): the repair of the marked dialog
        # counts both messages, the one it missed and the one it lost.
        own_redis.start()

        async def repaired() -> bool:
            await dialogs.repairs.repair_due()
            return await counters.counts(BOB) == {ALICE: 2}

        await eventually(lambda: Deferred.fromCoroutine(repaired()), 30, "the counter repaired")
    finally:
        await client.disconnect()
        own_redis.close()


# --- listing and reading --------------------------------------------------------------------


async def converse(store: MessageStore, count: int) -> list[Message]:
    sent = []
    for n in range(count):
        sender, recipient = (ALICE, BOB) if n % 3 else (BOB, ALICE)
        message, _ = await store.send(sender, recipient, f"m{n}", f"k{n}")
        sent.append(message)
    await store.send(ALICE, CAROL, "elsewhere", "c")
    await store.send(CAROL, BOB, "elsewhere", "c")
    return sent


@pytest_twisted.ensureDeferred
async def test_a_dialog_lists_oldest_first_from_either_side_in_pages(store: MessageStore) -> None:
    sent = await converse(store, 7)
    ids = [m.id for m in sent]
    assert [m.id for m in await store.list_dialog(ALICE, BOB)] == ids
    assert [m.id for m in await store.list_dialog(BOB, ALICE)] == ids
    page1 = await store.list_dialog(ALICE, BOB, limit=3)
    page2 = await store.list_dialog(ALICE, BOB, after_id=page1[-1].id, limit=3)
    page3 = await store.list_dialog(ALICE, BOB, after_id=page2[-1].id, limit=3)
    assert [m.id for m in page1 + page2 + page3] == ids
    assert len(page3) == 1
    assert await store.list_dialog(ALICE, BOB, after_id=ids[-1]) == []
    assert page1 == sent[:3]


@pytest_twisted.ensureDeferred
async def test_before_id_gives_the_page_just_before_oldest_first(store: MessageStore) -> None:
    sent = await converse(store, 7)
    ids = [m.id for m in sent]
    assert [m.id for m in await store.list_dialog(ALICE, BOB, before_id=ids[5], limit=2)] == (
        ids[3:5]
    )
    between = await store.list_dialog(ALICE, BOB, after_id=ids[1], before_id=ids[4])
    assert [m.id for m in between] == ids[2:4]


@pytest_twisted.ensureDeferred
async def test_a_read_mark_only_moves_forward(store: MessageStore) -> None:
    sent = await converse(store, 6)
    from_alice = [m for m in sent if m.sender_id == ALICE]
    assert (await store.unread_from_mysql(BOB))[BOB, ALICE] == len(from_alice)
    await store.mark_read(BOB, ALICE, from_alice[2].id)
    assert (await store.unread_from_mysql(BOB))[BOB, ALICE] == len(from_alice) - 3
    await store.mark_read(BOB, ALICE, from_alice[0].id)
    assert (await store.unread_from_mysql(BOB))[BOB, ALICE] == len(from_alice) - 3
    newest = await store.mark_dialog_read(BOB, ALICE)
    assert newest == sent[-1].id
    assert (BOB, ALICE) not in await store.unread_from_mysql(BOB)
    assert await store.mark_dialog_read(BOB, DAVE) is None


@pytest_twisted.ensureDeferred
async def test_reading_a_page_marks_the_whole_dialog_read_and_clears_the_counter(
    dialogs: Dialogs, store: MessageStore, counters: UnreadIndex
) -> None:
    for n in range(5):
        await dialogs.send(ALICE, BOB, f"m{n}", f"k{n}")
    await dialogs.send(CAROL, BOB, "other", "c")
    assert await counters.counts(BOB) == {ALICE: 5, CAROL: 1}
    page = await dialogs.read(BOB, ALICE, after_id=None, limit=2)
    assert [m.text for m in page] == ["m0", "m1"]
    assert await counters.counts(BOB) == {CAROL: 1}
    assert await store.unread_from_mysql(BOB) == {(BOB, CAROL): 1}


# --- unread counters ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_after_a_rebuild_redis_counts_equal_mysql_counts(
    dialogs: Dialogs, store: MessageStore, counters: UnreadIndex, redis: RedisPool
) -> None:
    pairs = [(ALICE, BOB), (BOB, ALICE), (CAROL, BOB), (ALICE, CAROL), (DAVE, ALICE)] * 3
    sent = [
        (await dialogs.send(sender, recipient, f"m{n}", f"k{n}"))[0]
        for n, (sender, recipient) in enumerate(pairs)
    ]
    await dialogs.read(ALICE, DAVE, after_id=None, limit=1)  # Alice has read Dave
    await dialogs.send(DAVE, ALICE, "after the read", "late")
    # The cache drifts: a lost count, and counts of messages of other dialogs.
    await redis.call("delete", unread_key(BOB, ALICE))
    await counters.counted(DAVE, CAROL, sent[0].id)
    await counters.counted(CAROL, DAVE, sent[1].id)
    readers = await dialogs.rebuild_unread()
    expected = await store.unread_from_mysql()
    assert readers == len({reader for reader, _peer in expected})
    for reader in (ALICE, BOB, CAROL, DAVE):
        mysql = {peer: n for (r, peer), n in expected.items() if r == reader}
        assert await counters.counts(reader) == mysql
    assert expected[ALICE, DAVE] == 1


# --- schema and connections -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_schema_applied_by_several_instances_at_once_works(mariadb: MariaDB) -> None:
    config = MySQLConfig.from_url(mariadb.create_database("chat_schema_race"))
    pools = [mysql_pool(config, min=1, max=2) for _ in range(4)]
    try:
        await gatherResults([apply_chat_schema(p) for p in pools], consumeErrors=True)
        await gatherResults(
            [apply_schema(p, schema_sql(), SCHEMA_LOCK) for p in pools], consumeErrors=True
        )
        tables = await pools[0].runQuery("SHOW TABLES")
        assert sorted(t[0] for t in tables) == [
            "chat_messages",
            "chat_reads",
            "chat_unread_repairs",
        ]
        message, created = await MessageStore(pools[1]).send(ALICE, BOB, "works", "k")
        assert created and message.id > 0
    finally:
        for p in pools:
            p.close()
        mariadb.drop_database("chat_schema_race")


@pytest_twisted.ensureDeferred
async def test_a_killed_connection_is_retried_once_transparently(
    mysql_config: MySQLConfig, mariadb: MariaDB
) -> None:
    pool = mysql_pool(mysql_config, min=1, max=1)

    def connection_id(txn: adbapi.Transaction) -> int:
        txn.execute("SELECT CONNECTION_ID()")
        return int(txn.fetchone()[0])

    def kill(thread_id: int) -> None:
        root = mariadb.connect()
        try:
            with root.cursor() as cursor:
                cursor.execute("KILL %s", (thread_id,))
        finally:
            root.close()

    try:
        first = await pool.runInteraction(connection_id)
        kill(first)
        # adbapi alone fails the call that finds the connection dead...
        with pytest.raises((pymysql.err.OperationalError, pymysql.err.InterfaceError)):
            await pool.runInteraction(connection_id)
        second = await pool.runInteraction(connection_id)
        kill(second)
        # ...run_with_retry runs it again on a fresh connection.
        third = await run_with_retry(pool, connection_id)
        assert third not in (first, second)
    finally:
        pool.close()


@pytest_twisted.ensureDeferred
async def test_when_every_pooled_connection_died_the_next_calls_still_succeed(
    mysql_config: MySQLConfig, mariadb: MariaDB
) -> None:
    """As after a MySQL restart or a network cut: every connection of the pool killed, the
    next ping (what /health does) and the next send succeed, each retried past the dead
    connections it meets (with one retry, the first two of four calls failed)."""
    pool = chat_pool(mysql_config, min=1, max=4)
    store = MessageStore(pool)

    def connection_id(txn: adbapi.Transaction) -> int:
        txn.execute("SELECT CONNECTION_ID(), SLEEP(0.05)")
        return int(txn.fetchone()[0])

    try:
        await apply_chat_schema(pool)
        ids = set(await gatherResults([pool.runInteraction(connection_id) for _ in range(4)]))
        assert len(ids) == 4  # four threads, four connections
        root = mariadb.connect()
        try:
            with root.cursor() as cursor:
                for thread_id in ids:
                    cursor.execute("KILL %s", (thread_id,))
        finally:
            root.close()
        assert await store.ping() is None
        message, created = await store.send(ALICE, BOB, "after the outage", "key-outage")
        assert created and message.text == "after the outage"
    finally:
        pool.close()


@pytest_twisted.ensureDeferred
async def test_ping_answers_when_mysql_does(store: MessageStore) -> None:
    assert await store.ping() is None
