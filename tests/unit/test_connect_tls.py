"""Connect identities and TLS: certificates made here, handshakes over memory BIOs.

Each test builds a chat-like server (ConnectServerTLS) and a monolith-like client
(ConnectPolicyForHTTPS) from identities of an in-memory CA and runs the TLS handshake
between them, byte by byte, with no socket and no reactor.
"""

from __future__ import annotations

import contextlib

import pytest
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import ISSLTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from zope.interface import implementer

from snet.connect import (
    ConnectAnswerError,
    ConnectIdentity,
    ConnectPolicyForHTTPS,
    ConnectServerTLS,
    FixedIdentity,
    Leaf,
    NoConnectIdentity,
    PeerIdentity,
    PeerIdentityError,
    Roots,
    SpiffeServiceId,
    identity_failure,
    peer_identity,
)
from snet.connect.identity import colon_hex
from snet.testing.connect import TestCA

CHAT = "snet-chat"
SERVER = "snet-server"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture(scope="module")
def other_ca(ca: TestCA) -> TestCA:
    """Another CA of the same trust domain: a rogue one, or the next after a rotation."""
    return TestCA(trust_domain=ca.trust_domain)


def handshake(server: SSL.Connection, client: SSL.Connection) -> None:
    """Run the TLS handshake between two memory-BIO connections; raises what either raises."""
    server.set_accept_state()
    client.set_connect_state()
    done = {id(server): False, id(client): False}
    for _ in range(20):
        for connection, peer in ((client, server), (server, client)):
            if not done[id(connection)]:
                try:
                    connection.do_handshake()
                    done[id(connection)] = True
                except SSL.WantReadError:
                    pass
            try:
                data = connection.bio_read(65536)
            except SSL.WantReadError:
                continue
            peer.bio_write(data)
        if all(done.values()):
            # TLS 1.3: the server verifies the client's certificate on its last read.
            with contextlib.suppress(SSL.WantReadError):
                server.recv(1)
            return
    raise AssertionError("the handshake did not finish")


@implementer(ISSLTransport)
class TLSTransport:
    """Just what peer_identity reads from a request's transport."""

    def __init__(self, connection: SSL.Connection) -> None:
        self.connection = connection

    def getHandle(self) -> SSL.Connection:
        return self.connection

    def getPeerCertificate(self) -> object:
        return self.connection.get_peer_certificate()


def connect(
    server_identity: ConnectIdentity | None,
    client_identity: ConnectIdentity | None,
    *,
    client_cert: bool = True,
) -> tuple[SSL.Connection, SSL.Connection]:
    """Handshake a chat server with a monolith client; returns (server, client) connections."""
    server = ConnectServerTLS(FixedIdentity(server_identity)).serverConnectionForTLS(None)
    policy = ConnectPolicyForHTTPS(FixedIdentity(client_identity), CHAT)
    client = policy.creatorForNetloc(b"10.0.0.1", 8443).clientConnectionForTLS(None)
    if not client_cert:
        assert client_identity is not None
        bare = SSL.Context(SSL.TLS_METHOD)
        for root in client_identity.roots.certificates:
            bare.get_cert_store().add_cert(crypto.X509.from_cryptography(root))
        client = SSL.Connection(bare, None)
    handshake(server, client)
    return server, client


# --- identities -----------------------------------------------------------------------------


def test_a_spiffe_service_id_round_trips_through_its_uri() -> None:
    parsed = SpiffeServiceId.parse("spiffe://abc.consul/ns/default/dc/dc1/svc/snet-chat")
    assert parsed == SpiffeServiceId("abc.consul", "dc1", "snet-chat")
    assert parsed.uri == "spiffe://abc.consul/ns/default/dc/dc1/svc/snet-chat"
    assert parsed.sibling(SERVER).uri.endswith("/dc/dc1/svc/snet-server")
    assert SpiffeServiceId.parse("spiffe://abc.consul/ns/default/dc/dc1/svc/a/b") is None
    assert SpiffeServiceId.parse("https://abc.consul/ns/default/dc/dc1/svc/x") is None


def test_serials_are_written_as_consul_writes_them() -> None:
    assert colon_hex(8) == "08"
    assert colon_hex(0x3A0F01) == "3a:0f:01"


def test_an_identity_is_read_from_the_agents_answers(ca: TestCA) -> None:
    identity = ConnectIdentity(
        Leaf.from_consul(ca.consul_leaf(CHAT), CHAT), Roots.from_consul(ca.consul_roots())
    )
    assert identity.spiffe_id == ca.spiffe_id(CHAT)
    assert identity.trust_domain == ca.trust_domain
    assert identity.peer_id(SERVER).uri == ca.spiffe_id(SERVER).uri
    assert identity.roots.certificates == (ca.certificate,)


def test_a_leaf_for_another_service_or_trust_domain_is_refused(ca: TestCA) -> None:
    with pytest.raises(ConnectAnswerError, match="not snet-server"):
        Leaf.from_consul(ca.consul_leaf(CHAT), SERVER)
    with pytest.raises(ConnectAnswerError, match="trust domain"):
        ConnectIdentity(ca.leaf(CHAT), TestCA().roots())


@pytest.mark.parametrize(
    "answer",
    [None, [], {}, {"CertPEM": "x", "PrivateKeyPEM": "y"}, {"CertPEM": "", "PrivateKeyPEM": ""}],
)
def test_a_malformed_leaf_answer_is_an_error(answer: object) -> None:
    with pytest.raises(ConnectAnswerError):
        Leaf.from_consul(answer)


def test_a_leaf_whose_key_is_not_its_own_is_refused(ca: TestCA) -> None:
    one, other = ca.consul_leaf(CHAT), ca.consul_leaf(CHAT)
    with pytest.raises(ConnectAnswerError, match="does not match"):
        Leaf.from_consul({**one, "PrivateKeyPEM": other["PrivateKeyPEM"]})


@pytest.mark.parametrize("answer", [None, {}, {"Roots": []}, {"Roots": [{}], "TrustDomain": "x"}])
def test_a_malformed_roots_answer_is_an_error(answer: object) -> None:
    with pytest.raises(ConnectAnswerError):
        Roots.from_consul(answer)


# --- handshakes ------------------------------------------------------------------------------


def test_a_client_and_server_of_one_ca_accept_each_other(ca: TestCA) -> None:
    chat, monolith = ca.identity(CHAT), ca.identity(SERVER)
    server, _ = connect(chat, monolith)
    peer = peer_identity(TLSTransport(server))
    assert peer == PeerIdentity(ca.spiffe_id(SERVER).uri, monolith.leaf.serial)
    assert peer.service_id == ca.spiffe_id(SERVER)


def test_a_peers_identity_is_read_once_per_connection(ca: TestCA) -> None:
    server, _ = connect(ca.identity(CHAT), ca.identity(SERVER))
    first = peer_identity(TLSTransport(server))
    assert first is not None
    assert peer_identity(TLSTransport(server)) is first
    other, _ = connect(ca.identity(CHAT), ca.identity(SERVER))
    assert peer_identity(TLSTransport(other)) not in (None, first)  # another leaf's serial


def test_a_client_cannot_renegotiate_the_identity_it_proved(ca: TestCA) -> None:
    """What lets the proved identity be read once: a TLS 1.2 client that asks to
    renegotiate is refused (OpenSSL 3 refuses by default; the server says so itself)."""
    monolith = ca.identity(SERVER)
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)
    context.use_certificate(monolith.leaf.certificate)
    context.use_privatekey(monolith.leaf.private_key)  # type: ignore[arg-type]
    client = SSL.Connection(context, None)
    server = ConnectServerTLS(FixedIdentity(ca.identity(CHAT))).serverConnectionForTLS(None)
    handshake(server, client)
    proved = peer_identity(TLSTransport(server))
    assert client.get_protocol_version_name() == "TLSv1.2" and proved is not None
    assert client.renegotiate()
    with contextlib.suppress(SSL.WantReadError):
        client.do_handshake()
    server.bio_write(client.bio_read(65536))
    with contextlib.suppress(SSL.WantReadError):
        server.recv(1)
    client.bio_write(server.bio_read(65536))
    with pytest.raises(SSL.Error, match="no renegotiation"):
        client.do_handshake()
    assert server.total_renegotiations() == 0
    assert peer_identity(TLSTransport(server)) == proved


def test_a_client_without_a_certificate_completes_the_handshake_but_proves_nobody(
    ca: TestCA,
) -> None:
    server, _ = connect(ca.identity(CHAT), ca.identity(SERVER), client_cert=False)
    assert peer_identity(TLSTransport(server)) is None


def test_a_plaintext_transport_proves_nobody() -> None:
    assert peer_identity(object()) is None
    assert peer_identity(None) is None


@pytest.mark.parametrize("problem", ["other CA", "expired"])
def test_a_client_certificate_the_roots_do_not_vouch_for_fails_the_handshake(
    ca: TestCA, other_ca: TestCA, problem: str
) -> None:
    client = other_ca.identity(SERVER, trusted=[ca]) if problem == "other CA" else None
    if client is None:
        client = ca.identity(SERVER, expired=True)
    with pytest.raises(SSL.Error) as raised:
        connect(ca.identity(CHAT), client)
    assert not isinstance(raised.value, PeerIdentityError)  # the server refused


def test_a_server_of_another_ca_fails_the_clients_handshake(ca: TestCA, other_ca: TestCA) -> None:
    with pytest.raises(PeerIdentityError, match="does not verify") as raised:
        connect(other_ca.identity(CHAT, trusted=[ca]), ca.identity(SERVER))
    assert raised.value.expected == ca.spiffe_id(CHAT).uri
    assert raised.value.found is None


def test_an_expired_server_certificate_fails_the_clients_handshake(ca: TestCA) -> None:
    with pytest.raises(PeerIdentityError, match="does not verify"):
        connect(ca.identity(CHAT, expired=True), ca.identity(SERVER))


def test_a_server_with_another_services_id_fails_the_clients_handshake(ca: TestCA) -> None:
    """A rogue instance registered as snet-chat, with a valid certificate of its own."""
    with pytest.raises(PeerIdentityError, match="not spiffe://") as raised:
        connect(ca.identity("rogue"), ca.identity(SERVER))
    assert raised.value.found == ca.spiffe_id("rogue").uri


def test_a_server_without_a_spiffe_id_fails_the_clients_handshake(ca: TestCA) -> None:
    leaf = ca.leaf(CHAT, uris=[])
    with pytest.raises(PeerIdentityError, match="nobody"):
        connect(ConnectIdentity(leaf, ca.roots()), ca.identity(SERVER))


def test_no_identity_yet_refuses_both_ends(ca: TestCA) -> None:
    with capturedLogs() as events, pytest.raises(SSL.Error):
        connect(None, ca.identity(SERVER))
    assert ["no connect identity" in e["log_format"] for e in events] == [True]
    with pytest.raises(NoConnectIdentity):
        connect(ca.identity(CHAT), None)
    assert ConnectPolicyForHTTPS(FixedIdentity()).expected_id() is None


def test_a_rotation_takes_effect_for_new_connections(ca: TestCA, other_ca: TestCA) -> None:
    """Roots and leaves swapped in the sources: the next handshakes use the new ones."""
    chat = FixedIdentity(ca.identity(CHAT))
    monolith = FixedIdentity(ca.identity(SERVER))
    server_tls = ConnectServerTLS(chat)
    policy = ConnectPolicyForHTTPS(monolith, CHAT)

    def one_connection() -> tuple[SSL.Connection, SSL.Connection]:
        server = server_tls.serverConnectionForTLS(None)
        client = policy.creatorForNetloc(b"h", 1).clientConnectionForTLS(None)
        handshake(server, client)
        return server, client

    before_server, before_client = one_connection()
    # The new root reaches the monolith first, then the chat instance gets a new leaf.
    monolith.identity = ConnectIdentity(monolith.identity.leaf, ca.roots(other_ca))  # type: ignore[union-attr]
    chat.identity = other_ca.identity(CHAT, trusted=[ca])
    server, client = one_connection()
    seen = client.get_peer_certificate(as_cryptography=True)
    assert seen is not None and seen.issuer == other_ca.certificate.subject
    # The monolith's new leaf from the new CA is accepted by the chat instance too.
    monolith.identity = other_ca.identity(SERVER, trusted=[ca])
    server, client = one_connection()
    peer = peer_identity(TLSTransport(server))
    assert peer is not None and peer.serial == monolith.identity.leaf.serial
    # Connections made before keep what they had.
    old = before_client.get_peer_certificate(as_cryptography=True)
    assert old is not None and old.issuer == ca.certificate.subject
    assert before_server.get_peer_certificate() is not None


def test_a_renewed_leaf_is_presented_on_the_next_connection(ca: TestCA) -> None:
    chat = FixedIdentity(ca.identity(CHAT))
    server_tls = ConnectServerTLS(chat)
    policy = ConnectPolicyForHTTPS(FixedIdentity(ca.identity(SERVER)), CHAT)
    serials = []
    for _ in range(2):
        client = policy.creatorForNetloc(b"h", 1).clientConnectionForTLS(None)
        handshake(server_tls.serverConnectionForTLS(None), client)
        seen = client.get_peer_certificate(as_cryptography=True)
        assert seen is not None
        serials.append(seen.serial_number)
        chat.identity = ca.identity(CHAT)
    assert serials[0] != serials[1]


def test_identity_failures_are_found_inside_the_agents_wrappers(ca: TestCA) -> None:
    error = PeerIdentityError("x", expected="spiffe://a")
    wrapped = ResponseNeverReceived([Failure(error)])
    assert identity_failure(wrapped) is error
    assert identity_failure(ResponseNeverReceived([Failure(SSL.Error("other"))])) is None
    assert identity_failure(None) is None
