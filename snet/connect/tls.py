"""TLS with Connect identities, for both ends of a call, built on pyOpenSSL.

Who checks what:

- **Server** (a chat instance), :class:`ConnectServerTLS`: presents its current leaf and
  *asks* for a client certificate verified against the current Connect roots, without
  *requiring* one at the TLS layer. A client that presents a certificate the roots do not
  vouch for (another CA, expired, not yet valid) fails the handshake; a client that
  presents none completes it and is answered by the HTTP layer: Consul's HTTP check reaches
  ``/health`` over TLS that way (``TLSSkipVerify``, no client certificate), while every
  ``/v1`` route needs :func:`peer_identity` and the authorizer's yes (401/403 otherwise).
  Sessions are neither cached nor resumed: every connection is verified in full against the
  roots of the moment.
- **Client** (the monolith), :class:`ConnectPolicyForHTTPS`: an ``IPolicyForHTTPS`` for
  ``twisted.web.client.Agent`` and the monolith's ``ChatWire`` that presents its current
  leaf and accepts a server only if the server's chain verifies against the current roots
  *and* its leaf's URI SAN is the expected service's SPIFFE id. Host names play no part:
  anyone may register any address in Consul; only the CA vouches for a name. Anything else
  fails the handshake with a :class:`PeerIdentityError`, raised from the certificate check
  itself, so the request (buffered by Twisted until the handshake is done) never leaves the
  process.

Both read the identity from an :class:`~snet.connect.identity.IdentitySource` for every new
connection, building an SSL context once per identity version: a renewed leaf or rotated
roots take effect for the next connection, and open connections are left alone.
"""

from __future__ import annotations

from collections.abc import Callable
from weakref import WeakKeyDictionary

from attrs import frozen
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
    ISSLTransport,
)
from twisted.logger import Logger
from twisted.web.client import RequestTransmissionFailed, ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from snet.connect.identity import (
    ConnectIdentity,
    IdentitySource,
    SpiffeServiceId,
    colon_hex,
    uri_sans,
)

__all__ = [
    "ConnectPolicyForHTTPS",
    "ConnectServerTLS",
    "NoConnectIdentity",
    "PeerIdentity",
    "PeerIdentityError",
    "identity_failure",
    "peer_identity",
]

log = Logger()

_MINIMUM_TLS = SSL.TLS1_2_VERSION


class _ConnectTLSError(SSL.Error):
    """A handshake failure of ours, shaped like OpenSSL's own errors.

    Twisted's TLS protocol reads ``args[0]`` of an ``SSL.Error`` as OpenSSL's error queue,
    a list of ``(library, function, reason)``: the message goes there.
    """

    def __init__(self, message: str) -> None:
        super().__init__([("snet.connect", "handshake", message)])
        self.message = message

    def __str__(self) -> str:
        return self.message


class PeerIdentityError(_ConnectTLSError):
    """The other end is not who it must be: its chain does not verify against the Connect
    roots, or its SPIFFE id is not the expected one. Raised during the handshake, before
    any application data is sent. ``expected`` and ``found`` are SPIFFE URIs (``found`` is
    None when the chain itself failed)."""

    def __init__(self, message: str, *, expected: str, found: str | None = None) -> None:
        super().__init__(message)
        self.expected = expected
        self.found = found


class NoConnectIdentity(_ConnectTLSError):
    """This process has no Connect identity yet (the agent has not answered): no TLS
    connection can be made or accepted until it has."""


def identity_failure(error: BaseException | None) -> SSL.Error | None:
    """The :class:`PeerIdentityError` or :class:`NoConnectIdentity` behind a failed
    request, however ``twisted.web.client`` wrapped it; None if the failure is another."""
    if isinstance(error, (PeerIdentityError, NoConnectIdentity)):
        return error
    if isinstance(error, (ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed)):
        for reason in error.reasons:
            found = identity_failure(reason.value)
            if found is not None:
                return found
    return None


def _store_roots(context: SSL.Context, identity: ConnectIdentity) -> None:
    store = context.get_cert_store()
    assert store is not None
    for root in identity.roots.certificates:
        store.add_cert(crypto.X509.from_cryptography(root))


def _base_context(identity: ConnectIdentity) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(_MINIMUM_TLS)
    # No renegotiation (TLS 1.2): a peer's certificate stays the one of its handshake.
    context.set_options(SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    context.use_certificate(identity.leaf.certificate)
    for intermediate in identity.leaf.chain[1:]:
        context.add_extra_chain_cert(intermediate)
    context.use_privatekey(identity.leaf.private_key)  # type: ignore[arg-type]
    context.check_privatekey()
    _store_roots(context, identity)
    return context


class _ContextCache:
    """One context per identity version: the latest is kept, older ones are dropped."""

    def __init__(self, build: Callable[[ConnectIdentity], SSL.Context]) -> None:
        self._build = build
        self._version: tuple[str, str] | None = None
        self._context: SSL.Context | None = None

    def get(self, identity: ConnectIdentity) -> SSL.Context:
        if self._context is None or self._version != identity.version:
            self._context = self._build(identity)
            self._version = identity.version
        return self._context


def _no_identity_context(expected: str) -> SSL.Context:
    """A context whose every handshake fails with NoConnectIdentity."""

    def refuse(*_: object) -> bool:
        raise NoConnectIdentity(f"no connect identity yet to verify {expected}")

    context = SSL.Context(SSL.TLS_METHOD)
    context.set_verify(SSL.VERIFY_PEER, refuse)
    return context


# --- the server side --------------------------------------------------------------------------


@implementer(IOpenSSLServerConnectionCreator)
class ConnectServerTLS:
    """Server TLS with the current Connect identity of *source* (see the module docstring).

    Use as the ``contextFactory`` of ``SSL4ServerEndpoint`` / ``TLSMemoryBIOFactory``.
    Listen only once ``source.identity`` is set: a connection accepted before that fails
    its handshake (a context without a certificate has nothing to offer), and a warning
    says why. Raising instead would make Twisted drop the listening port itself.
    """

    def __init__(self, source: IdentitySource) -> None:
        self._source = source
        self._contexts = _ContextCache(self._build)
        self._refusing: SSL.Context | None = None

    @staticmethod
    def _build(identity: ConnectIdentity) -> SSL.Context:
        context = _base_context(identity)
        # Ask for a client certificate, but let a client without one in: /health.
        context.set_verify(SSL.VERIFY_PEER, _chain_verified)
        for root in identity.roots.certificates:
            context.add_client_ca(root)
        return context

    def serverConnectionForTLS(self, tls_protocol: object) -> SSL.Connection:
        identity = self._source.identity
        if identity is None:
            if self._refusing is None:
                log.warn("no connect identity yet: refusing TLS connections until there is one")
                self._refusing = SSL.Context(SSL.TLS_METHOD)
            return SSL.Connection(self._refusing, None)
        self._refusing = None
        return SSL.Connection(self._contexts.get(identity), None)


def _chain_verified(
    connection: SSL.Connection, certificate: crypto.X509, error: int, depth: int, ok: int
) -> bool:
    return bool(ok)


@frozen
class PeerIdentity:
    """Who the other end of a TLS connection proved to be: its SPIFFE id and leaf serial."""

    spiffe_id: str
    serial: str

    @property
    def service_id(self) -> SpiffeServiceId | None:
        return SpiffeServiceId.parse(self.spiffe_id)


def peer_identity(transport: object) -> PeerIdentity | None:
    """The verified identity of the peer on *transport* (``request.transport``), or None.

    None unless *transport* is TLS, the peer presented a certificate, OpenSSL verified its
    chain against the Connect roots, and the certificate has exactly one URI SAN.
    """
    if not ISSLTransport.providedBy(transport):
        return None
    get_handle = getattr(transport, "getHandle", None)
    if get_handle is None:
        return None
    connection = get_handle()
    if not isinstance(connection, SSL.Connection):
        return None
    known = _PROVEN.get(connection)
    if known is None:
        known = _verified_peer(connection)
        if known is not None:
            _PROVEN[connection] = known
    return known


_PROVEN: WeakKeyDictionary[SSL.Connection, PeerIdentity] = WeakKeyDictionary()
"""The identity each open connection's peer proved, read once: a handshake's verified
certificate cannot change for the connection's life (renegotiation is off: ``_base_context``),
and reading it cost a request about a twentieth of a chat instance's CPU (the certificate
and its chain converted, the SAN parsed). Dropped with the connection."""


def _verified_peer(connection: SSL.Connection) -> PeerIdentity | None:
    certificate = connection.get_peer_certificate(as_cryptography=True)
    # The server's verify callback fails the handshake on a chain that does not verify; the
    # verified chain is checked as well, so that no other context's settings can change that.
    if certificate is None or not connection.get_verified_chain(as_cryptography=True):
        return None
    uris = uri_sans(certificate)
    if len(uris) != 1:
        return None
    return PeerIdentity(uris[0], colon_hex(certificate.serial_number))


# --- the client side --------------------------------------------------------------------------


@implementer(IOpenSSLClientConnectionCreator)
class _ClientConnections:
    def __init__(self, context: SSL.Context) -> None:
        self._context = context

    def clientConnectionForTLS(self, tls_protocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_connect_state()
        return connection


def _expect_server(expected: str) -> Callable[[SSL.Connection, crypto.X509, int, int, int], bool]:
    def verify(
        connection: SSL.Connection, certificate: crypto.X509, error: int, depth: int, ok: int
    ) -> bool:
        if not ok:
            subject = certificate.to_cryptography().subject.rfc4514_string()
            raise PeerIdentityError(
                f"the server's certificate chain does not verify against the connect roots"
                f" (OpenSSL error {error} at depth {depth}, {subject or 'no subject'})",
                expected=expected,
            )
        if depth == 0:
            found = uri_sans(certificate.to_cryptography())
            if found != [expected]:
                raise PeerIdentityError(
                    f"the server is {', '.join(found) or 'nobody'}, not {expected}",
                    expected=expected,
                    found=found[0] if found else None,
                )
        return True

    return verify


@implementer(IPolicyForHTTPS)
class ConnectPolicyForHTTPS:
    """Client TLS for ``Agent(reactor, contextFactory=...)``: present *source*'s current
    leaf, accept only a server with *service*'s SPIFFE id (see the module docstring).

    The expected id is ``spiffe://<trust domain>/ns/default/dc/<dc>/svc/<service>`` with the
    trust domain of the current roots and the datacenter of this process's own leaf.
    """

    def __init__(self, source: IdentitySource, service: str = "snet-chat") -> None:
        self._source = source
        self.service = service
        self._contexts = _ContextCache(self._build)

    def expected_id(self) -> str | None:
        """The SPIFFE id a server must have now (None before there is an identity)."""
        identity = self._source.identity
        return None if identity is None else identity.peer_id(self.service).uri

    def _build(self, identity: ConnectIdentity) -> SSL.Context:
        context = _base_context(identity)
        context.set_verify(SSL.VERIFY_PEER, _expect_server(identity.peer_id(self.service).uri))
        return context

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        identity = self._source.identity
        if identity is None:
            return _ClientConnections(_no_identity_context(self.service))
        return _ClientConnections(self._contexts.get(identity))
