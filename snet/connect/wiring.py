"""What both services' taps share to speak Connect: the ``--insecure-plaintext`` switch,
the identity watcher, and the TLS listener.

By default both services speak Connect (docs/trust.md): each keeps a
:class:`~snet.connect.watcher.CertificateWatcher` for its own service name, started before
it listens; a chat instance serves its port over TLS only (:func:`connect_endpoint`), and the
monolith calls chat instances over TLS. ``--insecure-plaintext`` (or
``SNET_INSECURE_PLAINTEXT=1``) turns all of it off on one service: plain HTTP, no
certificates, every caller trusted. Both ends must agree (a plaintext monolith cannot talk to
a TLS chat instance, nor the reverse); the option exists for a trusted network, a proxy that
terminates nothing, or a local try, and each service says so in a warning when it starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from zope.interface import implementer

from snet.connect.identity import IdentitySource
from snet.connect.tls import ConnectServerTLS
from snet.connect.watcher import CertificateWatcher
from snet.consul import TreqConsul
from snet.options import flag_or_environment

__all__ = [
    "MONOLITH_SERVICE",
    "PLAINTEXT_ENVIRONMENT",
    "PLAINTEXT_FLAG",
    "ConnectServerEndpoint",
    "certificate_watcher",
    "connect_endpoint",
    "insecure_plaintext",
    "warn_insecure_plaintext",
]

log = Logger()

MONOLITH_SERVICE = "snet-server"
"""The monolith's Connect service name: its certificate's SPIFFE id, what intentions name."""

PLAINTEXT_ENVIRONMENT = "SNET_INSECURE_PLAINTEXT"
"""The environment variable of ``--insecure-plaintext`` (``1``, ``true``, ``yes`` or ``on``)."""

PLAINTEXT_FLAG = [
    "insecure-plaintext",
    None,
    "Speak plain HTTP to/from chat instances, without Connect certificates or intentions: any "
    "process that reaches the port is trusted (env SNET_INSECURE_PLAINTEXT=1). The monolith "
    "and the chat instances must agree. For a trusted network or a local try only.",
]
"""The ``optFlags`` entry both taps list."""


def insecure_plaintext(flag: object, environ: Mapping[str, str]) -> bool:
    """Whether plaintext was asked for: the flag, else ``SNET_INSECURE_PLAINTEXT``."""
    return flag_or_environment(flag, environ, PLAINTEXT_ENVIRONMENT)


def warn_insecure_plaintext(what: str) -> None:
    """Say at start that *what* goes without Connect."""
    log.warn(
        "--insecure-plaintext: {what} in plain HTTP, without Connect certificates or"
        " intentions; any process that reaches it is trusted",
        what=what,
    )


def certificate_watcher(
    consul: TreqConsul, service: str, clock: IReactorTime
) -> CertificateWatcher:
    """The watcher of *service*'s Connect identity from the local agent behind *consul*."""
    return CertificateWatcher(consul=consul, service=service, clock=clock)


@implementer(IStreamServerEndpoint)
class ConnectServerEndpoint:
    """An endpoint that serves every connection of another over Connect TLS with the
    identity of *source* (:class:`~snet.connect.tls.ConnectServerTLS`): listen only once
    *source* has one."""

    def __init__(self, endpoint: IStreamServerEndpoint, source: IdentitySource) -> None:
        self.endpoint = endpoint
        self.source = source

    def listen(self, protocolFactory: Any) -> Deferred[IListeningPort]:  # noqa: N803
        listening: Deferred[IListeningPort] = self.endpoint.listen(
            TLSMemoryBIOFactory(ConnectServerTLS(self.source), False, protocolFactory)
        )
        return listening


def connect_endpoint(
    endpoint: IStreamServerEndpoint, source: IdentitySource
) -> IStreamServerEndpoint:
    """*endpoint*, over Connect TLS with *source*'s identity."""
    return ConnectServerEndpoint(endpoint, source)
