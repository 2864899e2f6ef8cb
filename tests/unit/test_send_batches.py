"""Unit tests of how ``snet.chat.store.MessageStore`` queues sends into batches: one batch at
a time (one more while every batch in flight is stalled), at most ``max_batch`` sends each,
every send answered with its own outcome or its batch's failure. The pool is a fake that only
records each interaction and lets the test answer it; what a batch does in MySQL is tested
against MariaDB in tests/integration/test_chat_store.py."""

from __future__ import annotations

from datetime import UTC, datetime
from types import SimpleNamespace
from typing import Any, cast

import pymysql
import pytest
from prometheus_client import CollectorRegistry
from twisted.enterprise import adbapi
from twisted.internet.defer import CancelledError, Deferred

from snet.chat.store import IdempotencyKeyReused, Message, MessageStore
from snet.storage import is_unavailable
from snet.testing import failure_of, result_of

ALICE, BOB = 1, 2


class AnsweredByHand:
    """A pool whose interactions wait until the test answers them, in the order they came."""

    max = 4

    def __init__(self) -> None:
        self.waiting: list[Deferred[Any]] = []
        self.threadpool = SimpleNamespace(joined=False)

    def runInteraction(self, interaction: Any, *args: Any, **kwargs: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.waiting.append(d)
        return d

    def answer(self, result: object) -> None:
        d = self.waiting.pop(0)
        if isinstance(result, Exception):
            d.errback(result)
        else:
            d.callback(result)


def message(number: int) -> Message:
    return Message(number, ALICE, BOB, f"m{number}", datetime(2026, 12, 6, tzinfo=UTC))


def stored(*numbers: int) -> list[tuple[Message, bool]]:
    return [(message(n), True) for n in numbers]


@pytest.fixture
def pool() -> AnsweredByHand:
    return AnsweredByHand()


@pytest.fixture
def store(pool: AnsweredByHand) -> MessageStore:
    return MessageStore(cast(adbapi.ConnectionPool, pool), max_batch=3)


def send(store: MessageStore, number: int) -> Deferred[tuple[Message, bool]]:
    return store.send(ALICE, BOB, f"m{number}", f"key-{number}")


def test_sends_that_come_while_a_batch_is_stored_wait_and_go_in_batches_of_at_most_max(
    store: MessageStore, pool: AnsweredByHand
) -> None:
    sends = [send(store, n) for n in range(8)]
    assert len(pool.waiting) == 1  # the first alone; seven wait
    assert not sends[1].called
    pool.answer(stored(0))
    assert result_of(sends[0]) == (message(0), True)
    assert (store.batches, store.sends, len(pool.waiting)) == (2, 4, 1)
    pool.answer(stored(1, 2, 3))
    assert [result_of(d) for d in sends[1:4]] == stored(1, 2, 3)
    pool.answer(stored(4, 5, 6))
    pool.answer(stored(7))
    assert [result_of(d) for d in sends[4:]] == stored(4, 5, 6, 7)
    assert (store.batches, store.sends, pool.waiting) == (4, 8, [])
    assert not send(store, 8).called
    assert len(pool.waiting) == 1  # nothing was stored meanwhile: the send went at once


def test_each_send_of_a_batch_gets_its_own_outcome(
    store: MessageStore, pool: AnsweredByHand
) -> None:
    first = send(store, 0)
    sends = [send(store, n) for n in (1, 2, 3)]
    pool.answer(stored(0))
    reused = IdempotencyKeyReused("idempotency key reused with a different message")
    pool.answer([(message(1), True), reused, (message(1), False)])
    assert result_of(first) == (message(0), True)
    assert result_of(sends[0]) == (message(1), True)
    assert failure_of(sends[1]).value is reused
    assert result_of(sends[2]) == (message(1), False)


def test_a_failed_batch_fails_each_of_its_sends_and_the_next_batch_still_goes(
    store: MessageStore, pool: AnsweredByHand
) -> None:
    sends = [send(store, n) for n in range(5)]
    pool.answer(stored(0))
    down = pymysql.err.OperationalError(2003, "Can't connect to MySQL server")
    pool.answer(down)
    assert [failure_of(d).value for d in sends[1:4]] == [down, down, down]
    pool.answer(stored(4))
    assert result_of(sends[4]) == (message(4), True)


def test_a_send_its_caller_cancelled_is_left_out_of_the_answers(
    store: MessageStore, pool: AnsweredByHand
) -> None:
    sends = [send(store, n) for n in range(3)]
    sends[1].cancel()
    pool.answer(stored(0))
    pool.answer(stored(1, 2))  # a cancelled send is still stored: its caller may retry it
    assert isinstance(failure_of(sends[1]).value, CancelledError)
    assert result_of(sends[2]) == (message(2), True)


def test_while_every_batch_in_flight_is_stalled_a_send_starts_one_more(
    pool: AnsweredByHand,
) -> None:
    now = [100.0]
    store = MessageStore(
        cast(adbapi.ConnectionPool, pool), max_batch=3, stalled=1.0, now=lambda: now[0]
    )
    stuck = send(store, 0)
    now[0] += 0.9
    waiting = send(store, 1)
    assert len(pool.waiting) == 1  # not stalled yet: the send waits
    now[0] += 0.2
    late = send(store, 2)
    assert len(pool.waiting) == 2  # the first stalled: 1 and 2 go in a batch of their own
    assert not late.called
    now[0] += 0.5
    send(store, 3)
    assert len(pool.waiting) == 2  # the second is young: 3 waits
    pool.waiting.pop(1).callback(stored(1, 2))
    assert [result_of(d) for d in (waiting, late)] == stored(1, 2)
    assert len(pool.waiting) == 2  # 3 went as soon as no young batch was in flight
    pool.answer(stored(0))
    assert result_of(stuck) == (message(0), True)


def test_once_the_pool_is_closed_the_sends_still_waiting_fail_as_unavailable(
    store: MessageStore, pool: AnsweredByHand
) -> None:
    in_flight = send(store, 0)
    waiting = [send(store, n) for n in (1, 2)]
    pool.threadpool.joined = True  # the instance is stopping: adbapi's pool was closed
    pool.answer(stored(0))
    assert result_of(in_flight) == (message(0), True)
    errors = [failure_of(d).value for d in waiting]
    assert all(isinstance(e, pymysql.err.InterfaceError) and is_unavailable(e) for e in errors)
    assert isinstance(failure_of(send(store, 3)).value, pymysql.err.InterfaceError)
    assert pool.waiting == []  # nothing more was handed to the closed pool


def test_a_batch_holds_at_least_one_send() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        MessageStore(cast(adbapi.ConnectionPool, AnsweredByHand()), max_batch=0)


def test_the_batches_are_reported_in_the_metrics(store: MessageStore, pool: AnsweredByHand) -> None:
    registry = CollectorRegistry()
    store.track(registry)
    sends = [send(store, n) for n in range(5)]
    assert metric(registry, "snet_chat_sends_waiting") == 4
    pool.answer(stored(0))
    pool.answer(stored(1, 2, 3))
    assert metric(registry, "snet_chat_send_batches_total") == 3  # the third is being stored
    assert metric(registry, "snet_chat_batched_sends_total") == 5
    assert metric(registry, "snet_chat_sends_waiting") == 0
    pool.answer(stored(4))
    assert [result_of(d)[1] for d in sends] == [True] * 5


def metric(registry: CollectorRegistry, name: str) -> float:
    value = registry.get_sample_value(name)
    assert value is not None, name
    return value
