"""Keeping a service's Connect identity current from its local Consul agent.

:class:`CertificateWatcher` follows two endpoints of the local agent with blocking queries
(index + wait), each in a loop of its own:

- ``/v1/agent/connect/ca/leaf/<service>``: the agent renews the leaf before it expires (and
  re-issues it after a CA rotation); the blocking query answers as soon as it has;
- ``/v1/agent/connect/ca/roots``: the roots the cluster trusts; a rotation adds the new root
  (and later drops the old one).

Each loop is a :class:`snet.blocking_query.BlockingQuery` (Consul's rules for blocking
clients), retried after the ``retry_delay`` policy (:func:`snet.retry.exponential_backoff`
by default); an answer that cannot be parsed counts as a failure of its loop.

The two loops keep in step: an answer of either ends the other's back-off at once (the agent
is back; both must be read again before the pair can change), and when the pair does not fit
together (a leaf of one trust domain, roots of another: the agent is now a *new* cluster, as
a restarted dev agent is, with a new CA) the other is read again at once, so that the
identity moves to the new cluster within one round trip rather than after the other loop's
back-off (the default back-off is capped at 2 s: the agent is local, a call every 2 s while
it is away costs nothing).

Whenever either answer changes, a new :class:`~snet.connect.identity.ConnectIdentity` is
built from the latest pair and replaces ``identity``: TLS contexts read it for every new
connection, so a renewal or a rotation takes effect without a restart, and connections
already open keep the identity they were made with. While the agent is away, or answers
something unusable, the last identity stays in use (a Connect leaf lives for days; an
outage of the agent must not take the service down), and the outage and the recovery are
each logged once.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

from consul.callback import CB
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from snet.blocking_query import Answer, BlockingQuery, Fetch
from snet.connect.identity import ConnectAnswerError, ConnectIdentity, Leaf, Roots
from snet.consul import TreqConsul
from snet.retry import exponential_backoff

__all__ = ["CertificateWatcher"]

log = Logger()

Subscriber = Callable[[ConnectIdentity], object]


class CertificateWatcher(Service):
    """The current Connect identity of *service*, kept current from the local agent.

    ``identity`` is None until both the leaf and the roots have been read, then always the
    latest usable pair. ``ready()`` fires with the first identity (start listening or
    calling only then); ``subscribe`` tells of every later change.
    """

    def __init__(
        self,
        *,
        consul: TreqConsul,
        service: str,
        clock: IReactorTime,
        wait: float = 60.0,
        retry_delay: Callable[[int], float] | None = None,
        min_interval: float = 0.05,
    ) -> None:
        """
        :param service: the Consul service name the leaf is for (its SPIFFE id's ``svc``);
            the agent's token needs ``service:write`` on it.
        :param wait: how long the agent may hold a blocking query, in seconds.
        :param retry_delay: delay before the next call after the *n*-th failure in a row;
            by default exponential from 0.2 s to 2 s with jitter.
        :param min_interval: seconds between the starts of two calls of one loop, at least.
        """
        self._consul = consul
        self.service = service
        self._wait = wait
        self.identity: ConnectIdentity | None = None
        self._leaf: Leaf | None = None
        self._roots: Roots | None = None
        self._waiting: list[Deferred[ConnectIdentity]] = []
        self._subscribers: list[Subscriber] = []
        self._mismatch: tuple[str, str] | None = None
        """The versions of the last leaf and roots found not to fit together."""
        delay = retry_delay or exponential_backoff(initial=0.2, maximum=2.0)
        self._loops = (
            BlockingQuery(
                f"the connect leaf of {service}",
                self._fetcher(f"/v1/agent/connect/ca/leaf/{quote(service, safe='')}"),
                self._apply_leaf,
                clock=clock,
                retry_delay=delay,
                min_interval=min_interval,
            ),
            BlockingQuery(
                "the connect CA roots",
                self._fetcher("/v1/agent/connect/ca/roots"),
                self._apply_roots,
                clock=clock,
                retry_delay=delay,
                min_interval=min_interval,
            ),
        )

    @property
    def healthy(self) -> bool:
        """Whether both loops' last calls brought usable answers."""
        return all(loop.healthy for loop in self._loops)

    def ready(self) -> Deferred[ConnectIdentity]:
        """Fires with the current identity: at once if there is one, else with the first."""
        if self.identity is not None:
            return succeed(self.identity)
        d: Deferred[ConnectIdentity] = Deferred(self._waiting.remove)
        self._waiting.append(d)
        return d

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call *callback(identity)* after every change; returns an unsubscribe function."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        for loop in self._loops:
            loop.start()

    def stopService(self) -> Deferred[None]:
        """Stop both loops; fires once no call to Consul is in flight."""
        super().stopService()  # type: ignore[no-untyped-call]
        done: Deferred[None] = DeferredList(
            [loop.stop() for loop in self._loops], consumeErrors=True
        ).addCallback(lambda _: None)
        return done

    def _fetcher(self, path: str) -> Fetch:
        wait = f"{max(1, round(self._wait * 1000))}ms"

        def fetch(index: int) -> Deferred[tuple[object, object]]:
            params = [("index", str(index)), ("wait", wait)] if index > 0 else []
            d: Deferred[tuple[object, object]] = self._consul.http.get(
                CB.json(index=True, allow_404=False), path, params=params
            )
            return d

        return fetch

    def _apply_leaf(self, answer: Answer) -> None:
        self._leaf = Leaf.from_consul(answer.body, self.service)
        self._combine(other=self._loops[1])

    def _apply_roots(self, answer: Answer) -> None:
        self._roots = Roots.from_consul(answer.body)
        self._combine(other=self._loops[0])

    def _combine(self, other: BlockingQuery) -> None:
        """Make the identity from the latest leaf and roots, if both are known and new.

        *other* is the loop that did not just answer: the agent answers, so it need not wait
        out a back-off; if the pair does not fit together, it is read again at once.
        """
        other.wake()
        if self._leaf is None or self._roots is None:
            return
        if self.identity is not None and self.identity.version == (
            self._leaf.version,
            self._roots.version,
        ):
            return
        try:
            identity = ConnectIdentity(self._leaf, self._roots)
        except ConnectAnswerError as error:
            # Within one cluster the trust domain never changes: the agent is a new cluster
            # (a restarted dev agent) and the other answer is the old one. Keep the last
            # identity, and read the other again at once, once per pair (no loop can spin).
            pair = (self._leaf.version, self._roots.version)
            log.warn(
                "connect answers do not fit together: {error}; reading {other} again",
                error=str(error),
                other=other.what,
            )
            if self._mismatch != pair:
                self._mismatch = pair
                other.restart()
                other.wake()
            return
        previous, self.identity = self.identity, identity
        log.info(
            "connect identity {spiffe_id}: leaf {serial} valid until {valid_before},"
            " {roots} roots (active {active_root})",
            spiffe_id=identity.spiffe_id.uri,
            serial=identity.leaf.serial,
            valid_before=identity.valid_before.isoformat(),
            roots=len(identity.roots.certificates),
            active_root=identity.roots.active_root_id,
            renewed=previous is not None,
        )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(identity)
        for callback in list(self._subscribers):
            try:
                callback(identity)
            except Exception:
                log.failure("a subscriber to the connect identity failed")
