"""SO_REUSEPORT listeners on the real reactor: two of them share one port, and both get
connections; the endpoint strings it accepts."""

from __future__ import annotations

import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread

from snet.testing.servers import free_port
from snet.web.reuseport import ReusePortEndpoint, reuse_port_endpoint

pytestmark = pytest.mark.integration


class Named(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.factory.name)  # type: ignore[attr-defined]
        self.transport.loseConnection()


def named_factory(name: bytes) -> Factory:
    factory = Factory.forProtocol(Named)
    factory.name = name  # type: ignore[attr-defined]
    return factory


def ask(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
        return connection.recv(16)


@pytest_twisted.inlineCallbacks
def test_two_listeners_share_one_port_and_the_kernel_spreads_connections_over_both() -> None:
    port = free_port()
    endpoint = reuse_port_endpoint(reactor, f"tcp:{port}:interface=127.0.0.1")
    first = yield endpoint.listen(named_factory(b"first"))
    second = yield endpoint.listen(named_factory(b"second"))
    try:
        assert first.getHost().port == second.getHost().port == port
        seen: set[bytes] = set()
        for _ in range(60):
            seen.add((yield deferToThread(ask, port)))
            if seen == {b"first", b"second"}:
                break
        assert seen == {b"first", b"second"}
    finally:
        yield first.stopListening()
        yield second.stopListening()


@pytest_twisted.inlineCallbacks
def test_a_port_taken_without_reuse_port_fails_the_listen() -> None:
    plain = socket.socket()
    plain.bind(("127.0.0.1", 0))
    plain.listen()
    try:
        endpoint = ReusePortEndpoint(reactor, plain.getsockname()[1], "127.0.0.1")
        with pytest.raises(OSError):
            yield endpoint.listen(named_factory(b"x"))
    finally:
        plain.close()


@pytest.mark.parametrize(
    "description",
    ["unix:/tmp/s", "tcp:", "tcp:http", "tcp:80:reuse=1", "tcp:80:backlog=0", "tcp:70000"],
)
def test_only_tcp_port_strings_with_interface_and_backlog_are_accepted(description: str) -> None:
    with pytest.raises(ValueError):
        reuse_port_endpoint(reactor, description)


def test_a_tcp_string_gives_its_port_interface_and_backlog() -> None:
    endpoint = reuse_port_endpoint(reactor, "tcp:8080:interface=127.0.0.1:backlog=128")
    assert (endpoint.port, endpoint.interface, endpoint.backlog) == (8080, "127.0.0.1", 128)
