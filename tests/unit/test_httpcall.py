"""snet.httpcall: a bounded, timed treq call, tested in memory (StubTreq, Clock)."""

from __future__ import annotations

from typing import Any

import pytest
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from snet.httpcall import (
    BodyTooLarge,
    BytesProducer,
    PooledHTTPClient,
    TimedOut,
    cancelled,
    describe,
    pooled_http_client,
    read_body,
    while_connecting,
    within,
)
from snet.testing import failure_of, result_of


class Server(Resource):
    """Answers *body*, or hangs (``hang``) and notes when the client dropped the request."""

    isLeaf = True

    def __init__(self, body: bytes = b"hello") -> None:
        super().__init__()
        self.body = body
        self.hang = False
        self.dropped = 0

    def render(self, request: Request) -> bytes | int:
        if self.hang:
            request.notifyFinish().addErrback(lambda _: setattr(self, "dropped", self.dropped + 1))
            return NOT_DONE_YET
        return self.body


def body_of(stub: StubTreq, limit: int | None = None) -> Deferred[bytes]:
    d: Deferred[Any] = stub.get("http://example.invalid/", unbuffered=True)
    return d.addCallback(read_body, limit)


# --- read_body --------------------------------------------------------------------------------


def test_read_body_returns_the_whole_body() -> None:
    assert result_of(body_of(StubTreq(Server(b"x" * 10_000)))) == b"x" * 10_000


def test_read_body_of_an_empty_answer_is_empty() -> None:
    assert result_of(body_of(StubTreq(Server(b"")))) == b""


def test_read_body_within_its_limit_is_the_body() -> None:
    assert result_of(body_of(StubTreq(Server(b"0123456789")), limit=10)) == b"0123456789"


def test_read_body_over_its_limit_fails_with_body_too_large() -> None:
    failure = failure_of(body_of(StubTreq(Server(b"0123456789!")), limit=10))
    assert failure.check(BodyTooLarge)
    assert "10 bytes" in str(failure.value)


# --- within -----------------------------------------------------------------------------------


def test_a_call_that_hangs_is_cancelled_at_its_timeout_and_fails_timed_out() -> None:
    server = Server()
    server.hang = True
    stub = StubTreq(server)
    clock = Clock()
    d = within(body_of(stub), 2.0, clock)
    settled: list[object] = []
    d.addBoth(lambda result: settled.append(result) or result)
    clock.advance(1.9)
    assert settled == []
    clock.advance(0.1)
    failure = failure_of(d)
    assert failure.check(TimedOut)
    assert failure.value.timeout == 2.0
    assert str(failure.value) == "no answer within 2s"
    assert cancelled(failure.value.cause)
    stub.flush()
    assert server.dropped == 1
    assert clock.getDelayedCalls() == []


def test_a_call_answered_in_time_keeps_its_answer_and_leaves_no_timer() -> None:
    clock = Clock()
    d = within(body_of(StubTreq(Server(b"ok"))), 2.0, clock)
    assert result_of(d) == b"ok"
    assert clock.getDelayedCalls() == []


def test_a_failure_before_the_timeout_passes_through_unchanged() -> None:
    clock = Clock()
    error = ConnectionRefusedError("refused")
    call: Deferred[bytes] = Deferred()
    d = within(call, 2.0, clock)
    call.errback(error)
    assert failure_of(d).value is error
    assert clock.getDelayedCalls() == []


def test_a_call_cancelled_by_its_caller_is_cancelled_not_timed_out() -> None:
    clock = Clock()
    d = within(Deferred[bytes](), 2.0, clock)
    d.cancel()
    assert failure_of(d).check(CancelledError)
    assert clock.getDelayedCalls() == []


def test_timed_out_keeps_what_the_cancelled_call_failed_with() -> None:
    """A canceller that fails the call with its own error (as an agent still connecting
    does): the cause tells that the call never had a connection."""
    clock = Clock()
    error = ResponseNeverReceived([Failure(ConnectingCancelledError(None))])
    d = within(Deferred[bytes](lambda c: c.errback(error)), 1.0, clock)
    clock.advance(1.0)
    timed_out = failure_of(d).value
    assert isinstance(timed_out, TimedOut)
    assert timed_out.cause is error
    assert while_connecting(timed_out.cause)


# --- failures ---------------------------------------------------------------------------------


def test_cancellation_is_found_however_deep_the_agent_wrapped_it() -> None:
    assert cancelled(CancelledError())
    assert cancelled(ConnectingCancelledError(None))
    assert cancelled(ResponseFailed([Failure(ValueError()), Failure(CancelledError())]))
    assert not cancelled(ResponseFailed([Failure(ValueError())]))
    assert not cancelled(ConnectionRefusedError())


def test_while_connecting_is_only_a_cancellation_before_the_connection() -> None:
    assert while_connecting(ConnectingCancelledError(None))
    assert while_connecting(ResponseNeverReceived([Failure(ConnectingCancelledError(None))]))
    assert not while_connecting(CancelledError())
    assert not while_connecting(ResponseNeverReceived([Failure(CancelledError())]))


@pytest.mark.parametrize(
    ("error", "text"),
    [
        (ValueError("bad"), "ValueError: bad"),
        (CancelledError(), "CancelledError"),
        (
            ResponseFailed([Failure(ValueError("one")), Failure(KeyError("two"))]),
            "ResponseFailed(one, 'two')",
        ),
    ],
)
def test_describe_names_the_failure_and_its_wrapped_reasons(
    error: BaseException, text: str
) -> None:
    assert describe(error) == text


# --- the pooled client ------------------------------------------------------------------------


def test_the_pooled_client_keeps_connections_alive_and_bounds_connecting() -> None:
    reactor = MemoryReactorClock()
    http = pooled_http_client(reactor, connect_timeout=0.5, max_per_host=7)
    assert http.pool.persistent
    assert http.pool.maxPersistentPerHost == 7
    assert http.pool.retryAutomatically
    http.request("GET", "http://10.0.0.1:8081/")
    _host, port, _factory, timeout, _bind = reactor.tcpClients[0]
    assert (port, timeout) == (8081, 0.5)
    assert result_of(http.close()) is None


def test_the_pooled_client_keeps_twisteds_idle_connections_per_host_by_default() -> None:
    http = pooled_http_client(MemoryReactorClock(), connect_timeout=1.0)
    assert http.pool.maxPersistentPerHost == 2


# --- the plain path of the pooled client ------------------------------------------------------


class Echo(Resource):
    """Answers with what it got: method, path, the headers asked about, and the body."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        assert request.content is not None
        request.setResponseCode(201)
        seen = {
            "method": request.method.decode(),
            "uri": request.uri.decode(),
            "key": (request.getHeader(b"Idempotency-Key") or b"").decode(),
            "type": (request.getHeader(b"Content-Type") or b"").decode(),
            "body": request.content.read().decode(),
        }
        return repr(seen).encode()


def test_a_plain_request_goes_straight_to_the_agent_with_its_headers_and_body() -> None:
    client = PooledHTTPClient(RequestTraversalAgent(Echo()), None)
    headers = Headers({b"Idempotency-Key": [b"k-1"], b"Content-Type": [b"application/json"]})
    response = result_of(
        client.request(
            "POST",
            "http://chat.invalid:9001/v1/dialogs/2/messages",
            headers=headers,
            data=b'{"text": "hi"}',
            unbuffered=True,
            allow_redirects=False,
        )
    )
    assert response.code == 201
    assert result_of(read_body(response)).decode() == repr(
        {
            "method": "POST",
            "uri": "/v1/dialogs/2/messages",
            "key": "k-1",
            "type": "application/json",
            "body": '{"text": "hi"}',
        }
    )
    assert headers.getRawHeaders(b"Host") is None, "the caller's headers are left as they were"
    assert callable(response.json), "treq's response API is kept"


def test_a_request_with_treqs_other_options_takes_treqs_own_path() -> None:
    client = PooledHTTPClient(RequestTraversalAgent(Echo()), None)
    response = result_of(
        client.request("GET", "http://chat.invalid/v1/unread", params={"a": "1"}, unbuffered=True)
    )
    assert "'uri': '/v1/unread?a=1'" in result_of(read_body(response)).decode()


def test_a_bytes_producer_writes_the_whole_body_at_once() -> None:
    written: list[bytes] = []

    class Consumer:
        def write(self, data: bytes) -> None:
            written.append(data)

    producer = BytesProducer(b"abc")
    done = producer.startProducing(Consumer())
    assert (producer.length, written, result_of(done)) == (3, [b"abc"], None)
