"""Unread counters: derived from MySQL, kept in Redis, and repaired, never the other way round.

MySQL holds the truth: a message from *peer* to *reader* is unread while its id is above the
reader's read mark for that peer (``chat_reads``). Redis holds, per (reader, peer), the
*set* of unread message ids and the read mark, so that every update is idempotent and
order-free:

- counting a message (after its send) adds its id unless it is at or below the mark;
- reading moves the mark up (never down) and drops every id at or below it;
- a repair does both with what MySQL says for the pair.

Applied twice, late, or interleaved with other instances' updates, these give the same
counters as MySQL. So a send never needs to undo anything for a counter's sake: when Redis
fails or stalls after the message is committed, the pair is marked for repair in MySQL
(``chat_unread_repairs``) and :class:`UnreadRepairs`, which runs in every chat instance,
settles it from MySQL as soon as Redis answers again. A count is one ``ZCARD``; the memory is
one id per unread message.

Keys (one hash tag per reader, so a reader's keys stay together on a Redis cluster):
``snet:unread:{R}`` the set of peers with unread messages, ``snet:unread:{R}:P`` the sorted set
of unread ids from P, ``snet:read:{R}`` the hash of read marks {P: id}. Ids are compared as
Lua numbers: exact up to 2**53.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from attrs import define, field
from twisted.application.internet import TimerService
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from snet.rediswire import RedisWire, Script
from snet.storage import begin_snapshot, run_with_retry

log = Logger(namespace="snet.chat.unread")

_SETTLE = Script("""
local mark = tonumber(redis.call('HGET', KEYS[3], ARGV[1]) or '0')
local up_to = tonumber(ARGV[2])
if up_to > mark then
    redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
    mark = up_to
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', mark)
local known_up_to = tonumber(ARGV[3])
if known_up_to > mark then
    local given = {}
    for i = 4, #ARGV do given[ARGV[i]] = true end
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. mark, known_up_to)) do
        if not given[id] then redis.call('ZREM', KEYS[2], id) end
    end
end
for i = 4, #ARGV do
    if tonumber(ARGV[i]) > mark then
        redis.call('ZADD', KEYS[2], ARGV[i], ARGV[i])
    end
end
local count = redis.call('ZCARD', KEYS[2])
if count > 0 then
    redis.call('SADD', KEYS[1], ARGV[1])
else
    redis.call('SREM', KEYS[1], ARGV[1])
end
return count
""")
"""Raise the read mark of (reader, peer) to ARGV[2] and drop ids at or below the mark; if
ARGV[3] is above the mark, the ids ARGV[4:] are *all* the unread ones up to ARGV[3] (others in
that range go); add the ids ARGV[4:] that are above the mark. Answer the pair's count."""

_COUNTS = Script("""
local counts = {}
for _, peer in ipairs(redis.call('SMEMBERS', KEYS[1])) do
    local count = redis.call('ZCARD', ARGV[1] .. peer)
    if count > 0 then
        table.insert(counts, peer)
        table.insert(counts, count)
    end
end
return counts
""")
"""The reader's {peer: count} as a flat list, peers with nothing unread left out."""


def peers_key(reader_id: int) -> str:
    """The set of peers from whom *reader_id* has unread messages."""
    return f"snet:unread:{{{reader_id}}}"


def unread_key(reader_id: int, peer_id: int) -> str:
    """The sorted set of the ids of unread messages from *peer_id* to *reader_id*."""
    return f"{peers_key(reader_id)}:{peer_id}"


def marks_key(reader_id: int) -> str:
    """The hash {peer: read mark} of *reader_id*."""
    return f"snet:read:{{{reader_id}}}"


@define
class UnreadIndex:
    """The Redis side of the unread counters (see the module docstring)."""

    redis: RedisWire

    def settle(
        self,
        reader_id: int,
        peer_id: int,
        *,
        read_up_to: int = 0,
        unread: Iterable[int] = (),
        complete_up_to: int = 0,
    ) -> Deferred[int]:
        """Raise the pair's read mark to *read_up_to*, count the *unread* ids above the mark;
        with *complete_up_to*, *unread* are all the unread ids up to it, and any other id in
        that range is dropped (ids above it, newer than what the caller read from MySQL, stay).
        Fires with the pair's unread count. Idempotent and safe in any order."""
        args = [peer_id, read_up_to, complete_up_to, *(int(i) for i in unread)]
        keys = [peers_key(reader_id), unread_key(reader_id, peer_id), marks_key(reader_id)]
        d: Deferred[Any] = self.redis.eval(_SETTLE, keys, args)
        return d.addCallback(int)

    def counted(self, reader_id: int, peer_id: int, message_id: int) -> Deferred[int]:
        """Count message *message_id* from *peer_id* as unread by *reader_id*."""
        return self.settle(reader_id, peer_id, unread=(message_id,))

    def read(self, reader_id: int, peer_id: int, up_to_id: int) -> Deferred[int]:
        """*reader_id* has read the dialog with *peer_id* up to *up_to_id*."""
        return self.settle(reader_id, peer_id, read_up_to=up_to_id)

    def counts(self, reader_id: int) -> Deferred[dict[int, int]]:
        """{peer_id: unread count} of *reader_id*, positive counts only."""

        def parse(flat: Sequence[Any] | None) -> dict[int, int]:
            items = list(flat or ())
            return {int(items[i]): int(items[i + 1]) for i in range(0, len(items), 2)}

        prefix = unread_key(reader_id, 0)[:-1]
        d: Deferred[Any] = self.redis.eval(_COUNTS, [peers_key(reader_id)], [prefix])
        return d.addCallback(parse)

    async def pairs(self) -> list[tuple[int, int]]:
        """Every (reader, peer) Redis holds unread ids of (SCAN: Redis is never blocked)."""
        found: list[tuple[int, int]] = []
        cursor: bytes = b"0"
        while True:
            cursor, keys = await self.redis.call(
                "SCAN", cursor, "MATCH", "snet:unread:{*}", "COUNT", 1000
            )
            for key in keys:
                reader = _reader_of(key.decode())
                if reader is not None:
                    for peer in await self.redis.call("SMEMBERS", key):
                        found.append((reader, int(peer)))
            if cursor == b"0":
                return found


def _reader_of(key: str) -> int | None:
    """The reader of a peers-set key, or None if *key* is another key."""
    inner = key.removeprefix("snet:unread:{").removesuffix("}")
    return int(inner) if inner.isascii() and inner.isdigit() and key.endswith("}") else None


# --- MySQL: the pairs to repair and what MySQL says of them ---------------------------------


def _mark(txn: adbapi.Transaction, reader_id: int, peer_id: int) -> None:
    txn.execute(
        "INSERT INTO chat_unread_repairs (reader_id, peer_id) VALUES (%s, %s)",
        (reader_id, peer_id),
    )


def _pending(txn: adbapi.Transaction, limit: int) -> list[tuple[int, int, int]]:
    txn.execute(
        "SELECT id, reader_id, peer_id FROM chat_unread_repairs ORDER BY id LIMIT %s", (limit,)
    )
    return [(int(i), int(r), int(p)) for i, r, p in txn.fetchall()]


def _forget(txn: adbapi.Transaction, ids: Sequence[int]) -> None:
    placeholders = ", ".join(["%s"] * len(ids))
    txn.execute(f"DELETE FROM chat_unread_repairs WHERE id IN ({placeholders})", tuple(ids))  # noqa: S608 (placeholders only)


def _pair_state(txn: adbapi.Transaction, reader_id: int, peer_id: int) -> tuple[int, list[int]]:
    """(read mark, ids of unread messages) of one pair, as MySQL has them now (one snapshot:
    a mark that moves between the two reads cannot count a message it covers)."""
    begin_snapshot(txn)
    txn.execute(
        "SELECT last_read_id FROM chat_reads WHERE reader_id = %s AND peer_id = %s",
        (reader_id, peer_id),
    )
    row = txn.fetchone()
    mark = int(row[0]) if row else 0
    txn.execute(
        "SELECT id FROM chat_messages WHERE recipient_id = %s AND sender_id = %s AND id > %s",
        (reader_id, peer_id, mark),
    )
    return mark, [int(i) for (i,) in txn.fetchall()]


def _all_pairs(
    txn: adbapi.Transaction,
) -> tuple[dict[tuple[int, int], tuple[int, list[int]]], int]:
    """Every pair MySQL knows a read mark or an unread message of, {(reader, peer): (mark,
    unread ids)}, and the newest message id it had then (the snapshot's horizon)."""
    begin_snapshot(txn)
    txn.execute("SELECT COALESCE(MAX(id), 0) FROM chat_messages")
    (newest,) = txn.fetchone()
    state: dict[tuple[int, int], tuple[int, list[int]]] = {}
    txn.execute("SELECT reader_id, peer_id, last_read_id FROM chat_reads")
    for reader, peer, mark in txn.fetchall():
        state[(int(reader), int(peer))] = (int(mark), [])
    txn.execute(
        "SELECT m.recipient_id, m.sender_id, m.id FROM chat_messages AS m"
        " LEFT JOIN chat_reads AS r ON r.reader_id = m.recipient_id AND r.peer_id = m.sender_id"
        " WHERE m.id > COALESCE(r.last_read_id, 0)"
    )
    for reader, peer, message_id in txn.fetchall():
        if int(message_id) <= int(newest):
            state.setdefault((int(reader), int(peer)), (0, []))[1].append(int(message_id))
    return state, int(newest)


@define
class UnreadRepairs:
    """Pairs whose Redis counters may be wrong, and their repair from MySQL.

    ``mark`` records a pair in MySQL (kept in memory too while MySQL refuses); ``repair_due``
    settles every recorded pair from MySQL's state and forgets it once Redis took it. Run it
    every second or so (:meth:`service`); many instances may repair the same pair at once,
    since settling is idempotent.
    """

    pool: adbapi.ConnectionPool
    index: UnreadIndex
    batch: int = 200
    _unmarked: set[tuple[int, int]] = field(factory=set, init=False)
    _failing: bool = field(default=False, init=False)

    async def mark(self, reader_id: int, peer_id: int, *, request_id: str | None = None) -> None:
        """Record that (reader, peer)'s counter missed an update. Never raises."""
        try:
            await run_with_retry(self.pool, _mark, reader_id, peer_id)
        except Exception as e:
            self._unmarked.add((reader_id, peer_id))
            log.warn(
                "[{request_id}] could not record unread repair of {reader}/{peer} in MySQL"
                " ({error}); kept in memory",
                reader=reader_id,
                peer=peer_id,
                error=f"{type(e).__name__}: {e}",
                request_id=request_id,
            )

    async def repair_due(self) -> int:
        """Settle the recorded pairs from MySQL; the number repaired. Stops at the first
        Redis failure (the rest wait for the next run)."""
        for pair in list(self._unmarked):
            await run_with_retry(self.pool, _mark, *pair)
            self._unmarked.discard(pair)
        rows = await run_with_retry(self.pool, _pending, self.batch)
        ids_of: dict[tuple[int, int], list[int]] = defaultdict(list)
        for row_id, reader, peer in rows:
            ids_of[(reader, peer)].append(row_id)
        repaired = 0
        for (reader, peer), row_ids in ids_of.items():
            mark, unread = await run_with_retry(self.pool, _pair_state, reader, peer)
            try:
                await self.index.settle(reader, peer, read_up_to=mark, unread=unread)
            except Exception as e:
                if not self._failing:
                    log.warn(
                        "unread counters wait for Redis: {error}",
                        error=f"{type(e).__name__}: {e}",
                    )
                self._failing = True
                break
            await run_with_retry(self.pool, _forget, row_ids)
            repaired += 1
        if repaired and (self._failing or len(ids_of) == repaired):
            log.info("repaired the unread counters of {pairs} dialogs", pairs=repaired)
            self._failing = False
        return repaired

    async def rebuild_all(self) -> int:
        """Make every counter what MySQL says (an operator's full repair): the pairs MySQL
        knows of are settled as complete up to the newest message MySQL had, and pairs only
        Redis knows of lose what they hold up to it. Sends and reads meanwhile are kept. The
        number of readers with unread messages."""
        state, newest = await run_with_retry(self.pool, _all_pairs)
        for reader, peer in await self.index.pairs():
            state.setdefault((reader, peer), (0, []))
        readers: set[int] = set()
        for (reader, peer), (mark, unread) in state.items():
            count = await self.index.settle(
                reader, peer, read_up_to=mark, unread=unread, complete_up_to=newest
            )
            if count:
                readers.add(reader)
        return len(readers)

    def service(self, interval: float, clock: IReactorTime) -> TimerService:
        """A TimerService that runs ``repair_due`` every *interval* seconds."""
        service = TimerService(interval, self._run)
        service.clock = clock
        return service

    def _run(self) -> Deferred[None]:
        def failed(failure: Any) -> None:
            log.warn("unread repair round failed: {error}", error=failure.getErrorMessage())

        d = Deferred.fromCoroutine(self.repair_due())
        return d.addCallbacks(lambda _: None, failed)
