"""Unread counters against a real Redis and MariaDB: every update is idempotent and order-free,
so late, repeated and interleaved updates and repairs all end where MySQL says."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from twisted.enterprise import adbapi

from snet.chat.schema import apply_chat_schema
from snet.chat.unread import UnreadIndex, UnreadRepairs
from snet.config import MySQLConfig
from snet.rediswire import RedisWire
from snet.storage import mysql_pool
from snet.testing.servers import MariaDB

pytestmark = pytest.mark.integration

REDIS_DB = 11
"""A Redis database of this module's own on the shared server."""

READER, PEER, OTHER = 7, 8, 9


@pytest.fixture(scope="module")
def mysql_config(mariadb: MariaDB) -> MySQLConfig:
    return MySQLConfig.from_url(mariadb.create_database("unread_test"))


@pytest_twisted.async_yield_fixture
async def pool(mysql_config: MySQLConfig) -> AsyncIterator[adbapi.ConnectionPool]:
    pool = mysql_pool(mysql_config, min=1, max=4)
    try:
        await apply_chat_schema(pool)
        for table in ("chat_messages", "chat_reads", "chat_unread_repairs"):
            await pool.runOperation(f"DELETE FROM {table}")
        yield pool
    finally:
        pool.close()


@pytest.fixture
def index(chat_redis: RedisWire) -> UnreadIndex:
    return UnreadIndex(chat_redis)


@pytest_twisted.ensureDeferred
async def test_counting_the_same_message_twice_counts_it_once(index: UnreadIndex) -> None:
    assert await index.counted(READER, PEER, 5) == 1
    assert await index.counted(READER, PEER, 5) == 1
    assert await index.counted(READER, PEER, 6) == 2
    assert await index.counts(READER) == {PEER: 2}


@pytest_twisted.ensureDeferred
async def test_a_late_count_of_a_message_already_read_is_ignored(index: UnreadIndex) -> None:
    await index.counted(READER, PEER, 5)
    assert await index.read(READER, PEER, 6) == 0
    assert await index.counted(READER, PEER, 6) == 0, "read before it was counted"
    assert await index.counted(READER, PEER, 7) == 1
    assert await index.counts(READER) == {PEER: 1}


@pytest_twisted.ensureDeferred
async def test_a_read_mark_never_moves_back(index: UnreadIndex) -> None:
    await index.read(READER, PEER, 10)
    await index.read(READER, PEER, 3)
    assert await index.counted(READER, PEER, 9) == 0
    assert await index.counts(READER) == {}


@pytest_twisted.ensureDeferred
async def test_counts_list_only_peers_with_unread_messages(index: UnreadIndex) -> None:
    await index.counted(READER, PEER, 1)
    await index.counted(READER, OTHER, 2)
    await index.counted(READER, OTHER, 3)
    await index.read(READER, PEER, 1)
    assert await index.counts(READER) == {OTHER: 2}
    assert await index.counts(OTHER) == {}


UPDATES = [("count", 1), ("count", 2), ("count", 3), ("read", 2), ("count", 4), ("count", 2)]


@pytest_twisted.ensureDeferred
async def test_any_order_of_updates_gives_the_count_mysql_would(index: UnreadIndex) -> None:
    """Messages 1-4, read up to 2, one count repeated: whatever the order the updates arrive
    in (one instance slow, another retrying, a repair), two messages are unread. Every 7th of
    the 720 orders is tried, each for a reader of its own."""
    orders = list(itertools.permutations(UPDATES))[::7]
    for reader, order in enumerate(orders, start=1000):
        for kind, value in order:
            if kind == "count":
                await index.counted(reader, PEER, value)
            else:
                await index.read(reader, PEER, value)
        assert await index.counts(reader) == {PEER: 2}, order


async def _message(pool: adbapi.ConnectionPool, sender: int, recipient: int, key: str) -> int:
    low, high = min(sender, recipient), max(sender, recipient)
    rows = await pool.runInteraction(
        lambda txn: (
            txn.execute(
                "INSERT INTO chat_messages (sender_id, recipient_id, dialog_low, dialog_high,"
                " text, idempotency_key, created_at) VALUES (%s, %s, %s, %s, 'hi', %s,"
                " UTC_TIMESTAMP(6))",
                (sender, recipient, low, high, key),
            ),
            txn.lastrowid,
        )
    )
    return int(rows[1])


@pytest_twisted.ensureDeferred
async def test_a_marked_pair_is_settled_from_mysql_and_forgotten(
    pool: adbapi.ConnectionPool, index: UnreadIndex
) -> None:
    """Redis missed two counts and kept a count of a message MySQL says is read: the repair
    makes Redis say what MySQL says, and the repair row is gone."""
    first = await _message(pool, PEER, READER, "a")
    second = await _message(pool, PEER, READER, "b")
    third = await _message(pool, PEER, READER, "c")
    await pool.runOperation(
        "INSERT INTO chat_reads (reader_id, peer_id, last_read_id) VALUES (%s, %s, %s)",
        (READER, PEER, first),
    )
    await index.counted(READER, PEER, first)  # stale: MySQL has it read
    repairs = UnreadRepairs(pool, index)
    await repairs.mark(READER, PEER)
    await repairs.mark(READER, PEER)

    assert await repairs.repair_due() == 1
    assert await index.counts(READER) == {PEER: 2}
    assert await index.counted(READER, PEER, second) == 2, "already counted by the repair"
    assert await index.counted(READER, PEER, third) == 2
    assert list(await pool.runQuery("SELECT COUNT(*) FROM chat_unread_repairs")) == [(0,)]
    assert await repairs.repair_due() == 0


@pytest_twisted.ensureDeferred
async def test_rebuild_all_makes_every_counter_what_mysql_says(
    pool: adbapi.ConnectionPool, index: UnreadIndex
) -> None:
    await _message(pool, PEER, READER, "a")
    read = await _message(pool, OTHER, READER, "b")
    await _message(pool, READER, PEER, "c")
    await pool.runOperation(
        "INSERT INTO chat_reads (reader_id, peer_id, last_read_id) VALUES (%s, %s, %s)",
        (READER, OTHER, read),
    )
    await index.counted(READER, OTHER, read)  # stale

    assert await UnreadRepairs(pool, index).rebuild_all() == 2
    assert await index.counts(READER) == {PEER: 1}
    assert await index.counts(PEER) == {READER: 1}


@pytest_twisted.ensureDeferred
async def test_a_complete_settle_drops_unknown_ids_up_to_its_horizon_and_keeps_newer_ones(
    index: UnreadIndex,
) -> None:
    """A rebuild read MySQL up to message 10: ids up to 10 that MySQL does not list go, a
    message counted meanwhile (11) stays."""
    for message_id in (3, 4, 11):
        await index.counted(READER, PEER, message_id)
    assert await index.settle(READER, PEER, unread=[4, 5], complete_up_to=10) == 3
    await index.read(READER, PEER, 4)
    assert await index.counts(READER) == {PEER: 2}
