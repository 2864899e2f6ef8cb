"""Unit tests of snet.web.limits: each limit of a LimitedSite, driven byte by byte over an
in-memory transport with a fake clock (no sockets, no running reactor)."""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from snet.web.errors import ErrorCode
from snet.web.limits import (
    HTTPLimits,
    LimitedChannel,
    LimitedSite,
)

LIMITS = HTTPLimits(
    max_body=1000,
    header_timeout=10.0,
    body_timeout=30.0,
    idle_timeout=60.0,
    max_connections=3,
)


class Echo(Resource):
    """Answers with what it saw: method, query/form args, body length; ``/hold`` never
    answers (until the test finishes it)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []
        self.bodies: list[Any] = []

    def render(self, request: Any) -> Any:
        self.seen.append(request)
        if request.path == b"/hold":
            return NOT_DONE_YET
        body = request.content.read() if request.content is not None else b""
        self.bodies.append((type(request.content), body))
        args = {k.decode(): [v.decode() for v in vs] for k, vs in request.args.items()}
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps(
            {"method": request.method.decode(), "args": args, "length": len(body)}
        ).encode()


class Connection:
    """One client connection to a LimitedSite, in memory."""

    def __init__(self, site: LimitedSite, port: int = 40000) -> None:
        self.transport = StringTransport(
            peerAddress=IPv4Address("TCP", "10.0.0.1", port),
            hostAddress=IPv4Address("TCP", "127.0.0.1", 8080),
        )
        channel = site.buildProtocol(IPv4Address("TCP", "10.0.0.1", port))
        assert isinstance(channel, LimitedChannel)
        self.channel = channel
        channel.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        self.channel.dataReceived(data)

    @property
    def received(self) -> bytes:
        return self.transport.value()

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    def lose(self) -> None:
        from twisted.internet.error import ConnectionDone
        from twisted.python.failure import Failure

        self.channel.connectionLost(Failure(ConnectionDone()))

    def status_and_body(self) -> tuple[int, bytes, dict[bytes, bytes]]:
        head, _, body = self.received.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = dict(line.split(b": ", 1) for line in lines[1:])
        return status, body, headers


@pytest.fixture
def clock() -> MemoryReactorClock:
    return MemoryReactorClock()


@pytest.fixture
def echo() -> Echo:
    return Echo()


@pytest.fixture
def site(echo: Echo, clock: MemoryReactorClock) -> LimitedSite:
    return LimitedSite(echo, LIMITS, reactor=clock)


def post(length: int, extra: bytes = b"") -> bytes:
    return (
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n%s\r\n" % (length, extra)
    )


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# --- body size ---------------------------------------------------------------------------


def test_a_content_length_over_the_limit_is_refused_413_before_any_body_is_read(
    site: LimitedSite, echo: Echo
) -> None:
    conn = Connection(site)
    conn.send(post(20_000_000, b"Expect: 100-continue\r\nX-Request-ID: abc-1\r\n"))
    status, body, headers = conn.status_and_body()
    assert status == 413
    assert b"100 Continue" not in conn.received
    assert json.loads(body) == {
        "message": "the body is over 1000 bytes",
        "request_id": "abc-1",
        "code": ErrorCode.CONTENT_TOO_LARGE,
    }
    assert headers[b"Content-Type"] == b"application/json"
    assert headers[b"Connection"] == b"close"
    assert headers[b"X-Request-ID"] == b"abc-1"
    assert conn.closed
    conn.send(b"x" * 5000)  # the body that follows is dropped unread
    assert echo.seen == []
    assert conn.channel.requests[-1].content is None


def test_a_body_at_the_limit_is_read_into_memory_and_answered(
    site: LimitedSite, echo: Echo
) -> None:
    conn = Connection(site)
    conn.send(post(1000) + b"x" * 1000)
    status, body, _ = conn.status_and_body()
    assert status == 200
    assert json.loads(body)["length"] == 1000
    assert echo.bodies[0] == (BytesIO, b"x" * 1000)
    assert not conn.closed


def test_a_refused_request_id_is_made_up_when_the_client_gave_none_or_a_bad_one(
    site: LimitedSite,
) -> None:
    conn = Connection(site)
    conn.send(post(5000, b"X-Request-ID: no spaces allowed\r\n"))
    _, body, headers = conn.status_and_body()
    rid = json.loads(body)["request_id"]
    assert len(rid) == 32 and headers[b"X-Request-ID"] == rid.encode()


def chunked_post() -> bytes:
    return (
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )


def test_a_chunked_body_is_cut_off_with_413_as_soon_as_it_passes_the_limit(
    site: LimitedSite, echo: Echo
) -> None:
    conn = Connection(site)
    conn.send(chunked_post())
    conn.send(chunk(b"a" * 600))
    assert conn.received == b"" and not conn.closed
    conn.send(chunk(b"b" * 401))
    status, body, _ = conn.status_and_body()
    assert status == 413
    assert json.loads(body)["code"] == ErrorCode.CONTENT_TOO_LARGE
    assert conn.closed
    conn.send(chunk(b"c" * 10) + b"0\r\n\r\n")
    assert echo.seen == []


def test_a_chunked_body_within_the_limit_is_answered(site: LimitedSite) -> None:
    conn = Connection(site)
    conn.send(chunked_post() + chunk(b"a" * 600) + chunk(b"b" * 400) + b"0\r\n\r\n")
    status, body, _ = conn.status_and_body()
    assert status == 200
    assert json.loads(body)["length"] == 1000


def test_the_over_limit_chunk_in_the_same_packet_as_the_end_never_reaches_the_app(
    site: LimitedSite, echo: Echo
) -> None:
    conn = Connection(site)
    conn.send(chunked_post() + chunk(b"a" * 1001) + b"0\r\n\r\n")
    assert conn.status_and_body()[0] == 413
    assert echo.seen == []


def test_form_bodies_are_not_parsed_args_hold_the_query_only(site: LimitedSite, echo: Echo) -> None:
    conn = Connection(site)
    form = b"a=1&b=2"
    conn.send(
        b"POST /login?q=3 HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(form), form)
    )
    assert json.loads(conn.status_and_body()[1])["args"] == {"q": ["3"]}
    assert echo.bodies[0] == (BytesIO, form)


# --- deadlines ---------------------------------------------------------------------------


def test_a_client_trickling_header_bytes_is_closed_with_408_at_the_header_deadline(
    site: LimitedSite, clock: MemoryReactorClock
) -> None:
    conn = Connection(site)
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"y" * 100
    for second, byte in enumerate(request[:9]):
        conn.send(bytes([byte]))
        clock.advance(1)  # each byte resets the idle timeout, not the deadline
        assert not conn.closed, second
    clock.advance(0.9)
    assert not conn.closed
    clock.advance(0.2)
    status, body, _ = conn.status_and_body()
    assert status == 408
    assert json.loads(body)["code"] == ErrorCode.REQUEST_TIMEOUT
    assert conn.closed


def test_a_connection_that_sends_nothing_is_closed_at_the_header_deadline(
    site: LimitedSite, clock: MemoryReactorClock
) -> None:
    conn = Connection(site)
    clock.advance(LIMITS.header_timeout)
    assert conn.closed
    assert conn.status_and_body()[0] == 408


def test_a_closed_refusal_is_aborted_when_the_client_does_not_read(
    site: LimitedSite, clock: MemoryReactorClock
) -> None:
    conn = Connection(site)
    clock.advance(LIMITS.header_timeout)
    assert conn.closed and not conn.transport.disconnected
    clock.advance(conn.channel.abortTimeout)
    assert conn.transport.disconnected


def test_the_header_deadline_of_a_kept_alive_connection_starts_at_the_next_request(
    site: LimitedSite, clock: MemoryReactorClock
) -> None:
    conn = Connection(site)
    conn.send(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    assert conn.status_and_body()[0] == 200
    conn.transport.clear()
    clock.advance(LIMITS.idle_timeout - 1)  # idle between requests: not a deadline
    assert not conn.closed
    conn.send(b"GET /b HTTP/1.1\r\n")
    clock.advance(LIMITS.header_timeout - 0.5)
    assert not conn.closed
    clock.advance(1)
    assert conn.closed
    assert conn.status_and_body()[0] == 408


def test_a_body_trickling_past_the_body_deadline_gets_408(
    site: LimitedSite, clock: MemoryReactorClock, echo: Echo
) -> None:
    conn = Connection(site)
    conn.send(post(100))
    for _ in range(29):
        conn.send(b"x")
        clock.advance(1)
    assert not conn.closed
    clock.advance(1)
    assert conn.status_and_body()[0] == 408
    assert conn.closed
    assert echo.seen == []


def test_a_request_being_answered_is_not_cut_by_any_deadline(
    site: LimitedSite, clock: MemoryReactorClock, echo: Echo
) -> None:
    conn = Connection(site)
    conn.send(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    clock.advance(LIMITS.body_timeout + LIMITS.header_timeout + LIMITS.idle_timeout)
    assert not conn.closed and conn.received == b""
    request = echo.seen[0]
    request.write(b"late")
    request.finish()
    assert conn.status_and_body()[0] == 200


def test_no_deadline_is_left_behind_when_the_connection_ends(
    site: LimitedSite, clock: MemoryReactorClock
) -> None:
    conn = Connection(site)
    conn.send(post(100) + b"x" * 10)
    conn.lose()
    assert all(not call.active() for call in clock.getDelayedCalls())


# --- connections and headers ---------------------------------------------------------------


def test_connections_beyond_the_cap_are_closed_at_once_until_one_ends(
    site: LimitedSite,
) -> None:
    conns = [Connection(site, port) for port in range(3)]
    assert site.open_connections == 3
    addr = IPv4Address("TCP", "10.0.0.9", 1)
    assert site.buildProtocol(addr) is None
    assert site.buildProtocol(addr) is None
    assert site.refused_connections == 2
    conns[0].lose()
    assert site.open_connections == 2
    assert site.buildProtocol(addr) is not None


def test_every_response_says_server_snet_without_a_version(site: LimitedSite) -> None:
    conn = Connection(site)
    conn.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert conn.status_and_body()[2][b"Server"] == b"snet"
    assert b"Twisted" not in conn.received


def test_too_many_header_lines_are_refused_by_twisted_with_400(site: LimitedSite) -> None:
    conn = Connection(site)
    conn.send(b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * 101 + b"\r\n")
    assert conn.received.startswith(b"HTTP/1.1 400")
    assert conn.closed


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        HTTPLimits(max_body=0)
    with pytest.raises(ValueError):
        HTTPLimits(header_timeout=-1)
