"""The chat service's data: messages and read marks in MySQL (the truth), unread counters in
Redis (a cache, always rebuildable from MySQL), and ``Dialogs``, the operations that touch
both and keep them consistent.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pymysql
from attrs import define, frozen
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from snet.storage import RedisPool, is_unavailable, run_with_retry

log = Logger(namespace="snet.chat.store")

DUPLICATE_KEY = 1062


class IdempotencyKeyReused(Exception):
    """A send's idempotency key was used before for another recipient or text."""


class UnreadUnavailable(Exception):
    """Redis could not count a new message as unread, so the message was removed again:
    nothing is stored, and the same send may be retried with the same key."""


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


def _send(
    txn: adbapi.Transaction, sender_id: int, recipient_id: int, text: str, key: str
) -> tuple[Message, bool]:
    low, high = _dialog(sender_id, recipient_id)
    # A stored message may vanish between our failed INSERT and our SELECT (a compensating
    # delete): then the key is free again, and the INSERT is tried once more.
    for _attempt in range(3):
        try:
            txn.execute(
                "INSERT INTO chat_messages (sender_id, recipient_id, dialog_low, dialog_high,"
                " text, idempotency_key, created_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, UTC_TIMESTAMP(6))",
                (sender_id, recipient_id, low, high, text, key),
            )
        except pymysql.err.IntegrityError as e:
            if e.args[0] != DUPLICATE_KEY:
                raise
            # A locking read sees the latest committed row, whatever our snapshot.
            txn.execute(
                "SELECT id, sender_id, recipient_id, text, created_at FROM chat_messages"
                " WHERE sender_id = %s AND idempotency_key = %s LOCK IN SHARE MODE",
                (sender_id, key),
            )
            row = txn.fetchone()
            if row is None:
                continue
            stored = _message(row)
            if stored.recipient_id != recipient_id or stored.text != text:
                raise IdempotencyKeyReused(
                    "idempotency key reused with a different message"
                ) from None
            return stored, False
        message_id = txn.lastrowid
        txn.execute(
            "SELECT id, sender_id, recipient_id, text, created_at FROM chat_messages WHERE id = %s",
            (message_id,),
        )
        return _message(txn.fetchone()), True
    raise RuntimeError(f"could not store or find the message of sender {sender_id} key {key!r}")


MAX_MESSAGE_ID = 2**63 - 1

_PAGE = (
    "SELECT id, sender_id, recipient_id, text, created_at FROM chat_messages"
    " WHERE dialog_low = %s AND dialog_high = %s AND id > %s AND id < %s"
)
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


def _delete(txn: adbapi.Transaction, message_id: int) -> None:
    txn.execute("DELETE FROM chat_messages WHERE id = %s", (message_id,))


def _ping(txn: adbapi.Transaction) -> None:
    txn.execute("SELECT 1")
    txn.fetchall()


@define
class MessageStore:
    """Messages and read marks in MySQL, through an adbapi pool (see snet.storage); the tables
    are ``snet.chat.schema``'s."""

    pool: adbapi.ConnectionPool

    def send(
        self, sender_id: int, recipient_id: int, text: str, idempotency_key: str
    ) -> Deferred[tuple[Message, bool]]:
        """Store a message once per (sender, key): fires with (message, True) when stored
        now, (stored message, False) when the key was used before for the same message.

        :raises IdempotencyKeyReused: if the key was used before for another recipient or
            text.
        """
        return run_with_retry(self.pool, _send, sender_id, recipient_id, text, idempotency_key)

    def delete(self, message_id: int) -> Deferred[None]:
        """Remove a message (the compensation of a send that could not be completed)."""
        return run_with_retry(self.pool, _delete, message_id)

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


UNREAD_KEY = "snet:unread:{reader_id}"

_REPLACE_HASH = """
redis.call('DEL', KEYS[1])
for i = 1, #ARGV, 2 do
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
end
return #ARGV / 2
"""


def _unread_key(reader_id: int) -> str:
    return UNREAD_KEY.format(reader_id=reader_id)


@define
class UnreadCounters:
    """Unread counts in Redis: hash ``snet:unread:{reader_id}``, field ``{peer_id}`` -> count.

    A cache of what MySQL says (``MessageStore.unread_from_mysql``): ``replace_all`` rebuilds it.
    """

    redis: RedisPool

    def bump(self, reader_id: int, peer_id: int) -> Deferred[int]:
        """Count one more unread message from *peer_id*; fires with the new count."""
        d: Deferred[Any] = self.redis.call("hincrby", _unread_key(reader_id), str(peer_id), 1)
        return d.addCallback(int)

    def clear(self, reader_id: int, peer_id: int) -> Deferred[None]:
        """Nothing unread from *peer_id* any more."""
        d: Deferred[Any] = self.redis.call("hdel", _unread_key(reader_id), str(peer_id))
        return d.addCallback(lambda _: None)

    def counts(self, reader_id: int) -> Deferred[dict[int, int]]:
        """{peer_id: unread count} of *reader_id*, positive counts only."""

        def parse(raw: dict[Any, Any] | None) -> dict[int, int]:
            counts = {int(peer): int(count) for peer, count in (raw or {}).items()}
            return {peer: count for peer, count in counts.items() if count > 0}

        d: Deferred[Any] = self.redis.call("hgetall", _unread_key(reader_id))
        return d.addCallback(parse)

    def replace_all(self, counts: Mapping[tuple[int, int], int]) -> Deferred[int]:
        """Make the counters exactly *counts* ({(reader, peer): count}): each reader's hash
        is replaced atomically (one Lua script), and the hashes of readers absent from
        *counts* are removed. Returns the number of readers with unread messages.

        Bumps that land while this runs may be lost or counted twice: rebuilds are rare,
        operator-driven repairs.
        """
        return Deferred.fromCoroutine(self._replace_all(counts))

    async def _replace_all(self, counts: Mapping[tuple[int, int], int]) -> int:
        per_reader: dict[int, dict[int, int]] = defaultdict(dict)
        for (reader, peer), count in counts.items():
            if count > 0:
                per_reader[reader][peer] = count
        for reader, peers in per_reader.items():
            args: list[object] = []
            for peer, count in sorted(peers.items()):
                args += [str(peer), count]
            await self.redis.call("eval", _REPLACE_HASH, [_unread_key(reader)], args)
        stale = [key for key in await self._all_keys() if _reader_of(key) not in per_reader]
        for start in range(0, len(stale), 500):
            await self.redis.call("delete", stale[start : start + 500])
        return len(per_reader)

    async def _all_keys(self) -> list[str]:
        """Every counter hash's key (SCAN, so Redis is never blocked)."""
        pattern = UNREAD_KEY.format(reader_id="*")
        keys: list[str] = []
        cursor: Any = 0
        while True:
            cursor, batch = await self.redis.call("scan", cursor, pattern, 1000)
            keys += [str(key) for key in batch if _reader_of(str(key)) is not None]
            if int(cursor) == 0:
                return keys


def _reader_of(key: str) -> int | None:
    """The reader id of a counter key, or None if *key* is not one."""
    prefix = UNREAD_KEY.format(reader_id="")
    suffix = key[len(prefix) :] if key.startswith(prefix) else ""
    return int(suffix) if suffix.isascii() and suffix.isdigit() else None


@define
class Dialogs:
    """The dialog operations that touch both MySQL and Redis, and the rules that keep them
    consistent.

    A send stores the message in MySQL first, then bumps the recipient's counter (only when
    the message is new). If the bump fails the message is deleted again, so that nothing is
    half-written and the client, told 503, can retry with the same key.
    """

    messages: MessageStore
    unread: UnreadCounters

    async def send(
        self,
        sender_id: int,
        recipient_id: int,
        text: str,
        idempotency_key: str,
        *,
        request_id: str | None = None,
    ) -> tuple[Message, bool]:
        """Send a message; (message, created). A replay of a stored key bumps nothing.

        :raises IdempotencyKeyReused: the key was used for another message.
        :raises UnreadUnavailable: Redis could not bump the counter (the message was
            removed).
        """
        message, created = await self.messages.send(sender_id, recipient_id, text, idempotency_key)
        if not created:
            return message, False
        try:
            await self.unread.bump(recipient_id, sender_id)
        except Exception as e:
            log.warn(
                "[{request_id}] unread bump failed, removing message {message_id}: {error}",
                message_id=message.id,
                error=f"{type(e).__name__}: {e}",
                request_id=request_id,
            )
            try:
                await self.messages.delete(message.id)
            except Exception:
                log.failure(
                    "[{request_id}] compensation failed: message {message_id} is stored"
                    " without its unread count (a rebuild repairs it)",
                    message_id=message.id,
                    request_id=request_id,
                )
            if is_unavailable(e):
                raise UnreadUnavailable(
                    "the message could not be counted as unread and was not stored;"
                    " retry with the same Idempotency-Key"
                ) from e
            raise
        return message, True

    async def read(
        self, reader_id: int, peer_id: int, *, after_id: int | None, limit: int
    ) -> list[Message]:
        """A page of the dialog (oldest first); the whole dialog counts as read afterwards:
        the read mark moves to its newest message and the reader's counter for it is cleared.
        """
        page = await self.messages.list_dialog(reader_id, peer_id, after_id=after_id, limit=limit)
        await self.messages.mark_dialog_read(reader_id, peer_id)
        await self.unread.clear(reader_id, peer_id)
        return page

    async def unread_counts(self, reader_id: int) -> dict[int, int]:
        """{peer_id: unread count} of *reader_id*, from Redis."""
        return await self.unread.counts(reader_id)

    async def rebuild_unread(self) -> int:
        """Recompute every counter from MySQL into Redis; the number of readers with unread
        messages."""
        counts = await self.messages.unread_from_mysql()
        readers = await self.unread.replace_all(counts)
        log.info("unread counters rebuilt for {readers} readers", readers=readers)
        return readers
