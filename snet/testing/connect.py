"""A Connect-like CA made in memory, and the agent's Connect endpoints over it, for tests.

:class:`TestCA` issues what Consul's built-in CA issues (EC P-256 keys, a leaf per service
with its SPIFFE id as the one URI SAN), and what it never would: expired leaves, leaves of
another trust domain, leaves without a URI. ``identity()`` packs a leaf with the roots a
process should trust into a :class:`~snet.connect.identity.ConnectIdentity`.
"""

from __future__ import annotations

import datetime
import json
import uuid
from collections.abc import Sequence

from attrs import define, field
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from treq.testing import StubTreq
from twisted.internet.testing import MemoryReactorClock
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from snet.blocking_query import Answer
from snet.connect.identity import ConnectIdentity, Leaf, Roots, SpiffeServiceId
from snet.connect.watcher import CertificateWatcher
from snet.lifecycle import ServingInstance

__all__ = [
    "AUTHORIZE",
    "ROOTS",
    "FakeConnectAgent",
    "TestCA",
    "give_identity",
    "identified_before_listening",
    "leaf_path",
    "new_ca_private_key",
]

ROOTS = "/v1/agent/connect/ca/roots"
AUTHORIZE = "/v1/agent/connect/authorize"


def leaf_path(service: str) -> str:
    """The agent's path of *service*'s leaf."""
    return f"/v1/agent/connect/ca/leaf/{service}"


_DAY = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    """The key as Consul writes it (SEC1, ``EC PRIVATE KEY``)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode("ascii")


@define
class TestCA:
    """A root CA for the trust domain *trust_domain* (a fresh ``<uuid>.consul`` by default)."""

    __test__ = False  # not a pytest test class

    trust_domain: str = field(factory=lambda: f"{uuid.uuid4()}.consul")
    datacenter: str = "dc1"
    key: ec.EllipticCurvePrivateKey = field(factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    certificate: x509.Certificate = field(init=False)

    def __attrs_post_init__(self) -> None:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"Test CA {self.trust_domain}")])
        public = self.key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - _DAY)
            .not_valid_after(_now() + 3650 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(f"spiffe://{self.trust_domain}")]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> str:
        return _pem(self.certificate)

    def roots(self, *others: TestCA) -> Roots:
        """This CA's root, and *others*' roots too (a rotation in progress)."""
        return Roots.from_pem(
            self.trust_domain, [self.pem, *(other.pem for other in others)], self.pem[-40:]
        )

    def spiffe_id(self, service: str) -> SpiffeServiceId:
        return SpiffeServiceId(self.trust_domain, self.datacenter, service)

    def leaf(
        self,
        service: str,
        *,
        uris: Sequence[str] | None = None,
        expired: bool = False,
    ) -> Leaf:
        """A leaf for *service* (its SPIFFE id as URI SAN unless *uris* says otherwise)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        minute = datetime.timedelta(minutes=1)
        if expired:
            not_before, not_after = now - 3 * _DAY, now - _DAY
        else:
            not_before, not_after = now - minute, now + 3 * _DAY
        names = [self.spiffe_id(service).uri] if uris is None else list(uris)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if names:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in names]),
                critical=False,
            )
        certificate = builder.sign(self.key, hashes.SHA256())
        if uris is not None and len([u for u in uris if SpiffeServiceId.parse(u)]) != 1:
            # Leaf.from_pem refuses such a certificate, as it should for our own; a peer
            # may still present one.
            return Leaf(self.spiffe_id(service), (certificate,), key, _pem(certificate))
        return Leaf.from_pem(_pem(certificate), _key_pem(key))

    def identity(
        self, service: str, *, trusted: Sequence[TestCA] = (), expired: bool = False
    ) -> ConnectIdentity:
        """*service*'s identity: a fresh leaf from this CA, trusting this CA and *trusted*."""
        return ConnectIdentity(self.leaf(service, expired=expired), self.roots(*trusted))

    def consul_leaf(self, service: str, index: int = 1) -> dict[str, object]:
        """A fresh leaf for *service* as ``/v1/agent/connect/ca/leaf/<service>`` answers."""
        leaf = self.leaf(service)
        assert isinstance(leaf.private_key, ec.EllipticCurvePrivateKey)
        return {
            "SerialNumber": leaf.serial,
            "CertPEM": _pem(leaf.certificate),
            "PrivateKeyPEM": _key_pem(leaf.private_key),
            "Service": service,
            "ServiceURI": leaf.spiffe_id.uri,
            "ModifyIndex": index,
        }

    def consul_roots(self, *others: TestCA) -> dict[str, object]:
        """This CA's root (then *others*') as ``/v1/agent/connect/ca/roots`` answers."""
        return {
            "ActiveRootID": self.pem[-40:],
            "TrustDomain": self.trust_domain,
            "Roots": [
                {"ID": ca.pem[-40:], "RootCert": ca.pem, "Active": ca is self}
                for ca in (self, *others)
            ],
        }


class FakeConnectAgent(Resource):
    """The agent's Connect endpoints, with blocking queries on the leaf and the roots.

    It answers a leaf for each of *services* (at index 10) and *ca*'s roots (at index 5). A
    query whose ``index`` is at or above the endpoint's index is held until ``set()``
    changes that endpoint; paths it does not know get 404. ``error`` answers every request
    with that (status, body); ``authorized`` maps a client's SPIFFE id to what authorize
    answers for it (no by default), and ``hold_authorize`` holds those calls. ``stub`` is
    the ``StubTreq`` in front of it, for ``TreqConsul(..., http=agent.stub)``.
    """

    isLeaf = True

    def __init__(self, ca: TestCA, *services: str) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.answers: dict[str, tuple[int, object]] = {ROOTS: (5, ca.consul_roots())}
        for service in services:
            self.answers[leaf_path(service)] = (10, ca.consul_leaf(service, 10))
        self.held: list[tuple[str, Request]] = []
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.error: tuple[int, bytes] | None = None
        self.authorized: dict[str, bool] = {}
        self.hold_authorize = False
        self.stub = StubTreq(self)  # type: ignore[no-untyped-call]

    def render(self, request: Request) -> bytes | int:
        assert request.path is not None and request.content is not None
        path = request.path.decode()
        args = {k.decode(): v[0].decode() for k, v in (request.args or {}).items()}
        body = request.content.read()
        self.requests.append((path, args, body))
        if self.error is not None:
            request.setResponseCode(self.error[0])
            return self.error[1]
        if path == AUTHORIZE:
            if self.hold_authorize:
                self.held.append((path, request))
                return NOT_DONE_YET
            return self._authorize(body)
        if path not in self.answers:
            request.setResponseCode(404)
            return b"unknown path"
        index, _ = self.answers[path]
        if "index" in args and int(args["index"]) >= index:
            self.held.append((path, request))
            return NOT_DONE_YET
        return self._answer(path, request)

    def _answer(self, path: str, request: Request) -> bytes:
        index, body = self.answers[path]
        request.setHeader("X-Consul-Index", str(index))
        return json.dumps(body).encode()

    def _authorize(self, body: bytes) -> bytes:
        allowed = self.authorized.get(json.loads(body).get("ClientCertURI", ""), False)
        return json.dumps({"Authorized": allowed, "Reason": "fake"}).encode()

    def set(self, path: str, body: object) -> None:
        """A new answer for *path*, one index up; held queries on it are answered."""
        index, _ = self.answers[path]
        self.answers[path] = (index + 1, body)
        held, self.held = self.held, []
        for held_path, request in held:
            if held_path == path:
                _finish(request, self._answer(path, request))
            else:
                self.held.append((held_path, request))
        self.stub.flush()  # type: ignore[no-untyped-call]

    def release_authorize(self) -> None:
        """Answer the held authorize calls: yes."""
        held, self.held = self.held, []
        for path, request in held:
            if path == AUTHORIZE:
                _finish(request, json.dumps({"Authorized": True, "Reason": "late"}).encode())
            else:
                self.held.append((path, request))
        self.stub.flush()  # type: ignore[no-untyped-call]

    def queries(self, path: str) -> list[dict[str, str]]:
        """The query arguments of every request of *path*, in order."""
        return [args for p, args, _ in self.requests if p == path]


def _finish(request: Request, body: bytes) -> None:
    request.write(body)
    request.finish()


def new_ca_private_key() -> str:
    """A fresh CA key as Consul's ``PUT /v1/connect/ca/configuration`` takes it (a rotation:
    ``{"Provider": "consul", "Config": {"PrivateKey": new_ca_private_key()}}``)."""
    return _key_pem(ec.generate_private_key(ec.SECP256R1()))


def identified_before_listening(
    instance: ServingInstance, reactor: MemoryReactorClock, ca: TestCA, consul_port: int
) -> CertificateWatcher:
    """Start *instance* (a tap's ``makeService`` on a memory *reactor*), check that it asks
    the agent on *consul_port* for its identity and does not listen before it has one, then
    give its watcher an identity from *ca* as the agent's first answers would; the watcher."""
    [watcher] = instance.prerequisites
    assert isinstance(watcher, CertificateWatcher)
    instance.startService()
    reactor.advance(0)
    assert reactor.tcpServers == [], "listening before having an identity"
    asked = sum(1 for _, port, *_ in reactor.tcpClients if port == consul_port)
    assert asked == 2, f"{asked} calls to the agent, not 2 (the leaf, the roots)"
    give_identity(watcher, ca)
    return watcher


def give_identity(watcher: CertificateWatcher, ca: TestCA) -> None:
    """Hand *watcher* a leaf and roots from *ca*, as the agent's first answers would."""
    watcher._apply_leaf(Answer(1, ca.consul_leaf(watcher.service), 0))
    watcher._apply_roots(Answer(1, ca.consul_roots(), 0))
