"""The chat service's data: messages and read marks in MySQL (the truth), and ``Dialogs``, the
operations that also keep the unread counters in Redis (``snet.chat.unread``) derived from it.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import pymysql
from attrs import define, field, frozen, validators
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from snet.chat.unread import UnreadIndex, UnreadRepairs
from snet.config import MySQLConfig
from snet.storage import mysql_pool, run_with_retry

log = Logger(namespace="snet.chat.store")

DUPLICATE_KEY = 1062


class IdempotencyKeyReused(Exception):
    """A send's idempotency key was used before for another recipient or text."""


@frozen
class Message:
    """One stored message. ``created_at`` is an aware UTC datetime (microseconds)."""

    id: int
    sender_id: int
    recipient_id: int
    text: str
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        """The message as the API shows it; ``created_at`` in ISO-8601 UTC with a ``Z``."""
        return {
            "id": self.id,
            "sender_id": self.sender_id,
            "recipient_id": self.recipient_id,
            "text": self.text,
            "created_at": self.created_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        }


def _message(row: tuple[Any, ...]) -> Message:
    """A Message from a row of (id, sender_id, recipient_id, text, created_at)."""
    id_, sender_id, recipient_id, text, created_at = row
    return Message(
        id=int(id_),
        sender_id=int(sender_id),
        recipient_id=int(recipient_id),
        text=str(text),
        created_at=created_at.replace(tzinfo=UTC),
    )


def _dialog(a: int, b: int) -> tuple[int, int]:
    return (a, b) if a <= b else (b, a)


_INSERT = (
    "INSERT INTO chat_messages (sender_id, recipient_id, dialog_low, dialog_high,"
    " text, idempotency_key, created_at)"
    " VALUES (%s, %s, %s, %s, %s, %s, UTC_TIMESTAMP(6))"
)
_INSERT_RETURNING = _INSERT + " RETURNING id, created_at"
"""The new row's own values only: the rest is what was sent (MariaDB in strict mode stores
a text as it is or refuses it), and every returned column costs the server and pymysql."""
_MESSAGE_COLUMNS = "id, sender_id, recipient_id, text, created_at"
"""A message's columns, in the order of ``_message``'s row."""
_SELECT = f"SELECT {_MESSAGE_COLUMNS} FROM chat_messages"  # noqa: S608 (constants only)


def _returning(txn: adbapi.Transaction) -> bool:
    """Whether the server can answer an INSERT with its row (MariaDB 10.5+; MySQL cannot)."""
    return "MariaDB" in str(getattr(txn.connection, "server_version", ""))


def _replay(
    stored: Message, recipient_id: int, text: str
) -> tuple[Message, bool] | IdempotencyKeyReused:
    """A send whose key was used before: the stored message if it is this one, else the
    error of a key reused for another message."""
    if stored.recipient_id != recipient_id or stored.text != text:
        return IdempotencyKeyReused("idempotency key reused with a different message")
    return stored, False


def _send(
    txn: adbapi.Transaction, sender_id: int, recipient_id: int, text: str, key: str
) -> tuple[Message, bool]:
    """Store a message: on MariaDB one ``INSERT ... RETURNING``; on MySQL the INSERT and a
    SELECT of the new row (on ``chat_pool``'s autocommit connections each commits by itself;
    on another pool adbapi's COMMIT follows)."""
    low, high = _dialog(sender_id, recipient_id)
    returning = _returning(txn)
    try:
        txn.execute(
            _INSERT_RETURNING if returning else _INSERT,
            (sender_id, recipient_id, low, high, text, key),
        )
    except pymysql.err.IntegrityError as e:
        if e.args[0] != DUPLICATE_KEY:
            raise
        # A locking read sees the latest committed row, whatever our snapshot. Messages are
        # never deleted, so the row that holds the key is there.
        txn.execute(
            _SELECT + " WHERE sender_id = %s AND idempotency_key = %s LOCK IN SHARE MODE",
            (sender_id, key),
        )
        replayed = _replay(_message(txn.fetchone()), recipient_id, text)
        if isinstance(replayed, IdempotencyKeyReused):
            raise replayed from None
        return replayed
    if not returning:
        txn.execute(_SELECT + " WHERE id = %s", (txn.lastrowid,))
        return _message(txn.fetchone()), True
    id_, created_at = txn.fetchone()
    return _message((id_, sender_id, recipient_id, text, created_at)), True


MAX_BATCH = 50
"""At most this many queued sends are stored by one statement (``MessageStore``)."""

STALLED = 1.0
"""Seconds after which a batch being stored counts as stalled (a statement takes about a
millisecond): while every batch in flight has run for longer, a send starts one more
(``MessageStore``)."""


@frozen
class _Send:
    """One send waiting in ``MessageStore``'s queue."""

    sender_id: int
    recipient_id: int
    text: str
    key: str

    @property
    def sender_key(self) -> tuple[int, str]:
        return (self.sender_id, self.key)


Outcome = tuple[Message, bool] | Exception
"""What became of one send of a batch: (message, created), or the error of that send only."""


def _send_one(txn: adbapi.Transaction, send: _Send) -> Outcome:
    try:
        return _send(txn, send.sender_id, send.recipient_id, send.text, send.key)
    except (IdempotencyKeyReused, pymysql.err.IntegrityError, pymysql.err.DataError) as e:
        return e


_COLUMNS = f"{_MESSAGE_COLUMNS}, idempotency_key"
_NEW_COLUMNS = "id, created_at, sender_id, idempotency_key"
"""What a batch's INSERT returns: the new rows' own values and their key (see
``_INSERT_RETURNING``)."""
_BATCH_ROW = "(%s, %s, %s, %s, %s, %s, UTC_TIMESTAMP(6))"
_BATCH_KEY = "(sender_id = %s AND idempotency_key = %s)"


@functools.lru_cache(maxsize=2 * MAX_BATCH)
def _batch_insert(rows: int) -> str:
    return (
        _INSERT.partition(" VALUES ")[0]
        + " VALUES "
        + ", ".join([_BATCH_ROW] * rows)
        + f" RETURNING {_NEW_COLUMNS}"
    )


@functools.lru_cache(maxsize=2 * MAX_BATCH)
def _batch_select(keys: int) -> str:
    # A locking read sees the latest committed rows, whatever the snapshot.
    where = " OR ".join([_BATCH_KEY] * keys)
    return f"SELECT {_COLUMNS} FROM chat_messages WHERE {where} LOCK IN SHARE MODE"  # noqa: S608 (placeholders only)


def _keyed(rows: Any) -> dict[tuple[int, str], Message]:
    """The stored messages of ``_batch_select``'s rows, by (sender, key)."""
    return {(int(row[1]), str(row[5])): _message(row[:5]) for row in rows}


def _new(rows: Any, sends: dict[tuple[int, str], _Send]) -> dict[tuple[int, str], Message]:
    """The messages of *sends* a batch's INSERT stored, from its rows (``_NEW_COLUMNS``)."""
    messages = {}
    for id_, created_at, sender_id, key in rows:
        send = sends[int(sender_id), str(key)]
        row = (id_, send.sender_id, send.recipient_id, send.text, created_at)
        messages[send.sender_key] = _message(row)
    return messages


INSERT_ATTEMPTS = 3
"""Multi-row INSERTs a batch tries before it stores its sends one by one: each attempt that
meets keys stored before (replays, or another instance's race) answers them and leaves them
out of the next one."""


def _send_batch(txn: adbapi.Transaction, sends: list[_Send]) -> list[Outcome]:
    """Store *sends* with one multi-row ``INSERT ... RETURNING``; one outcome per send, the
    same as if each had been stored by ``_send`` one after another.

    A key that comes twice in the batch is inserted once: its later sends are replays of
    the first, or reuse its key for another message. The rows go in in (sender, key) order,
    so that two instances' batches that share keys take their locks in the same order.

    A multi-row INSERT that fails stores nothing (it is one statement, in autocommit). If it
    failed on keys stored before, one locking read answers them, and the INSERT is tried
    again without them; after another kind of row error (a text MySQL refuses), or
    ``INSERT_ATTEMPTS`` attempts, each send left is stored by itself, so that only the send
    at fault fails. On MySQL (no RETURNING) each send is stored by itself.
    """
    if len(sends) == 1 or not _returning(txn):
        return [_send_one(txn, send) for send in sends]
    first: dict[tuple[int, str], _Send] = {}
    for send in sends:
        first.setdefault(send.sender_key, send)
    pending = sorted(first.values(), key=lambda send: send.sender_key)
    inserted: dict[tuple[int, str], Message] = {}
    stored_before: dict[tuple[int, str], Message] = {}
    for _ in range(INSERT_ATTEMPTS):
        params: list[object] = []
        for send in pending:
            low, high = _dialog(send.sender_id, send.recipient_id)
            params += (send.sender_id, send.recipient_id, low, high, send.text, send.key)
        try:
            txn.execute(_batch_insert(len(pending)), params)
        except pymysql.err.IntegrityError as e:
            if e.args[0] != DUPLICATE_KEY:
                break
            keys = [value for send in pending for value in send.sender_key]
            txn.execute(_batch_select(len(pending)), keys)
            found = _keyed(txn.fetchall())
            if not found:
                break
            stored_before.update(found)
            pending = [send for send in pending if send.sender_key not in found]
            if not pending:
                break
        except pymysql.err.DataError:
            break
        else:
            inserted = _new(txn.fetchall(), first)
            break
    outcomes: list[Outcome] = []
    for send in sends:
        message = inserted.get(send.sender_key) or stored_before.get(send.sender_key)
        if message is None:  # left after a row error: stored by itself
            outcomes.append(_send_one(txn, send))
        elif send.sender_key in inserted and first[send.sender_key] is send:
            outcomes.append((message, True))
        else:
            outcomes.append(_replay(message, send.recipient_id, send.text))
    return outcomes


MAX_MESSAGE_ID = 2**63 - 1

_PAGE = _SELECT + " WHERE dialog_low = %s AND dialog_high = %s AND id > %s AND id < %s"
_PAGE_OLDEST_FIRST = _PAGE + " ORDER BY id ASC LIMIT %s"
_PAGE_NEWEST_FIRST = _PAGE + " ORDER BY id DESC LIMIT %s"


def _list_dialog(
    txn: adbapi.Transaction,
    user_id: int,
    peer_id: int,
    after_id: int | None,
    before_id: int | None,
    limit: int,
) -> list[Message]:
    low, high = _dialog(user_id, peer_id)
    # Only before_id: the page just before it (newest first, then turned around).
    newest_first = before_id is not None and after_id is None
    txn.execute(
        _PAGE_NEWEST_FIRST if newest_first else _PAGE_OLDEST_FIRST,
        (low, high, after_id or 0, before_id or MAX_MESSAGE_ID, limit),
    )
    messages = [_message(row) for row in txn.fetchall()]
    if newest_first:
        messages.reverse()
    return messages


def _mark_read(txn: adbapi.Transaction, reader_id: int, peer_id: int, up_to_id: int) -> None:
    txn.execute(
        "INSERT INTO chat_reads (reader_id, peer_id, last_read_id) VALUES (%s, %s, %s)"
        " ON DUPLICATE KEY UPDATE last_read_id = GREATEST(last_read_id, %s)",
        (reader_id, peer_id, up_to_id, up_to_id),
    )


def _mark_dialog_read(txn: adbapi.Transaction, reader_id: int, peer_id: int) -> int | None:
    low, high = _dialog(reader_id, peer_id)
    txn.execute(
        "SELECT MAX(id) FROM chat_messages WHERE dialog_low = %s AND dialog_high = %s",
        (low, high),
    )
    (newest,) = txn.fetchone()
    if newest is None:
        return None
    _mark_read(txn, reader_id, peer_id, int(newest))
    return int(newest)


def _unread(txn: adbapi.Transaction, user_id: int | None) -> dict[tuple[int, int], int]:
    sql = (
        "SELECT m.recipient_id, m.sender_id, COUNT(*) FROM chat_messages AS m"
        " LEFT JOIN chat_reads AS r ON r.reader_id = m.recipient_id AND r.peer_id = m.sender_id"
        " WHERE m.id > COALESCE(r.last_read_id, 0)"
    )
    params: tuple[object, ...] = ()
    if user_id is not None:
        sql += " AND m.recipient_id = %s"
        params = (user_id,)
    sql += " GROUP BY m.recipient_id, m.sender_id"
    txn.execute(sql, params)
    return {(int(reader), int(peer)): int(count) for reader, peer, count in txn.fetchall()}


def _ping(txn: adbapi.Transaction) -> None:
    txn.execute("SELECT 1")
    txn.fetchall()


def chat_pool(config: MySQLConfig, **kwargs: Any) -> adbapi.ConnectionPool:
    """The chat service's MySQL pool (``snet.storage.mysql_pool``'s *kwargs*): in autocommit
    mode, so that a send, one ``INSERT ... RETURNING``, commits by itself and costs MariaDB
    one statement and the instance one round trip (a COMMIT after it was a second of each).
    Every write of this service is one statement; the reads that need one view of several
    tables (the counter repairs) open a snapshot (``snet.storage.begin_snapshot``)."""
    return mysql_pool(config, autocommit=True, **kwargs)


class _BatchCollector(Collector):
    def __init__(self, store: MessageStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        store = self._store
        yield CounterMetricFamily(
            "snet_chat_send_batches", "Batches of sends stored (one statement each)", store.batches
        )
        yield CounterMetricFamily(
            "snet_chat_batched_sends", "Sends stored in those batches", store.sends
        )
        yield GaugeMetricFamily(
            "snet_chat_sends_waiting", "Sends queued behind a batch being stored", store.waiting
        )


def _answer(
    sends: list[tuple[_Send, Deferred[tuple[Message, bool]]]], result: list[Outcome] | Failure
) -> None:
    """Fire each send's Deferred with its outcome in *result*, or with *result*'s failure."""
    for index, (_, d) in enumerate(sends):
        if d.called:  # cancelled by its caller
            continue
        outcome = result if isinstance(result, Failure) else result[index]
        if isinstance(outcome, Failure | Exception):
            d.errback(outcome)
        else:
            d.callback(outcome)


@define
class MessageStore:
    """Messages and read marks in MySQL, through the adbapi pool of ``chat_pool``; the tables
    are ``snet.chat.schema``'s.

    Sends are stored in batches, one at a time: a send that comes while none is being
    stored goes at once, by itself; the sends that come while one is being stored wait for
    it, and are then stored together, up to *max_batch* of them, by one multi-row statement
    in one pool thread (``_send_batch``). A saturated instance so spends one thread hand-off
    and one statement on several sends (docs/performance.md, step 7); two batches at a time
    gave back most of that. Concurrent sends have no order: a batch's ids follow its
    (sender, key) order.

    So that one stalled statement (a dead connection waits for its read timeout) does not
    hold every send of the instance, a send that comes while every batch in flight has run
    for longer than *stalled* seconds starts one more, on another pooled connection.

    Once the pool is closed (the instance is stopping), the sends still waiting fail with
    ``pymysql.err.InterfaceError`` (a 503): they were not stored.
    """

    pool: adbapi.ConnectionPool
    max_batch: int = field(default=MAX_BATCH, validator=validators.ge(1))
    stalled: float = STALLED
    now: Callable[[], float] = time.monotonic
    _queue: list[tuple[_Send, Deferred[tuple[Message, bool]]]] = field(factory=list, init=False)
    _storing: dict[int, float] = field(factory=dict, init=False)
    """When each batch being stored (by its number) started."""
    batches: int = field(default=0, init=False)
    """Batches stored so far (a batch of one included): with ``sends``, their mean size."""
    sends: int = field(default=0, init=False)

    @property
    def waiting(self) -> int:
        """Sends queued behind a batch being stored."""
        return len(self._queue)

    def track(self, registry: CollectorRegistry) -> None:
        """Report the batches in *registry*: ``snet_chat_send_batches_total`` and
        ``snet_chat_batched_sends_total`` (their ratio is the mean batch size), and
        ``snet_chat_sends_waiting``, the sends queued behind a batch now."""
        registry.register(_BatchCollector(self))

    def send(
        self, sender_id: int, recipient_id: int, text: str, idempotency_key: str
    ) -> Deferred[tuple[Message, bool]]:
        """Store a message once per (sender, key): fires with (message, True) when stored
        now, (stored message, False) when the key was used before for the same message.

        :raises IdempotencyKeyReused: if the key was used before for another recipient or
            text.
        """
        (stored,) = self.send_many([(sender_id, recipient_id, text, idempotency_key)])
        return stored

    def send_many(
        self, sends: Sequence[tuple[int, int, str, str]]
    ) -> list[Deferred[tuple[Message, bool]]]:
        """``send`` for each (sender, recipient, text, key) of *sends*, queued together: a
        batch call's sends (``Dialogs.send_many``) then go in one statement when no batch is
        being stored, instead of the first alone and the rest after it."""
        stored: list[Deferred[tuple[Message, bool]]] = []
        for sender_id, recipient_id, text, key in sends:
            d: Deferred[tuple[Message, bool]] = Deferred()
            self._queue.append((_Send(sender_id, recipient_id, text, key), d))
            stored.append(d)
        self._store_queued()
        return stored

    def _store_queued(self) -> None:
        threadpool = getattr(self.pool, "threadpool", None)
        if getattr(threadpool, "joined", False):  # closed: nothing would ever run
            waiting, self._queue = self._queue, []
            closed = Failure(pymysql.err.InterfaceError("the MySQL pool is closed"))  # type: ignore[no-untyped-call]
            _answer(waiting, closed)
            return
        while self._queue:
            now = self.now()
            if self._storing and max(self._storing.values()) > now - self.stalled:
                return  # a batch is being stored, and not stalled: wait for it
            batch = self._queue[: self.max_batch]
            del self._queue[: self.max_batch]
            self.batches += 1
            self.sends += len(batch)
            number = self.batches
            self._storing[number] = now
            stored = maybeDeferred(run_with_retry, self.pool, _send_batch, [s for s, _ in batch])
            stored.addBoth(self._stored, number, batch)

    def _stored(
        self,
        result: list[Outcome] | Failure,
        number: int,
        batch: list[tuple[_Send, Deferred[tuple[Message, bool]]]],
    ) -> None:
        # The next batch starts before this one's callers go on, so that it holds only the
        # sends that came while this one was stored.
        del self._storing[number]
        self._store_queued()
        _answer(batch, result)

    def list_dialog(
        self,
        user_id: int,
        peer_id: int,
        *,
        after_id: int | None = None,
        before_id: int | None = None,
        limit: int = 50,
    ) -> Deferred[list[Message]]:
        """Up to *limit* messages of the dialog between the two users, oldest first: the
        first ones after *after_id* (or from the start), or with only *before_id* the last
        ones before it."""
        return run_with_retry(self.pool, _list_dialog, user_id, peer_id, after_id, before_id, limit)

    def mark_read(self, reader_id: int, peer_id: int, up_to_id: int) -> Deferred[None]:
        """Record that *reader_id* has read the dialog with *peer_id* up to *up_to_id*; a
        read mark never moves back."""
        return run_with_retry(self.pool, _mark_read, reader_id, peer_id, up_to_id)

    def mark_dialog_read(self, reader_id: int, peer_id: int) -> Deferred[int | None]:
        """Mark the whole dialog read up to its newest message; fires with that message's
        id (None for an empty dialog)."""
        return run_with_retry(self.pool, _mark_dialog_read, reader_id, peer_id)

    def unread_from_mysql(self, user_id: int | None = None) -> Deferred[dict[tuple[int, int], int]]:
        """Unread counts as MySQL knows them: {(reader, peer): messages from peer to reader
        above reader's read mark}, for one reader or for everyone. Zero counts are absent."""
        return run_with_retry(self.pool, _unread, user_id)

    def ping(self) -> Deferred[None]:
        """``SELECT 1``: fires when MySQL answers."""
        return run_with_retry(self.pool, _ping)


COUNTER_TIMEOUT = 0.5
"""Seconds a send or a read waits for Redis to update a counter before it leaves the update
to the repairs: Redis answers in well under a millisecond, and a stalled Redis must not hold
a send that MySQL has committed."""


@define
class Dialogs:
    """The dialog operations that touch both MySQL and Redis, and the rule that keeps them
    consistent: MySQL is the truth, the counters in Redis are derived from it.

    A send is done when MySQL has committed it: then the recipient's counter is updated, and
    if Redis fails or takes longer than *counter_timeout*, the dialog is marked for repair
    (``snet.chat.unread``) and the send still succeeds. Nothing committed is ever undone for
    a counter's sake. A replayed send updates the counter too (counting is idempotent), which
    repairs a count that an earlier attempt missed.
    """

    messages: MessageStore
    unread: UnreadIndex
    repairs: UnreadRepairs
    clock: IReactorTime
    counter_timeout: float = COUNTER_TIMEOUT

    async def send(
        self,
        sender_id: int,
        recipient_id: int,
        text: str,
        idempotency_key: str,
        *,
        request_id: str | None = None,
    ) -> tuple[Message, bool]:
        """Send a message; (message, created).

        :raises IdempotencyKeyReused: the key was used for another message.
        """
        message, created = await self.messages.send(sender_id, recipient_id, text, idempotency_key)
        await self._update(
            self.unread.counted(recipient_id, sender_id, message.id),
            recipient_id,
            sender_id,
            request_id,
        )
        return message, created

    async def send_many(
        self, sends: Sequence[tuple[int, int, str, str]], request_ids: Sequence[str | None]
    ) -> list[tuple[Message, bool] | Exception]:
        """``send`` for each (sender, recipient, text, key) of *sends*: stored together (see
        ``MessageStore.send_many``), their counters updated together. One outcome per send,
        in order: (message, created), or the exception that send raised (``send``'s, or
        the store's: MySQL away fails every send of its batch, and none of them is stored).
        """
        stored = self.messages.send_many(sends)
        outcomes: list[tuple[Message, bool] | Exception] = []
        for d in stored:
            try:
                outcomes.append(await d)
            except Exception as e:
                outcomes.append(e)
        updates = [
            Deferred.fromCoroutine(
                self._update(
                    self.unread.counted(recipient_id, sender_id, outcome[0].id),
                    recipient_id,
                    sender_id,
                    request_id,
                )
            )
            for (sender_id, recipient_id, _, _), outcome, request_id in zip(
                sends, outcomes, request_ids, strict=True
            )
            if isinstance(outcome, tuple)
        ]
        for update in updates:
            await update
        return outcomes

    async def read(
        self,
        reader_id: int,
        peer_id: int,
        *,
        after_id: int | None,
        limit: int,
        request_id: str | None = None,
    ) -> list[Message]:
        """A page of the dialog (oldest first); the whole dialog counts as read afterwards:
        the read mark moves to its newest message and the reader's counter for it follows.
        """
        page = await self.messages.list_dialog(reader_id, peer_id, after_id=after_id, limit=limit)
        newest = await self.messages.mark_dialog_read(reader_id, peer_id)
        if newest is not None:
            await self._update(
                self.unread.read(reader_id, peer_id, newest), reader_id, peer_id, request_id
            )
        return page

    async def _update(
        self, update: Deferred[int], reader_id: int, peer_id: int, request_id: str | None
    ) -> None:
        """Wait for a counter *update*; if it fails or is slow, mark the pair for repair."""
        try:
            await update.addTimeout(self.counter_timeout, self.clock)
        except Exception as e:
            log.warn(
                "[{request_id}] unread counter of {reader}/{peer} not updated ({error});"
                " marked for repair",
                reader=reader_id,
                peer=peer_id,
                error=f"{type(e).__name__}: {e}" if str(e) else type(e).__name__,
                request_id=request_id,
            )
            await self.repairs.mark(reader_id, peer_id, request_id=request_id)

    async def unread_counts(
        self, reader_id: int, *, request_id: str | None = None
    ) -> dict[int, int]:
        """{peer_id: unread count} of *reader_id*: from Redis, or from MySQL while Redis
        fails (slower, but never wrong)."""
        try:
            return await self.unread.counts(reader_id).addTimeout(self.counter_timeout, self.clock)
        except Exception as e:
            log.warn(
                "[{request_id}] unread counts from MySQL: Redis failed ({error})",
                error=f"{type(e).__name__}: {e}" if str(e) else type(e).__name__,
                request_id=request_id,
            )
        counts = await self.messages.unread_from_mysql(reader_id)
        return {peer: count for (_reader, peer), count in counts.items()}

    async def rebuild_unread(self) -> int:
        """Make every counter what MySQL says; the number of readers with unread messages."""
        readers = await self.repairs.rebuild_all()
        log.info("unread counters rebuilt for {readers} readers", readers=readers)
        return readers
