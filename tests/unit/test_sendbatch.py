"""SendBatcher (snet.server.sendbatch): the sends to an instance that come while a send call
to it is out go in one batch call, each answered on its own; over a wire of Deferreds fired
by hand. The chat's batch route is tested in test_chat_api.py, the whole path against real
processes in tests/integration/test_monolith.py."""

from __future__ import annotations

import json
import string
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived

from snet.server import sendbatch
from snet.server.chatwire import ChatAnswer, ChatCall
from snet.server.discovery import ChatEndpoint
from snet.server.sendbatch import STALLED, BatchedSend, NotSent, ParsedAnswer, SendBatcher, Told
from snet.testing import failure_of, result_of

A = ChatEndpoint("chat-a", "10.0.0.1", 8081)
B = ChatEndpoint("chat-b", "10.0.0.2", 8082)


class Wire:
    """Records each call; its Deferred is fired by the test. A cancelled call fails as
    ChatWire's does."""

    def __init__(self) -> None:
        self.calls: list[tuple[ChatEndpoint, ChatCall, Deferred[ChatAnswer]]] = []
        self.cancelled: list[ChatCall] = []
        self.at_once: list[ChatCall] = []
        """Calls answered 201 as they are made."""

    def exchange(self, endpoint: ChatEndpoint, call: ChatCall) -> Deferred[ChatAnswer]:
        def cancel(d: Deferred[ChatAnswer]) -> None:
            self.cancelled.append(call)
            d.errback(ResponseNeverReceived([Failure(CancelledError())]))

        d: Deferred[ChatAnswer] = Deferred(cancel)
        self.calls.append((endpoint, call, d))
        if call in self.at_once:
            d.callback(ChatAnswer(201, b"{}"))
        return d

    def targets(self) -> list[bytes]:
        return [call.target for _, call, _ in self.calls]

    def items(self, index: int) -> list[dict[str, Any]]:
        body = self.calls[index][1].body
        assert body is not None
        sends: list[dict[str, Any]] = json.loads(body)["sends"]
        return sends

    def answer_batch(self, index: int, results: list[tuple[int, Any]]) -> None:
        body = {"results": [{"status": s, "body": b} for s, b in results]}
        self.calls[index][2].callback(ChatAnswer(200, json.dumps(body).encode()))


def send(n: int, text: str = "hi") -> BatchedSend:
    item = {
        "user_id": 1,
        "peer_id": 2,
        "idempotency_key": f"k{n}",
        "text": text,
        "request_id": f"rid-{n}",
    }
    body = json.dumps({"text": text}).encode()
    call = ChatCall(
        b"POST", b"/v1/dialogs/2/messages", ((b"Idempotency-Key", b"k%d" % n),), body, True
    )
    return BatchedSend(call, item)


def message(n: int) -> dict[str, Any]:
    return {"message": {"id": n}}


@pytest.fixture
def wire() -> Wire:
    return Wire()


@pytest.fixture
def batcher(wire: Wire) -> SendBatcher:
    return SendBatcher(wire, clock=Clock())


def batch_out(wire: Wire, batcher: SendBatcher, numbers: tuple[int, ...]) -> list[Deferred[Any]]:
    """Send 1 goes alone; the sends *numbers* wait for it, and go as the second call when it
    is answered: their Deferreds."""
    batcher.exchange(A, send(1))
    sends = [batcher.exchange(A, send(n)) for n in numbers]
    wire.calls[0][2].callback(ChatAnswer(201, b"{}"))
    return sends


def test_a_send_to_an_instance_with_nothing_out_goes_at_once_by_itself(
    wire: Wire, batcher: SendBatcher
) -> None:
    d = batcher.exchange(A, send(1))
    assert wire.targets() == [b"/v1/dialogs/2/messages"]
    wire.calls[0][2].callback(ChatAnswer(201, b'{"message": {}}'))
    assert result_of(d) == ChatAnswer(201, b'{"message": {}}')
    assert batcher.batch_calls == 0


def test_sends_that_come_while_a_call_is_out_go_in_one_batch_when_it_ends(
    wire: Wire, batcher: SendBatcher
) -> None:
    first = batcher.exchange(A, send(1))
    waiting = [batcher.exchange(A, send(n)) for n in (2, 3, 4)]
    other = batcher.exchange(B, send(5))  # another instance: its own lane, nothing out
    assert wire.targets() == [b"/v1/dialogs/2/messages"] * 2
    assert batcher.waiting(A) == 3
    wire.calls[0][2].callback(ChatAnswer(201, b"{}"))
    assert result_of(first).status == 201
    assert [call.target for _, call, _ in wire.calls[2:]] == [b"/v1/sends"]
    endpoint, call, _ = wire.calls[2]
    assert endpoint == A
    assert call.retry_safe
    assert (b"Content-Type", b"application/json") in call.headers
    assert wire.items(2) == [send(n).item for n in (2, 3, 4)]
    wire.answer_batch(2, [(201, message(2)), (409, {"code": 40901}), (201, message(4))])
    assert [result_of(d) for d in waiting] == [
        ParsedAnswer(201, message(2)),
        ParsedAnswer(409, {"code": 40901}),
        ParsedAnswer(201, message(4)),
    ]
    assert (batcher.batch_calls, batcher.batched_sends) == (1, 3)
    assert not other.called


def test_the_next_batch_holds_the_sends_that_came_while_the_batch_before_was_out(
    wire: Wire, batcher: SendBatcher
) -> None:
    batcher.exchange(A, send(1))
    batcher.exchange(A, send(2))
    batcher.exchange(A, send(3))
    wire.calls[0][2].callback(ChatAnswer(201, b"{}"))
    later = [batcher.exchange(A, send(n)) for n in (4, 5)]
    assert len(wire.calls) == 2  # they wait for the batch
    wire.answer_batch(1, [(201, message(2)), (201, message(3))])
    assert wire.targets()[2] == b"/v1/sends"
    assert [i["idempotency_key"] for i in wire.items(2)] == ["k4", "k5"]
    wire.answer_batch(2, [(201, message(4)), (201, message(5))])
    assert [result_of(d).status for d in later] == [201, 201]


def test_a_lone_send_that_waited_goes_to_the_send_route(wire: Wire, batcher: SendBatcher) -> None:
    batcher.exchange(A, send(1))
    second = batcher.exchange(A, send(2))
    wire.calls[0][2].callback(ChatAnswer(201, b"{}"))
    assert wire.targets() == [b"/v1/dialogs/2/messages"] * 2
    assert wire.calls[1][1] == send(2).call
    wire.calls[1][2].callback(ChatAnswer(201, b'{"message": 2}'))
    assert result_of(second) == ChatAnswer(201, b'{"message": 2}')


def test_a_queue_that_reaches_max_sends_goes_at_once(wire: Wire) -> None:
    batcher = SendBatcher(wire, clock=Clock(), max_sends=3)
    batcher.exchange(A, send(0))
    for n in (1, 2, 3, 4):
        batcher.exchange(A, send(n))
    assert wire.targets() == [b"/v1/dialogs/2/messages", b"/v1/sends"]
    assert [i["idempotency_key"] for i in wire.items(1)] == ["k1", "k2", "k3"]
    assert batcher.waiting(A) == 1


def test_a_batch_stays_under_max_bytes_and_the_rest_waits(wire: Wire) -> None:
    batcher = SendBatcher(wire, clock=Clock(), max_bytes=2500)
    batcher.exchange(A, send(0))
    for n in (1, 2, 3):
        batcher.exchange(A, send(n, text="x" * 150))  # about 1000 bytes each, counted
    assert len(wire.calls) == 2  # the third would pass the bound: the two went at once
    assert [i["idempotency_key"] for i in wire.items(1)] == ["k1", "k2"]
    body = wire.calls[1][1].body
    assert body is not None and len(body) < 2500
    assert batcher.waiting(A) == 1


@pytest.mark.parametrize("status", [404, 405])
def test_an_instance_without_the_batch_route_gets_its_sends_one_by_one(
    wire: Wire, batcher: SendBatcher, status: int
) -> None:
    waiting = batch_out(wire, batcher, (2, 3))
    wire.calls[1][2].callback(ChatAnswer(status, b'{"message": "not found"}'))
    assert wire.targets()[2:] == [b"/v1/dialogs/2/messages"] * 2
    assert [call for _, call, _ in wire.calls[2:]] == [send(2).call, send(3).call]
    for index, d in zip((2, 3), waiting, strict=True):
        wire.calls[index][2].callback(ChatAnswer(201, b"{}"))
        assert result_of(d) == ChatAnswer(201, b"{}")
    # From then on every send to it goes by itself, even while a call is out.
    batcher.exchange(A, send(4))
    batcher.exchange(A, send(5))
    assert wire.targets()[4:] == [b"/v1/dialogs/2/messages"] * 2


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (ChatAnswer(503, b'{"message": "draining"}'), ParsedAnswer(503, {"message": "draining"})),
        (ChatAnswer(403, b'{"code": 40300}'), ParsedAnswer(403, {"code": 40300})),
        (ChatAnswer(500, b"<html>"), ParsedAnswer(500, None, decoded=False)),
        (ChatAnswer(200, b"<html>"), ParsedAnswer(200, None, decoded=False)),
        (ChatAnswer(200, b'{"results": []}'), ParsedAnswer(200, None, decoded=False)),
        (
            ChatAnswer(200, b'{"results": [{"status": 201}, {"status": 201, "body": {}}]}'),
            ParsedAnswer(200, None, decoded=False),
        ),
        (
            ChatAnswer(200, b'{"results": [{"status": "201", "body": 1}, 2]}'),
            ParsedAnswer(200, None, decoded=False),
        ),
        (
            ChatAnswer(
                200, b'{"results": [{"status": 99, "body": 1}, {"status": 201, "body": 1}]}'
            ),
            ParsedAnswer(200, None, decoded=False),
        ),
        (ChatAnswer(201, b'{"message": {}}'), ParsedAnswer(201, None, decoded=False)),
    ],
)
def test_an_answer_that_is_not_the_batchs_is_each_sends_own_answer(
    wire: Wire, batcher: SendBatcher, answer: ChatAnswer, expected: ParsedAnswer
) -> None:
    """A 5xx, a 4xx or an answer without one result per send: each send gets it, and the
    client judges it as it would a single call's; a 2xx that is not the batch's answer is
    one that could not be read (a bad_response there: see test_chat_client.py)."""
    waiting = batch_out(wire, batcher, (2, 3))
    wire.calls[1][2].callback(answer)
    assert [result_of(d) for d in waiting] == [expected, expected]


def test_a_batch_call_that_fails_fails_each_of_its_sends_with_its_failure(
    wire: Wire, batcher: SendBatcher
) -> None:
    waiting = batch_out(wire, batcher, (2, 3))
    lost = ResponseFailed([Failure(ConnectionError("lost"))])
    wire.calls[1][2].errback(lost)
    assert [failure_of(d).value for d in waiting] == [lost, lost]


def test_the_queue_goes_when_the_call_ahead_fails(wire: Wire, batcher: SendBatcher) -> None:
    first = batcher.exchange(A, send(1))
    batcher.exchange(A, send(2))
    batcher.exchange(A, send(3))
    first.cancel()  # its attempt timed out
    assert isinstance(failure_of(first).value, ResponseNeverReceived)
    assert wire.targets()[1] == b"/v1/sends"


def test_a_send_cancelled_while_it_waits_never_leaves_and_fails_as_not_sent(
    wire: Wire, batcher: SendBatcher
) -> None:
    batcher.exchange(A, send(1))
    gone = batcher.exchange(A, send(2))
    kept = [batcher.exchange(A, send(n)) for n in (3, 4)]
    gone.cancel()
    failure = failure_of(gone)
    assert isinstance(failure.value, NotSent)
    assert batcher.waiting(A) == 2
    wire.calls[0][2].callback(ChatAnswer(201, b"{}"))
    assert [i["idempotency_key"] for i in wire.items(1)] == ["k3", "k4"]
    wire.answer_batch(1, [(201, message(3)), (201, message(4))])
    assert [result_of(d).status for d in kept] == [201, 201]


def test_a_send_cancelled_in_a_batch_leaves_it_to_the_others(
    wire: Wire, batcher: SendBatcher
) -> None:
    batcher.exchange(A, send(1))
    gone, kept = batcher.exchange(A, send(2)), batcher.exchange(A, send(3))
    wire.calls[0][2].callback(ChatAnswer(201, b"{}"))
    gone.cancel()
    failure = failure_of(gone)
    assert isinstance(failure.value, ResponseNeverReceived)
    assert failure.value.reasons[0].check(CancelledError)
    assert wire.cancelled == []  # the batch goes on for the other send
    wire.answer_batch(1, [(201, message(2)), (201, message(3))])
    assert result_of(kept) == ParsedAnswer(201, message(3))


def test_a_batch_whose_every_send_is_cancelled_is_cancelled(
    wire: Wire, batcher: SendBatcher
) -> None:
    sends = batch_out(wire, batcher, (2, 3))
    for d in sends:
        d.cancel()
        failure_of(d)
    assert [call.target for call in wire.cancelled] == [b"/v1/sends"]
    # The lane is free again: the next send goes at once.
    batcher.exchange(A, send(4))
    assert wire.targets()[-1] == b"/v1/dialogs/2/messages"


def test_a_send_that_went_alone_after_waiting_is_cancelled_with_its_call(
    wire: Wire, batcher: SendBatcher
) -> None:
    batcher.exchange(A, send(1))
    second = batcher.exchange(A, send(2))
    wire.calls[0][2].callback(ChatAnswer(201, b"{}"))
    second.cancel()
    assert wire.cancelled == [send(2).call]
    assert isinstance(failure_of(second).value, ResponseNeverReceived)


def test_max_sends_is_within_the_chat_services_bound(wire: Wire) -> None:
    with pytest.raises(ValueError, match="max_sends"):
        SendBatcher(wire, clock=Clock(), max_sends=51)


# --- a call that stalls -----------------------------------------------------------------------


def test_a_call_out_for_longer_than_stalled_does_not_hold_the_sends_after_it(wire: Wire) -> None:
    clock = Clock()
    batcher = SendBatcher(wire, clock=clock)
    batcher.exchange(A, send(1))  # stalls: say, on a dead MySQL connection
    clock.advance(STALLED / 2)
    waiting = [batcher.exchange(A, send(n)) for n in (2, 3)]
    clock.advance(STALLED / 2 - 0.001)
    assert len(wire.calls) == 1
    clock.advance(0.001)  # the first call has been out for STALLED: the queue goes
    assert wire.targets() == [b"/v1/dialogs/2/messages", b"/v1/sends"]
    wire.answer_batch(1, [(201, message(2)), (201, message(3))])
    assert [result_of(d).status for d in waiting] == [201, 201]
    # The stalled call no longer holds anything: the next send goes at once, by itself.
    batcher.exchange(A, send(4))
    assert wire.targets()[-1] == b"/v1/dialogs/2/messages"
    assert clock.getDelayedCalls() == []


def test_a_send_that_comes_after_the_call_stalled_takes_the_queue_with_it(wire: Wire) -> None:
    clock = Clock()
    batcher = SendBatcher(wire, clock=clock, stalled=1.0)
    batcher.exchange(A, send(1))
    batcher.exchange(A, send(2))  # waits, its timer due at 1.0
    clock.pump([0.5, 0.4])
    batcher.exchange(A, send(3))  # the first call is young yet: waits too
    clock.advance(0.1)  # 1.0: the queue goes
    assert [i["idempotency_key"] for i in wire.items(1)] == ["k2", "k3"]
    assert clock.getDelayedCalls() == []


def test_the_stall_timer_waits_for_the_youngest_call_out(wire: Wire) -> None:
    clock = Clock()
    batcher = SendBatcher(wire, clock=clock, stalled=1.0, max_sends=2)
    batcher.exchange(A, send(1))
    clock.advance(0.5)
    batcher.exchange(A, send(2))
    batcher.exchange(A, send(3))  # a full batch goes at once, while the first is out
    batcher.exchange(A, send(4))  # waits for both
    clock.advance(0.5)  # the first has stalled; the batch has not
    assert len(wire.calls) == 2
    clock.advance(0.5)
    assert wire.targets()[-1] == b"/v1/dialogs/2/messages"  # k4, alone
    assert wire.calls[-1][1] == send(4).call


def test_a_queue_that_went_before_its_timer_leaves_no_timer(wire: Wire) -> None:
    clock = Clock()
    batcher = SendBatcher(wire, clock=clock)
    batcher.exchange(A, send(1))
    batcher.exchange(A, send(2))
    assert len(clock.getDelayedCalls()) == 1
    wire.calls[0][2].callback(ChatAnswer(201, b"{}"))
    assert clock.getDelayedCalls() == []


# --- one failure of a batch, counted once -----------------------------------------------------


def test_only_the_first_failure_of_a_batch_counts(wire: Wire, batcher: SendBatcher) -> None:
    batcher.exchange(A, send(1))
    notes = [Told(), Told(), Told()]
    sends = [batcher.exchange(A, send(n), note) for n, note in zip((2, 3, 4), notes, strict=True)]
    wire.calls[0][2].callback(ChatAnswer(201, b"{}"))
    wire.calls[1][2].errback(ResponseFailed([Failure(ConnectionError("lost"))]))
    for d in sends:
        failure_of(d)
    assert [note.first() for note in notes] == [True, False, False]


def test_a_send_cancelled_by_its_caller_takes_nothing_from_its_batchs_count(
    wire: Wire, batcher: SendBatcher
) -> None:
    """The client counts nothing for a cancel: the batch's failure after it still counts."""
    batcher.exchange(A, send(1))
    notes = [Told(), Told()]
    gone, kept = (batcher.exchange(A, send(n), note) for n, note in zip((2, 3), notes, strict=True))
    wire.calls[0][2].callback(ChatAnswer(201, b"{}"))
    gone.cancel()
    failure_of(gone)
    wire.calls[1][2].callback(ChatAnswer(503, b"{}"))
    assert result_of(kept).status == 503
    assert notes[1].first()


def test_sends_alone_always_count(wire: Wire, batcher: SendBatcher) -> None:
    alone = Told()
    batcher.exchange(A, send(1), alone)
    wire.calls[0][2].errback(ResponseFailed([Failure(ConnectionError("lost"))]))
    assert [alone.first(), alone.first()] == [True, True]


# --- the stall timer and the route an instance lacks ------------------------------------------


def test_a_timer_that_fires_on_time_lets_the_queue_go_whatever_the_rounding(wire: Wire) -> None:
    """At t = out + stalled, ``out > now - stalled`` may still hold in floating point: the
    timer must not arm itself again for ever (found with t=0.0007, 0.0017 by a review)."""
    for start, queued in ((0.0007, 0.0017), (0.1, 0.11), (1 / 3, 0.34), (12345.678, 12345.679)):
        clock = Clock()
        clock.advance(start)
        batcher = SendBatcher(wire, clock=clock)
        batcher.exchange(A, send(1))
        clock.advance(queued - start)
        batcher.exchange(A, send(2))
        (timer,) = clock.getDelayedCalls()
        clock.advance(timer.getTime() - clock.seconds())
        assert clock.getDelayedCalls() == []
        assert batcher.waiting(A) == 0


def waiting_behind_a_batch(wire: Wire, batcher: SendBatcher) -> list[Deferred[Any]]:
    """A batch of sends 2 and 3 out (the second call), and sends 4 and 5 waiting for it."""
    batch_out(wire, batcher, (2, 3))
    return [batcher.exchange(A, send(n)) for n in (4, 5)]


def test_after_a_404_the_sends_that_waited_meanwhile_go_one_by_one_not_in_another_batch(
    wire: Wire, batcher: SendBatcher
) -> None:
    waiting_behind_a_batch(wire, batcher)
    wire.calls[1][2].callback(ChatAnswer(404, b"{}"))
    assert (
        wire.targets()
        == [b"/v1/dialogs/2/messages", b"/v1/sends"] + [b"/v1/dialogs/2/messages"] * 4
    )


def test_a_send_cancelled_while_a_flush_sends_the_ones_before_it_is_not_sent(
    wire: Wire, batcher: SendBatcher
) -> None:
    """After a 404 the queue goes one by one; a callback of one cancels a later one."""
    fourth, fifth = waiting_behind_a_batch(wire, batcher)
    wire.at_once.append(send(4).call)
    fourth.addCallback(lambda answer: (fifth.cancel(), answer)[1])
    wire.calls[1][2].callback(ChatAnswer(404, b"{}"))  # 4 and 5 go alone: 4 is answered at once
    assert result_of(fourth).status == 201
    assert isinstance(failure_of(fifth).value, NotSent)
    assert send(5).call not in [call for _, call, _ in wire.calls]


# --- callbacks that cancel other sends ---------------------------------------------------------


def batch_of_three(wire: Wire, batcher: SendBatcher) -> list[Deferred[Any]]:
    sends = batch_out(wire, batcher, (2, 3, 4))
    assert wire.targets()[1] == b"/v1/sends"
    return sends


def test_a_send_cancelled_by_another_sends_callback_is_not_answered_again(
    wire: Wire, batcher: SendBatcher
) -> None:
    first, second, third = batch_of_three(wire, batcher)
    first.addBoth(lambda _: second.cancel())
    wire.calls[1][2].callback(ChatAnswer(503, b"{}"))
    assert isinstance(failure_of(second).value, ResponseNeverReceived)
    assert result_of(third).status == 503


def test_after_a_404_a_send_cancelled_meanwhile_is_not_sent_alone(
    wire: Wire, batcher: SendBatcher
) -> None:
    first, second, third = batch_of_three(wire, batcher)
    wire.at_once.append(send(2).call)  # k2 alone is answered at once; its caller cancels k3
    first.addBoth(lambda result: (second.cancel(), result)[1])
    wire.calls[1][2].callback(ChatAnswer(404, b"{}"))
    assert result_of(first).status == 201
    assert isinstance(failure_of(second).value, ResponseNeverReceived)
    assert [c for _, c, _ in wire.calls[2:]] == [send(2).call, send(4).call]
    wire.calls[3][2].callback(ChatAnswer(201, b"{}"))
    assert result_of(third).status == 201


TOKEN = st.text(alphabet=string.ascii_letters + string.digits + "._:-", min_size=1, max_size=128)


@given(
    key=TOKEN,
    rid=TOKEN,
    text=st.text(max_size=300),
    ids=st.tuples(st.integers(1, 2**63 - 1), st.integers(1, 2**63 - 1)),
)
def test_the_bound_of_a_sends_size_is_never_below_its_json(
    key: str, rid: str, text: str, ids: tuple[int, int]
) -> None:
    item = {
        "user_id": ids[0],
        "peer_id": ids[1],
        "idempotency_key": key,
        "text": text,
        "request_id": rid,
    }
    encoded = json.dumps(item, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    assert len(encoded) + 1 <= sendbatch._item_bound(item)  # the comma between items


def test_a_full_batch_of_the_longest_sends_stays_under_the_chats_body_bound(wire: Wire) -> None:
    """Sends of 4096 characters that JSON escapes (6 bytes each), the longest key and id: the
    batches' bodies stay under 64 KiB, whatever the bound lets in."""
    batcher = SendBatcher(wire, clock=Clock())
    batcher.exchange(A, send(0))
    worst = "\x01" * 4096
    for n in range(1, 12):
        item = {**send(n, worst).item, "idempotency_key": "k" * 128, "request_id": "r" * 128}
        batcher.exchange(A, BatchedSend(send(n, worst).call, item))
    wire.calls[0][2].callback(ChatAnswer(201, b"{}"))
    bodies = [call.body for _, call, _ in wire.calls[1:]]
    assert len(bodies) >= 2
    assert all(body is not None and len(body) < 64 * 1024 for body in bodies)


def test_a_retried_send_goes_alone_and_holds_nothing(wire: Wire, batcher: SendBatcher) -> None:
    """A retry may meet the locks of its own first attempt (a killed instance's statement):
    it goes by itself at once, and the sends after it do not wait for it."""
    batcher.exchange(A, send(1))
    batcher.exchange(A, send(2), alone=True)  # goes at once though a call is out
    assert wire.targets() == [b"/v1/dialogs/2/messages"] * 2
    wire.calls[0][2].callback(ChatAnswer(201, b"{}"))
    batcher.exchange(A, send(3))  # the retry's call, still out, holds nothing
    assert wire.targets()[-1] == b"/v1/dialogs/2/messages"
    assert wire.calls[-1][1] == send(3).call
