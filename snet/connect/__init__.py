"""Consul Connect, natively: identities, mutual TLS and intentions without a sidecar.

- :mod:`snet.connect.identity`: a service's Connect identity as a value (leaf, key, roots,
  SPIFFE id), parsed strictly from the agent's answers.
- :mod:`snet.connect.watcher`: :class:`CertificateWatcher`, the Twisted service that keeps
  the identity current with blocking queries on the local agent.
- :mod:`snet.connect.tls`: the server side (:class:`ConnectServerTLS`,
  :func:`peer_identity`) and the client side (:class:`ConnectPolicyForHTTPS`, which fails
  the handshake with :class:`PeerIdentityError` on a wrong identity).
- :mod:`snet.connect.authorize`: :class:`ConnectAuthorizer`, Consul's intentions asked
  through the agent, cached briefly, denied on any error.

docs/trust.md explains who holds what and what is checked where.
"""

from snet.connect.authorize import DEFAULT_AUTHORIZE_TTL, ConnectAuthorizer, Decision
from snet.connect.identity import (
    ConnectAnswerError,
    ConnectIdentity,
    FixedIdentity,
    IdentitySource,
    Leaf,
    Roots,
    SpiffeServiceId,
)
from snet.connect.tls import (
    ConnectPolicyForHTTPS,
    ConnectServerTLS,
    NoConnectIdentity,
    PeerIdentity,
    PeerIdentityError,
    identity_failure,
    peer_identity,
)
from snet.connect.watcher import CertificateWatcher

__all__ = [
    "DEFAULT_AUTHORIZE_TTL",
    "CertificateWatcher",
    "ConnectAnswerError",
    "ConnectAuthorizer",
    "ConnectIdentity",
    "ConnectPolicyForHTTPS",
    "ConnectServerTLS",
    "Decision",
    "FixedIdentity",
    "IdentitySource",
    "Leaf",
    "NoConnectIdentity",
    "PeerIdentity",
    "PeerIdentityError",
    "Roots",
    "SpiffeServiceId",
    "identity_failure",
    "peer_identity",
]
