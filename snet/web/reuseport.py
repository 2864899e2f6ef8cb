"""Listening with ``SO_REUSEPORT``: several processes of one service on one host share a port.

Each process opens its own listening socket on the same address and port with
``SO_REUSEPORT`` set; Linux then spreads new connections over the sockets of the processes
(by a hash of the connection's addresses), and a process that exits takes only its own
socket away. That is how the monolith scales out on one host without a front process:
start N ``twistd snet-server --reuse-port`` with the same ``--listen`` and each its own
``--admin-listen``. Every process has its own discovery and balancer (which starts at a
random position: ``snet.server.roundrobin``).

Only TCP endpoint strings are accepted (``tcp:PORT[:interface=ADDR][:backlog=N]``): the
socket is made here and handed to the reactor (``adoptStreamPort``).
"""

from __future__ import annotations

import socket
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from zope.interface import implementer

__all__ = ["ReusePortEndpoint", "reuse_port_endpoint"]

DEFAULT_BACKLOG = 50
"""Twisted's own default backlog for TCP endpoints."""


@implementer(IStreamServerEndpoint)
@frozen
class ReusePortEndpoint:
    """A TCP server endpoint on *interface*:*port* whose socket has ``SO_REUSEPORT``."""

    reactor: Any
    port: int
    interface: str = ""
    backlog: int = DEFAULT_BACKLOG

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:  # noqa: N803
        family = socket.AF_INET6 if ":" in self.interface else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            port: IListeningPort = self.reactor.adoptStreamPort(
                sock.fileno(), family, protocolFactory
            )
        except OSError as e:
            return fail(e)
        finally:
            sock.close()  # the reactor holds a duplicate of the descriptor
        return succeed(port)


def reuse_port_endpoint(reactor: Any, description: str) -> ReusePortEndpoint:
    """The ``SO_REUSEPORT`` endpoint for a ``tcp:PORT[:interface=ADDR][:backlog=N]`` string.

    :raises ValueError: for any other endpoint string.
    """
    kind, _, rest = description.partition(":")
    if kind != "tcp" or not rest:
        raise ValueError(f"{description!r}: only tcp:PORT endpoints can share a port")
    port_text, *options = rest.split(":")
    named: dict[str, str] = {}
    for option in options:
        key, equals, value = option.partition("=")
        if not equals or key not in ("interface", "backlog"):
            raise ValueError(f"{description!r}: only interface= and backlog= are understood")
        named[key] = value
    try:
        port = int(port_text)
        backlog = int(named.get("backlog", DEFAULT_BACKLOG))
    except ValueError:
        raise ValueError(f"{description!r}: the port and backlog must be numbers") from None
    if not 0 <= port <= 65535 or backlog < 1:
        raise ValueError(f"{description!r}: no such port or backlog")
    return ReusePortEndpoint(reactor, port, named.get("interface", ""), backlog)
