"""Which callers may use a Connect-native service: Consul's intentions, asked through the agent.

:class:`ConnectAuthorizer` answers, for one target service, whether a caller that proved a
SPIFFE id over TLS may call it, in the shape an HTTP layer needs (a :class:`Decision` with
the status to answer):

- **401** when the request did not come over TLS with a client certificate that verified
  against the Connect roots (:func:`snet.connect.tls.peer_identity` is None), or the
  certificate's URI is not a Connect service id;
- **403** when the id is from another trust domain (see below), when Consul says no
  (``POST /v1/agent/connect/authorize`` answers ``Authorized: false``), and when Consul
  cannot be asked or answers nonsense: the rule is *denied on any error*, with one
  exception below;
- **200** (allowed) only on Consul's explicit yes.

**Another trust domain.** The TLS handshake verifies every client certificate against the
Connect roots of the moment, so a caller of another trust domain reaches this check only on
a connection opened before this service's identity moved to a new cluster (a restarted dev
agent: a new CA and trust domain). Such a connection can never be allowed again, and a
caller that keeps it alive would be refused for as long as it does: the decision says
``close_connection``, and the HTTP layer closes the connection after its 403, so that the
caller's next call opens a new connection with its current certificate, which the current
roots verify (or refuse) in the handshake.

**Stale if error.** When Consul cannot answer for a caller it answered less than
``stale_if_error`` seconds ago (60 s by default), that last answer stands, as the agent's own
cache and Consul's proxies do: an agent restart (seconds) must not cut the monolith off every
chat instance. A caller never seen, or seen longer ago, is denied. So a revoked intention
lets a known caller in for at most ``ttl`` + ``stale_if_error`` while the agent is down.

**Stale while slow.** A restarting agent may take its time rather than fail: it accepts
the call, then answers once its server has a leader (about two seconds of a one-server
cluster's restart). Every request of a known caller waited that long. So when Consul has not
answered within ``slow_after`` seconds (0.2 s; it answers in milliseconds) for a caller it
answered less than ``stale_if_error`` ago, that last answer stands for the requests waiting
and for those that come until Consul answers; its answer, when it comes, is cached and
followed as usual. This widens nothing: a slow agent is as good as a failed one until it
answers.

Answers (yes and no) are cached for ``ttl`` seconds per (SPIFFE id, serial), which Consul's
documentation allows for this endpoint. The default of 3 s keeps the cost of authorizing off
the request path (one call to the local agent per caller every 3 s, whatever the request
rate) while bounding how long a revoked intention or a revoked token goes on letting a
caller in: 3 s plus the agent's own delay in seeing the change (its intention cache follows
the servers with blocking queries, milliseconds here). Errors are not cached, so a recovered
agent is used at once; concurrent lookups for one key share one call.
"""

from __future__ import annotations

import json

from attrs import frozen
from consul.callback import CB
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from snet.connect.identity import IdentitySource, SpiffeServiceId
from snet.connect.tls import PeerIdentity, peer_identity
from snet.consul import TreqConsul

__all__ = [
    "DEFAULT_AUTHORIZE_TTL",
    "DEFAULT_SLOW_AFTER",
    "DEFAULT_STALE_IF_ERROR",
    "ConnectAuthorizer",
    "Decision",
]

log = Logger()

DEFAULT_AUTHORIZE_TTL = 3.0
"""Seconds an answer of Consul's authorize endpoint is reused (see the module docstring)."""

DEFAULT_STALE_IF_ERROR = 60.0
"""Seconds an answer may still stand while Consul cannot answer (see the module docstring)."""

DEFAULT_SLOW_AFTER = 0.2
"""Seconds Consul may take to answer before a caller's last answer stands in for it."""


@frozen
class Decision:
    """Whether a caller may go on; ``status`` is what to answer if not (401 or 403)."""

    allowed: bool
    status: int
    reason: str
    caller: str | None = None
    """The caller's SPIFFE id, when it proved one."""
    close_connection: bool = False
    """The connection can never be allowed (its certificate is of another trust domain):
    close it after the answer (see the module docstring)."""

    @classmethod
    def allow(cls, caller: str, reason: str) -> Decision:
        return cls(True, 200, reason, caller)

    @classmethod
    def unauthenticated(cls, reason: str, caller: str | None = None) -> Decision:
        return cls(False, 401, reason, caller)

    @classmethod
    def forbidden(cls, caller: str, reason: str) -> Decision:
        return cls(False, 403, reason, caller)

    @classmethod
    def other_trust_domain(cls, caller: str) -> Decision:
        return cls(False, 403, "not of this trust domain", caller, close_connection=True)


_Key = tuple[str, str]


class ConnectAuthorizer:
    """Asks the local agent whether callers may call *target*, caching its answers.

    ``hits`` and ``misses`` count cache lookups (a lookup that joins a call in flight counts
    as a hit), ``errors`` the calls that failed (and so denied, or answered stale), ``stale``
    the lookups answered with a stale answer (Consul failed or was slow).
    """

    def __init__(
        self,
        *,
        consul: TreqConsul,
        target: str,
        source: IdentitySource,
        clock: IReactorTime,
        ttl: float = DEFAULT_AUTHORIZE_TTL,
        stale_if_error: float = DEFAULT_STALE_IF_ERROR,
        slow_after: float = DEFAULT_SLOW_AFTER,
        max_entries: int = 4096,
    ) -> None:
        """
        :param target: the service callers want to reach (Consul's ``Target``).
        :param source: this service's identity: callers from another trust domain are
            refused without asking Consul.
        :param stale_if_error: seconds after Consul's answer that it still stands when Consul
            cannot be asked again (0: never).
        :param slow_after: seconds a lookup waits for Consul before such an answer stands.
        :param max_entries: at most this many answers are cached (expired ones go first).
        """
        self._consul = consul
        self.target = target
        self._source = source
        self._clock = clock
        self.ttl = ttl
        self.stale_if_error = stale_if_error
        self.slow_after = slow_after
        self._max_entries = max_entries
        self._cache: dict[_Key, tuple[float, Decision]] = {}
        """key -> (when Consul answered, its decision)"""
        self._pending: dict[_Key, list[Deferred[Decision]]] = {}
        self._slow: dict[_Key, IDelayedCall | None] = {}
        """key -> the timer of its call in flight, None once the call was slow"""
        self._standing: set[_Key] = set()
        """The keys whose last answer stands for a failed or slow Consul (said once)."""
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.stale = 0

    def check_request(self, request: object) -> Deferred[Decision]:
        """The decision for an HTTP request (anything with a ``transport``)."""
        return self.check_peer(peer_identity(getattr(request, "transport", None)))

    def check_peer(self, peer: PeerIdentity | None) -> Deferred[Decision]:
        """The decision for a peer as :func:`~snet.connect.tls.peer_identity` found it."""
        if peer is None:
            return succeed(Decision.unauthenticated("no verified client certificate"))
        parsed = SpiffeServiceId.parse(peer.spiffe_id)
        if parsed is None:
            return succeed(
                Decision.unauthenticated("the client certificate names no service", peer.spiffe_id)
            )
        identity = self._source.identity
        if identity is None or parsed.trust_domain != identity.trust_domain:
            return succeed(Decision.other_trust_domain(peer.spiffe_id))
        return self.authorize(peer.spiffe_id, peer.serial)

    def authorize(self, client_uri: str, serial: str) -> Deferred[Decision]:
        """Consul's decision for *client_uri* (cached); denied if Consul cannot tell."""
        key = (client_uri, serial)
        now = self._clock.seconds()
        cached = self._cache.get(key)
        if cached is not None and cached[0] + self.ttl > now:
            self.hits += 1
            return succeed(cached[1])
        stale = cached if cached is not None and cached[0] + self.stale_if_error > now else None
        waiting = self._pending.get(key)
        d: Deferred[Decision] = Deferred()
        if waiting is not None:
            self.hits += 1
            if stale is not None and key in self._slow and self._slow[key] is None:
                self.stale += 1  # Consul is slow for this call already
                return succeed(stale[1])
            waiting.append(d)
            return d
        self.misses += 1
        self._pending[key] = [d]
        if stale is not None:
            self._slow[key] = self._clock.callLater(self.slow_after, self._stand_in, key, stale)
        self._ask(client_uri, serial).addBoth(self._answered, key)
        return d

    def _stand_in(self, key: _Key, stale: tuple[float, Decision]) -> None:
        """Consul is slow to answer for *key*: its last answer stands until it does."""
        self._slow[key] = None
        waiting, self._pending[key] = self._pending.get(key, []), []
        self._warn_standing(key, stale, f"Consul has not answered in {self.slow_after}s")
        for d in waiting:
            self.stale += 1
            d.callback(stale[1])

    def _ask(self, client_uri: str, serial: str) -> Deferred[object]:
        body = json.dumps(
            {"Target": self.target, "ClientCertURI": client_uri, "ClientCertSerial": serial}
        )
        d: Deferred[object] = self._consul.http.post(
            CB.json(allow_404=False), "/v1/agent/connect/authorize", data=body
        )
        return d

    def _answered(self, answer: object, key: _Key) -> None:
        timer = self._slow.pop(key, None)
        if timer is not None and timer.active():
            timer.cancel()
        client_uri = key[0]
        decision: Decision
        if isinstance(answer, Failure):
            decision = self._failed(key, f"consul could not authorize: {answer.getErrorMessage()}")
        elif isinstance(answer, dict) and isinstance(answer.get("Authorized"), bool):
            reason = str(answer.get("Reason", ""))
            if answer["Authorized"]:
                decision = Decision.allow(client_uri, reason)
            else:
                decision = Decision.forbidden(client_uri, reason)
            self._remember(key, decision)
            if key in self._standing:
                self._standing.discard(key)
                log.info("{caller}: Consul answers again", caller=client_uri)
        else:
            decision = self._failed(key, f"consul answered {answer!r}"[:200])
        for d in self._pending.pop(key, []):
            d.callback(decision)

    def _failed(self, key: _Key, why: str) -> Decision:
        """The decision when Consul could not answer: its last answer if recent enough."""
        self.errors += 1
        client_uri = key[0]
        cached = self._cache.get(key)
        if cached is not None and cached[0] + self.stale_if_error > self._clock.seconds():
            self.stale += 1
            self._warn_standing(key, cached, why)
            return cached[1]
        log.warn("denying {caller}: {why}", caller=client_uri, why=why)
        return Decision.forbidden(client_uri, why)

    def _warn_standing(self, key: _Key, stale: tuple[float, Decision], why: str) -> None:
        """Say once, until Consul answers again, that a caller's last answer stands."""
        if key in self._standing:
            return
        self._standing.add(key)
        log.warn(
            "{caller}: {why}; its answer of {age:.1f}s ago stands until Consul answers"
            " ({decision})",
            caller=key[0],
            why=why,
            age=self._clock.seconds() - stale[0],
            decision="allowed" if stale[1].allowed else "denied",
        )

    def _remember(self, key: _Key, decision: Decision) -> None:
        now = self._clock.seconds()
        if len(self._cache) >= self._max_entries:
            keep = max(self.ttl, self.stale_if_error)
            self._cache = {k: v for k, v in self._cache.items() if v[0] + keep > now}
            while len(self._cache) >= self._max_entries:
                del self._cache[next(iter(self._cache))]
            # A standing answer is a cached one: forget those of callers gone from the cache.
            self._standing &= self._cache.keys()
        self._cache.pop(key, None)  # re-inserted last: the oldest answers go first
        self._cache[key] = (now, decision)

    def hit_rate(self) -> float:
        """The share of lookups answered without a call of their own (0 before any)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0
