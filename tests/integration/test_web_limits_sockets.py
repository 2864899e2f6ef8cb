"""Integration tests of snet.web.limits on real loopback sockets: a slow-header client is closed
at the header deadline while another client is answered, a 20 MB upload is refused before
1 MB of it is read, and connections over the cap are closed at once."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.web.resource import Resource

from snet.web.limits import HTTPLimits, LimitedChannel, LimitedSite

pytestmark = pytest.mark.integration

MB = 1024 * 1024


class Health(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return b'{"status":"ok"}'


class CountingChannel(LimitedChannel):
    """Counts every byte the server reads from its clients."""

    def dataReceived(self, data: bytes) -> None:
        self.site.bytes_read += len(data)  # type: ignore[attr-defined]
        super().dataReceived(data)


class CountingSite(LimitedSite):
    protocol = CountingChannel
    bytes_read = 0


class Client(Protocol):
    """A raw HTTP client: sends what it is told, keeps what it gets, notes when it closes."""

    def __init__(self) -> None:
        self.received = b""
        self.closed: Deferred[float] = Deferred()
        self.opened_at = 0.0

    def connectionMade(self) -> None:
        self.opened_at = time.monotonic()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed.callback(time.monotonic() - self.opened_at)


@pytest_twisted.async_yield_fixture
async def listening() -> AsyncIterator[tuple[CountingSite, int]]:
    site = CountingSite(
        Health(), HTTPLimits(header_timeout=1.0, max_body=64 * 1024, max_connections=4)
    )
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    try:
        yield site, port.getHost().port
    finally:
        await port.stopListening()
        for channel in list(site._open):
            assert channel.transport is not None
            channel.transport.abortConnection()


async def connect(port: int) -> Client:
    endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port)
    client: Client = await connectProtocol(endpoint, Client())
    return client


@pytest_twisted.ensureDeferred
async def test_a_slow_header_client_is_closed_at_the_deadline_while_another_is_answered(
    listening: tuple[CountingSite, int],
) -> None:
    _site, port = listening
    slow = await connect(port)
    request = iter(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"z" * 1000)
    assert slow.transport is not None
    trickle = LoopingCall(lambda: slow.transport.write(bytes([next(request)])))  # type: ignore[union-attr]
    trickle.start(0.2)
    try:
        normal = await connect(port)
        assert normal.transport is not None
        normal.transport.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        await normal.closed
        assert normal.received.startswith(b"HTTP/1.1 200")
        assert normal.received.endswith(b'{"status":"ok"}')
        assert b"Server: snet\r\n" in normal.received
        assert not slow.closed.called

        lived = await slow.closed
    finally:
        trickle.stop()
    assert 1.0 <= lived < 1.8, lived
    assert slow.received.startswith(b"HTTP/1.1 408")


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_20_mb_upload_is_refused_before_1_mb_of_it_is_read(
    listening: tuple[CountingSite, int], framing: str
) -> None:
    site, port = listening
    client = await connect(port)
    assert client.transport is not None
    body = b"x" * (20 * MB)
    if framing == "chunked":
        head = b"Transfer-Encoding: chunked"
        chunk = b"x" * (64 * 1024)
        body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(320))
    else:
        head = b"Content-Length: %d" % len(body)
    client.transport.write(
        b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + head
        + b"\r\n\r\n"
        + body
    )
    await client.closed
    assert site.bytes_read < MB, site.bytes_read
    if client.received:  # a reset may overtake the answer on the client's side
        assert client.received.startswith(b"HTTP/1.1 413")


@pytest_twisted.ensureDeferred
async def test_connections_over_the_cap_are_closed_at_once(
    listening: tuple[CountingSite, int],
) -> None:
    site, port = listening
    held = [await connect(port) for _ in range(4)]
    extra = await connect(port)
    lived = await extra.closed
    assert extra.received == b""
    assert lived < 0.5
    assert site.refused_connections >= 1
    for client in held:
        assert not client.closed.called
