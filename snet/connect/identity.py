"""Connect identities as values: a service's leaf certificate, its key, and the CA roots.

Consul Connect names every service with a SPIFFE id,
``spiffe://<trust domain>/ns/<namespace>/dc/<datacenter>/svc/<service>``, carried as the one
URI SAN of the service's leaf certificate. A :class:`ConnectIdentity` is everything one
process needs to prove its own id and to check another's: its leaf (and any intermediates
Consul appends to it), the leaf's private key, and every root the cluster currently trusts.
It is built from the local agent's answers (:meth:`ConnectIdentity.from_consul`) and never
changes; a renewal or a CA rotation makes a new one (see :mod:`snet.connect.watcher`).

Parsing is strict: a malformed answer is a :class:`ConnectAnswerError`, never a half-built
identity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol

from attrs import field, frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

__all__ = [
    "ConnectAnswerError",
    "ConnectIdentity",
    "FixedIdentity",
    "IdentitySource",
    "Leaf",
    "Roots",
    "SpiffeServiceId",
    "colon_hex",
    "uri_sans",
]

_SPIFFE_SERVICE = re.compile(
    r"spiffe://(?P<trust_domain>[^/]+)/ns/(?P<namespace>[^/]+)"
    r"/dc/(?P<datacenter>[^/]+)/svc/(?P<service>[^/]+)"
)


class ConnectAnswerError(ValueError):
    """An answer of the agent's Connect CA endpoints that cannot be used; says why."""


@frozen
class SpiffeServiceId:
    """The parts of a Connect service's SPIFFE id."""

    trust_domain: str
    datacenter: str
    service: str
    namespace: str = "default"

    @property
    def uri(self) -> str:
        """``spiffe://<trust domain>/ns/<namespace>/dc/<datacenter>/svc/<service>``."""
        return (
            f"spiffe://{self.trust_domain}/ns/{self.namespace}"
            f"/dc/{self.datacenter}/svc/{self.service}"
        )

    @classmethod
    def parse(cls, uri: str) -> SpiffeServiceId | None:
        """The parts of *uri*, or None if it is not a Connect service id."""
        match = _SPIFFE_SERVICE.fullmatch(uri)
        if match is None:
            return None
        return cls(
            trust_domain=match["trust_domain"],
            datacenter=match["datacenter"],
            service=match["service"],
            namespace=match["namespace"],
        )

    def sibling(self, service: str) -> SpiffeServiceId:
        """The id of *service* in the same trust domain, namespace and datacenter."""
        return SpiffeServiceId(self.trust_domain, self.datacenter, service, self.namespace)


def uri_sans(certificate: x509.Certificate) -> list[str]:
    """The URI subject alternative names of *certificate* (none if it has no SAN)."""
    try:
        extension = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(uri) for uri in extension.value.get_values_for_type(x509.UniformResourceIdentifier)]


def colon_hex(number: int) -> str:
    """*number* as Consul writes certificate serials: lowercase hex byte pairs joined by ``:``."""
    raw = number.to_bytes(max(1, (number.bit_length() + 7) // 8), "big")
    return ":".join(f"{byte:02x}" for byte in raw)


def _text(answer: Mapping[str, object], key: str, what: str) -> str:
    value = answer.get(key)
    if not isinstance(value, str) or not value:
        raise ConnectAnswerError(f"{what}: no {key}")
    return value


def _certificates(pem: str, what: str) -> tuple[x509.Certificate, ...]:
    try:
        found = tuple(x509.load_pem_x509_certificates(pem.encode("ascii")))
    except ValueError as error:
        raise ConnectAnswerError(f"{what}: no readable PEM certificate ({error})") from None
    return found


def _same_key(certificate: x509.Certificate, key: PrivateKeyTypes) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return certificate.public_key().public_bytes(der, spki) == key.public_key().public_bytes(
        der, spki
    )


@frozen(eq=False)
class Leaf:
    """A service's own certificate, with what Consul appended to it, and its private key.

    ``chain`` is the leaf first, then intermediates (after a CA rotation, the new root
    cross-signed by the old one). ``version`` tells one issue from the next.
    """

    spiffe_id: SpiffeServiceId
    chain: tuple[x509.Certificate, ...]
    private_key: PrivateKeyTypes = field(repr=False)
    version: str = ""

    @property
    def certificate(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def serial(self) -> str:
        """The serial number, colon-hex as Consul writes it."""
        return colon_hex(self.certificate.serial_number)

    @classmethod
    def from_pem(cls, chain_pem: str, key_pem: str, version: str = "") -> Leaf:
        """The leaf in *chain_pem* (first, then intermediates) with the key in *key_pem*.

        The SPIFFE id is the certificate's one Connect service URI SAN.

        :raises ConnectAnswerError: if a part is missing, unreadable, or does not match.
        """
        chain = _certificates(chain_pem, "leaf")
        try:
            key = serialization.load_pem_private_key(key_pem.encode("ascii"), password=None)
        except (ValueError, TypeError) as error:
            raise ConnectAnswerError(f"leaf: unreadable private key ({error})") from None
        uris = uri_sans(chain[0])
        ids = [parsed for parsed in map(SpiffeServiceId.parse, uris) if parsed is not None]
        if len(ids) != 1:
            raise ConnectAnswerError(f"leaf: expected one SPIFFE service id, found {uris!r}")
        if not _same_key(chain[0], key):
            raise ConnectAnswerError("leaf: the private key does not match the certificate")
        return cls(ids[0], chain, key, version or colon_hex(chain[0].serial_number))

    @classmethod
    def from_consul(cls, answer: object, service: str | None = None) -> Leaf:
        """The leaf in an answer of ``/v1/agent/connect/ca/leaf/<service>``.

        :raises ConnectAnswerError: if the answer is malformed or for another service.
        """
        if not isinstance(answer, Mapping):
            raise ConnectAnswerError("leaf: the answer is not an object")
        leaf = cls.from_pem(
            _text(answer, "CertPEM", "leaf"),
            _text(answer, "PrivateKeyPEM", "leaf"),
            f"{answer.get('ModifyIndex', '')}/{answer.get('SerialNumber', '')}",
        )
        if service is not None and leaf.spiffe_id.service != service:
            raise ConnectAnswerError(f"leaf: issued for {leaf.spiffe_id.uri}, not {service}")
        return leaf


@frozen(eq=False)
class Roots:
    """The CA roots a Connect cluster trusts now: the active one and those still in use."""

    trust_domain: str
    certificates: tuple[x509.Certificate, ...]
    active_root_id: str = ""
    version: str = ""

    @classmethod
    def from_pem(cls, trust_domain: str, pems: Sequence[str], active_root_id: str = "") -> Roots:
        """:raises ConnectAnswerError: if there is no root or one is unreadable."""
        certificates = tuple(root for pem in pems for root in _certificates(pem, "roots"))
        if not certificates:
            raise ConnectAnswerError("roots: no root certificate")
        version = active_root_id + "/" + ",".join(colon_hex(c.serial_number) for c in certificates)
        return cls(trust_domain, certificates, active_root_id, version)

    @classmethod
    def from_consul(cls, answer: object) -> Roots:
        """The roots in an answer of ``/v1/agent/connect/ca/roots``.

        :raises ConnectAnswerError: if the answer is malformed.
        """
        if not isinstance(answer, Mapping):
            raise ConnectAnswerError("roots: the answer is not an object")
        entries = answer.get("Roots")
        if not isinstance(entries, list) or not entries:
            raise ConnectAnswerError("roots: no Roots")
        pems: list[str] = []
        for entry in entries:
            if not isinstance(entry, Mapping):
                raise ConnectAnswerError("roots: an entry is not an object")
            pems.append(_text(entry, "RootCert", "roots"))
        active = answer.get("ActiveRootID")
        return cls.from_pem(
            _text(answer, "TrustDomain", "roots"), pems, active if isinstance(active, str) else ""
        )


@frozen(eq=False)
class ConnectIdentity:
    """One service's Connect identity at one moment: what a TLS context is built from.

    ``version`` changes whenever the leaf or the roots do, so that holders can cache what
    they build from an identity.
    """

    leaf: Leaf
    roots: Roots

    def __attrs_post_init__(self) -> None:
        if self.leaf.spiffe_id.trust_domain != self.roots.trust_domain:
            raise ConnectAnswerError(
                f"{self.leaf.spiffe_id.uri} is not in the roots' trust domain"
                f" {self.roots.trust_domain}"
            )

    @property
    def spiffe_id(self) -> SpiffeServiceId:
        return self.leaf.spiffe_id

    @property
    def trust_domain(self) -> str:
        return self.roots.trust_domain

    @property
    def version(self) -> tuple[str, str]:
        return (self.leaf.version, self.roots.version)

    @property
    def valid_before(self) -> datetime:
        """When the leaf expires (UTC)."""
        return self.leaf.certificate.not_valid_after_utc

    def peer_id(self, service: str) -> SpiffeServiceId:
        """The SPIFFE id *service* has in this identity's trust domain and datacenter."""
        return self.spiffe_id.sibling(service)

    @classmethod
    def from_pem(
        cls, *, chain_pem: str, key_pem: str, roots_pem: Sequence[str], trust_domain: str
    ) -> ConnectIdentity:
        """An identity from PEM text (tests, and certificates kept in files).

        :raises ConnectAnswerError: if any part is missing, unreadable or inconsistent.
        """
        return cls(Leaf.from_pem(chain_pem, key_pem), Roots.from_pem(trust_domain, roots_pem))


class IdentitySource(Protocol):
    """Where TLS contexts read the identity to use for the next connection from."""

    @property
    def identity(self) -> ConnectIdentity | None:
        """The current identity; None until there is one."""


class FixedIdentity:
    """An identity held as given (tests, and tools that load certificates from files).

    Assigning ``identity`` is a rotation: new connections use the new one.
    """

    def __init__(self, identity: ConnectIdentity | None = None) -> None:
        self.identity = identity
