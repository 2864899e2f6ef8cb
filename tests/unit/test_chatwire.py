"""ChatWire: the monolith's HTTP/1.1 client for chat calls, over in-memory connections.

Each connection the wire asks a ``MemoryReactorClock`` for is completed by hand with a
``StringTransport`` (what was written, and the far end's answer fed byte by byte if need be),
or, for answers made by twisted.web itself, joined to a real ``Site`` with ``iosim``.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.error import (
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
)
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.pages import notFound
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from snet.httpcall import BodyTooLarge, TimedOut, cancelled, while_connecting, within
from snet.server.chat_client import ChatClient
from snet.server.chatwire import ChatAnswer, ChatCall, ChatWire, MalformedAnswer
from snet.server.discovery import ChatEndpoint
from snet.testing import failure_of, result_of

A = ChatEndpoint("chat-a", "10.0.0.1", 8081)
B = ChatEndpoint("chat-b", "10.0.0.2", 8082)

SEND = ChatCall(
    b"POST",
    b"/v1/dialogs/2/messages",
    ((b"X-Snet-User-Id", b"1"), (b"Idempotency-Key", b"k-1")),
    b'{"text":"hi"}',
    True,
)
UNREAD = ChatCall(b"GET", b"/v1/unread", ((b"X-Snet-User-Id", b"1"),), None, True)
UNSAFE = ChatCall(b"POST", b"/v1/x", (), b"{}", False)

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


class Writes(StringTransport):
    """A StringTransport that counts the writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        super().write(data)


class Far:
    """The far end of the connection the wire asked the reactor for (the *index*-th)."""

    def __init__(self, reactor: MemoryReactorClock, index: int = -1) -> None:
        host, port, factory, self.timeout, _ = reactor.tcpClients[index]
        self.address = (host, port)
        self.protocol = factory.buildProtocol(IPv4Address("TCP", host, port))
        self.transport = Writes()
        self.protocol.makeConnection(self.transport)

    def received(self) -> bytes:
        data: bytes = self.transport.value()
        self.transport.clear()
        return data

    def answer(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.protocol.dataReceived(piece)

    def close(self, reason: Exception | None = None) -> None:
        self.protocol.connectionLost(Failure(reason or ConnectionDone()))

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)


def wire(reactor: MemoryReactorClock, **options: Any) -> ChatWire:
    return ChatWire(reactor, connect_timeout=0.5, **options)


def reason_of(error: BaseException) -> str | None:
    """What ChatClient makes of *error* (other than a timeout)."""
    return ChatClient._reason(error)


def refuse(reactor: MemoryReactorClock) -> None:
    """The latest connection attempt is refused (the endpoint reports it on its next turn)."""
    factory = reactor.tcpClients[-1][2]
    factory.clientConnectionFailed(reactor.connectors[-1], Failure(ConnectionRefusedError()))
    reactor.advance(1.0)


def pooled(reactor: MemoryReactorClock, client: ChatWire) -> Far:
    """A connection to A that has served one answer and sits in the pool."""
    first = client.exchange(A, UNREAD)
    far = Far(reactor)
    far.answer(OK)
    assert result_of(first).status == 200
    far.received()
    return far


# --- the request ------------------------------------------------------------------------------


def test_a_request_is_one_write_of_the_request_line_host_headers_and_body() -> None:
    reactor = MemoryReactorClock()
    client = wire(reactor)
    client.exchange(A, SEND)
    far = Far(reactor)
    assert far.address[1] == 8081 and far.timeout == 0.5
    assert far.transport.writes == 1
    assert far.received() == (
        b"POST /v1/dialogs/2/messages HTTP/1.1\r\n"
        b"Host: 10.0.0.1:8081\r\n"
        b"X-Snet-User-Id: 1\r\n"
        b"Idempotency-Key: k-1\r\n"
        b"Content-Length: 13\r\n"
        b"\r\n"
        b'{"text":"hi"}'
    )


def test_a_request_without_a_body_has_no_content_length_and_ipv6_hosts_are_bracketed() -> None:
    reactor = MemoryReactorClock()
    wire(reactor).exchange(ChatEndpoint("chat-6", "::1", 9000), UNREAD)
    assert Far(reactor).received() == (
        b"GET /v1/unread HTTP/1.1\r\nHost: [::1]:9000\r\nX-Snet-User-Id: 1\r\n\r\n"
    )


def test_a_header_value_cannot_add_a_header_or_end_the_head() -> None:
    reactor = MemoryReactorClock()
    call = ChatCall(
        b"GET", b"/v1/unread", ((b"X-Request-ID", b"a\r\nX-Evil: 1\r\n\r\nb"),), None, True
    )
    wire(reactor).exchange(A, call)
    head = Far(reactor).received()
    assert b"X-Request-ID: a X-Evil: 1  b\r\n" in head
    assert head.count(b"\r\n") == 4


# --- the answer -------------------------------------------------------------------------------


def splits(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True) if a < b]


@given(st.lists(st.integers(min_value=0), max_size=12))
def test_an_answer_with_a_content_length_is_read_however_it_is_split(cuts: list[int]) -> None:
    reactor = MemoryReactorClock()
    d = wire(reactor).exchange(A, UNREAD)
    Far(reactor).answer(*splits(OK, cuts))
    assert result_of(d) == ChatAnswer(200, b'{"ok":true}')


CHUNKED = (
    b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;ext=1\r\nhello\r\n"
    b"1\r\n,\r\n"
    b"a\r\n world!!!!\r\n"
    b"0\r\nX-Trailer: yes\r\n\r\n"
)


@given(st.lists(st.integers(min_value=0), max_size=12))
def test_a_chunked_answer_is_read_however_it_is_split_and_the_connection_kept(
    cuts: list[int],
) -> None:
    reactor = MemoryReactorClock()
    client = wire(reactor)
    d = client.exchange(A, UNREAD)
    far = Far(reactor)
    far.answer(*splits(CHUNKED, cuts))
    assert result_of(d) == ChatAnswer(404, b"hello, world!!!!")
    assert not far.closed
    client.exchange(A, UNREAD)
    assert len(reactor.tcpClients) == 1


def test_an_interim_100_answer_is_skipped() -> None:
    reactor = MemoryReactorClock()
    d = wire(reactor).exchange(A, SEND)
    Far(reactor).answer(b"HTTP/1.1 100 Continue\r\n\r\n", OK)
    assert result_of(d).status == 200


def test_a_204_answer_has_no_body() -> None:
    reactor = MemoryReactorClock()
    d = wire(reactor).exchange(A, UNREAD)
    Far(reactor).answer(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
    assert result_of(d) == ChatAnswer(204, b"")


def test_an_answer_without_length_ends_with_the_connection_and_is_not_pooled() -> None:
    reactor = MemoryReactorClock()
    client = wire(reactor)
    d = client.exchange(A, UNREAD)
    far = Far(reactor)
    far.answer(b'HTTP/1.0 200 OK\r\n\r\n{"a":', b"1}")
    assert not d.called
    far.close()
    assert result_of(d) == ChatAnswer(200, b'{"a":1}')
    client.exchange(A, UNREAD)
    assert len(reactor.tcpClients) == 2


@pytest.mark.parametrize(
    "answer",
    [
        OK.replace(b"Content-Type", b"Connection: close\r\nContent-Type"),
        OK.replace(b"HTTP/1.1", b"HTTP/1.0"),
        OK + b"HTTP/1.1 200 OK\r\n",  # bytes nobody asked for
    ],
    ids=["connection-close", "http-1.0", "trailing-bytes"],
)
def test_a_connection_is_not_reused_after_an_answer_that_says_so(answer: bytes) -> None:
    reactor = MemoryReactorClock()
    client = wire(reactor)
    d = client.exchange(A, UNREAD)
    far = Far(reactor)
    far.answer(answer)
    assert result_of(d).status == 200
    assert far.closed
    client.exchange(A, UNREAD)
    assert len(reactor.tcpClients) == 2


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbroken\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
    ],
)
def test_a_malformed_head_fails_as_lost_before_an_answer_and_drops_the_connection(
    answer: bytes,
) -> None:
    reactor = MemoryReactorClock()
    d = wire(reactor).exchange(A, UNREAD)
    far = Far(reactor)
    far.answer(answer)
    error = failure_of(d).value
    assert isinstance(error, ResponseNeverReceived)
    assert isinstance(error.reasons[0].value, MalformedAnswer)
    assert ChatClient._reason(error) == "lost"  # as Twisted's parser errors were
    assert far.transport.disconnected


def test_a_malformed_chunk_fails_as_a_broken_answer() -> None:
    reactor = MemoryReactorClock()
    d = wire(reactor).exchange(A, UNREAD)
    Far(reactor).answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    error = failure_of(d).value
    assert isinstance(error, ResponseFailed)
    assert isinstance(error.reasons[0].value, MalformedAnswer)


def test_a_head_that_never_ends_fails_past_its_limit() -> None:
    reactor = MemoryReactorClock()
    d = wire(reactor).exchange(A, UNREAD)
    far = Far(reactor)
    far.answer(b"HTTP/1.1 200 OK\r\n", *[b"X-Filler: " + b"x" * 1000 + b"\r\n"] * 70)
    assert isinstance(failure_of(d).value.reasons[0].value, MalformedAnswer)


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 101\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n64\r\n" + b"x" * 100 + b"\r\n1\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * 101,
    ],
    ids=["length", "chunked", "until-close"],
)
def test_an_answer_over_max_body_fails_as_bad_response_and_drops_the_connection(
    answer: bytes,
) -> None:
    reactor = MemoryReactorClock()
    client = wire(reactor, max_body=100)
    d = client.exchange(A, UNREAD)
    far = Far(reactor)
    far.answer(answer)
    error = failure_of(d).value
    assert isinstance(error, BodyTooLarge)
    assert reason_of(error) == "bad_response"
    assert far.transport.disconnected
    client.exchange(A, UNREAD)
    assert len(reactor.tcpClients) == 2


# --- connections lost -------------------------------------------------------------------------


def test_a_new_connection_lost_before_any_answer_fails_as_never_received() -> None:
    reactor = MemoryReactorClock()
    d = wire(reactor).exchange(A, SEND)
    Far(reactor).close(ConnectionLost())
    error = failure_of(d).value
    assert isinstance(error, ResponseNeverReceived)
    assert error.reasons[0].check(ConnectionLost)
    assert reason_of(error) == "lost"
    assert len(reactor.tcpClients) == 1  # not retried: the connection was new


@pytest.mark.parametrize(
    "received",
    [b"HTTP/1.1 200 OK\r\nContent-Le", OK[:-3]],
    ids=["in-the-head", "in-the-body"],
)
def test_a_connection_lost_mid_answer_fails_as_a_broken_answer(received: bytes) -> None:
    reactor = MemoryReactorClock()
    client = wire(reactor)
    far = pooled(reactor, client)
    d = client.exchange(A, SEND)
    far.answer(received)
    far.close(ConnectionLost())
    error = failure_of(d).value
    assert isinstance(error, ResponseFailed)
    assert reason_of(error) == "lost"
    assert len(reactor.tcpClients) == 1  # part of an answer came: never sent again here


def test_a_refused_connection_fails_as_refused() -> None:
    reactor = MemoryReactorClock()
    d = wire(reactor).exchange(A, SEND)
    refuse(reactor)
    assert reason_of(failure_of(d).value) == "refused"


def test_a_pooled_connection_closed_while_idle_leaves_the_pool() -> None:
    reactor = MemoryReactorClock()
    client = wire(reactor)
    far = pooled(reactor, client)
    far.close()
    client.exchange(A, SEND)
    assert len(reactor.tcpClients) == 2
    assert far.received() == b""


def test_a_stale_pooled_connection_is_retried_once_on_a_new_one() -> None:
    """The server closed the kept-alive connection as the request went out."""
    reactor = MemoryReactorClock()
    client = wire(reactor)
    stale = pooled(reactor, client)
    d = client.exchange(A, SEND)
    sent = stale.received()
    stale.close()
    assert not d.called
    fresh = Far(reactor)
    assert fresh.received() == sent  # the same request, Idempotency-Key included
    fresh.answer(OK)
    assert result_of(d).status == 200


def test_the_retry_on_a_new_connection_is_made_once() -> None:
    reactor = MemoryReactorClock()
    client = wire(reactor)
    stale = pooled(reactor, client)
    d = client.exchange(A, SEND)
    stale.close()
    Far(reactor).close(ConnectionLost())
    assert isinstance(failure_of(d).value, ResponseNeverReceived)
    assert len(reactor.tcpClients) == 2


def test_a_refused_retry_still_says_lost_since_the_request_may_have_landed() -> None:
    reactor = MemoryReactorClock()
    client = wire(reactor)
    stale = pooled(reactor, client)
    d = client.exchange(A, SEND)
    stale.close()
    refuse(reactor)
    error = failure_of(d).value
    assert isinstance(error, ResponseNeverReceived)
    assert [r.type for r in error.reasons] == [ConnectionDone, ConnectionRefusedError]
    assert reason_of(error) == "lost"


def test_a_retry_cut_short_while_connecting_is_a_timeout_not_a_connect_timeout() -> None:
    reactor = MemoryReactorClock()
    client = wire(reactor)
    stale = pooled(reactor, client)
    d = within(client.exchange(A, SEND), 2.0, reactor)
    stale.close()
    reactor.advance(2.0)
    error = failure_of(d).value
    assert isinstance(error, TimedOut)
    assert cancelled(error.cause) and not while_connecting(error.cause)


def test_a_call_not_safe_to_repeat_is_not_retried_on_a_stale_connection() -> None:
    reactor = MemoryReactorClock()
    client = wire(reactor)
    stale = pooled(reactor, client)
    d = client.exchange(A, UNSAFE)
    stale.close()
    assert reason_of(failure_of(d).value) == "lost"
    assert len(reactor.tcpClients) == 1


# --- cancelling (timeouts) --------------------------------------------------------------------


def test_a_call_cancelled_while_connecting_says_so() -> None:
    reactor = MemoryReactorClock()
    d = within(wire(reactor).exchange(A, SEND), 2.0, reactor)
    reactor.advance(2.0)
    error = failure_of(d).value
    assert isinstance(error, TimedOut)
    assert while_connecting(error.cause)


def test_a_call_cancelled_after_its_request_aborts_the_connection_which_is_not_pooled() -> None:
    reactor = MemoryReactorClock()
    client = wire(reactor)
    far = pooled(reactor, client)
    d = within(client.exchange(A, SEND), 2.0, reactor)
    reactor.advance(2.0)
    error = failure_of(d).value
    assert isinstance(error, TimedOut)
    assert cancelled(error.cause) and not while_connecting(error.cause)
    assert isinstance(error.cause, ResponseNeverReceived)
    assert far.transport.disconnected
    far.answer(OK)  # too late, and harmless
    far.close()
    client.exchange(A, SEND)
    assert len(reactor.tcpClients) == 2


def test_a_call_cancelled_mid_answer_fails_as_a_broken_answer() -> None:
    reactor = MemoryReactorClock()
    client = wire(reactor)
    d = client.exchange(A, SEND)
    far = Far(reactor)
    far.answer(OK[:20])
    d.cancel()
    error = failure_of(d).value
    assert isinstance(error, ResponseFailed) and error.reasons[0].check(CancelledError)
    assert ChatClient._reason(error) is None  # the caller's cancel, not the instance's fault
    assert far.transport.disconnected


# --- the pool ---------------------------------------------------------------------------------


def test_instances_have_their_own_connections_and_idle_ones_are_bounded() -> None:
    reactor = MemoryReactorClock()
    client = wire(reactor, max_idle=1)
    calls = [client.exchange(A, UNREAD), client.exchange(A, UNREAD), client.exchange(B, UNREAD)]
    ends = [Far(reactor, i) for i in range(3)]
    assert [e.address[1] for e in ends] == [8081, 8081, 8082]
    for end in ends:
        end.answer(OK)
    assert all(result_of(d).status == 200 for d in calls)
    assert [e.closed for e in ends] == [False, True, False]
    client.exchange(A, UNREAD)
    client.exchange(B, UNREAD)
    assert len(reactor.tcpClients) == 3


def test_idle_connections_are_closed_after_the_idle_timeout_by_one_timer() -> None:
    reactor = MemoryReactorClock()
    client = wire(reactor, idle_timeout=30.0)
    old = pooled(reactor, client)
    reactor.advance(20.0)
    d = client.exchange(B, UNREAD)
    young = Far(reactor)
    young.answer(OK)
    result_of(d)
    assert len(reactor.getDelayedCalls()) == 1
    reactor.advance(10.0)
    assert old.closed and not young.closed
    reactor.advance(20.0)
    assert young.closed
    assert reactor.getDelayedCalls() == []


def test_close_closes_the_idle_connections_and_fires_when_they_are_gone() -> None:
    reactor = MemoryReactorClock()
    client = wire(reactor)
    far = pooled(reactor, client)
    closed = client.close()
    assert far.closed and not closed.called
    far.close()
    assert result_of(closed) is None
    assert reactor.getDelayedCalls() == []


def test_a_call_that_ends_after_close_does_not_pool_its_connection() -> None:
    reactor = MemoryReactorClock()
    client = wire(reactor)
    d = client.exchange(A, UNREAD)
    far = Far(reactor)
    assert result_of(client.close()) is None
    far.answer(OK)
    assert result_of(d).status == 200
    assert far.closed


# --- against twisted.web ----------------------------------------------------------------------


class Chat(Resource):
    """A JSON answer with a length, a chunked one (written, then finished), or a crash."""

    isLeaf = True

    def render(self, request: Request) -> bytes | int:
        if request.path == b"/chunked":
            request.write(b'{"part":')
            request.write(b"1}")
            request.finish()
            return NOT_DONE_YET
        if request.path == b"/crash":
            raise RuntimeError("boom")
        if request.path == b"/missing":
            return notFound().render(request)  # type: ignore[no-any-return]
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"ok":true}'


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [
        (b"/", 200, b'{"ok":true}'),
        (b"/chunked", 200, b'{"part":1}'),
        (b"/missing", 404, None),
        (b"/crash", 500, None),
    ],
)
def test_answers_of_twisted_web_are_read_and_the_connection_kept(
    path: bytes, status: int, body: bytes | None
) -> None:
    reactor = MemoryReactorClock()
    client = wire(reactor)
    site = Site(Chat())
    site.displayTracebacks = False
    answers = []
    for _ in range(2):
        d = client.exchange(A, ChatCall(b"GET", path, (), None, True))
        if len(reactor.tcpClients) == 1 and not answers:
            _host, _port, factory, _, _ = reactor.tcpClients[0]
            near = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 8081))
            far = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))
            pump = iosim.connect(
                far,
                iosim.FakeTransport(far, isServer=True),
                near,
                iosim.FakeTransport(near, isServer=False),
            )
        pump.flush()
        answers.append(result_of(d))
    assert len(reactor.tcpClients) == 1
    assert [a.status for a in answers] == [status, status]
    if body is not None:
        assert answers[0].body == body
