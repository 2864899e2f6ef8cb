"""Which chat instances the monolith may send dialog calls to.

:class:`HealthyInstances` follows the list of instances of a service that Consul reports as
passing (``/v1/health/service/<name>?passing=true``), by two paths at once:

- a *blocking-query loop* (:class:`snet.blocking_query.BlockingQuery`: index + wait) that
  learns of every change within milliseconds of Consul knowing it, following Consul's rules
  for blocking clients (see that module);
- a *periodic refresh* (a ``TimerService`` on the injected clock) that reads the list every
  ``refresh_interval`` seconds whatever the loop does, so that a stuck or broken loop can
  never leave the list stale for longer than that. A ``TimerService`` calls at once when it
  starts; that first call is skipped, since the loop's first read is already the read at
  the start.

Answers are applied in Consul's order (by ``X-Consul-Index``), whichever path brought them,
so that a slow answer never overwrites a newer one. When Consul cannot be reached the last
list is kept (an outage never empties it) and the outage and the recovery are each logged
once. An empty answer never empties a list that had instances: a restarted agent answers
"none" until the instances have registered again, and the whole fleet failing its checks at
once (its database away) says more about a shared dependency than about the instances. The
last list then stays in use; instances that are really gone refuse connections and are
skipped at once, and passive health ejects the ones that fail (Envoy's "panic" rule). The
first non-empty answer replaces it.

:class:`StaticInstances` is the same read interface over one fixed address (``--chat-url``),
for deployments that put a proxy or a single instance in front of the chat service.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, cast

from attrs import frozen
from prometheus_client import CollectorRegistry, Gauge
from twisted.application.internet import TimerService
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from snet.blocking_query import Answer, BlockingQuery, ConsulReach, consul_index, log_went_back
from snet.config import parse_http_address
from snet.consul import TreqConsul, consul_duration
from snet.retry import exponential_backoff

__all__ = [
    "DEFAULT_MIN_INTERVAL",
    "ChatEndpoint",
    "HealthyInstances",
    "InstanceSource",
    "StaticInstances",
    "endpoint_from_url",
    "endpoints_from_health",
]

log = Logger()

DEFAULT_MIN_INTERVAL = 0.05
"""Seconds between the starts of two blocking queries, at least (Consul's "rate limit" rule).

50 ms keeps a flapping service to 20 calls a second at most, while a change that comes in
during a blocking call is still seen at once (the limit only delays the *next* call)."""


@frozen
class ChatEndpoint:
    """One chat instance: its Consul service ID and the address its peers reach it at."""

    instance_id: str
    host: str
    port: int

    @property
    def url(self) -> str:
        """``http://host:port``, the host in brackets when it is an IPv6 address."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def https_url(self) -> str:
        """``https://host:port``: the instance over Connect TLS."""
        return "https" + self.url.removeprefix("http")


Instances = tuple[ChatEndpoint, ...]
Subscriber = Callable[[Instances], object]


class InstanceSource(Protocol):
    """Where a balancer reads the current chat instances from."""

    @property
    def instances(self) -> Instances:
        """The instances to use now, sorted by ``instance_id`` (ids are unique)."""

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call *callback* with the new instances whenever they change; returns a function
        that ends the subscription."""


# --- reading Consul's answer ------------------------------------------------------------------


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def endpoints_from_health(nodes: object) -> tuple[Instances, list[str]]:
    """The passing instances in an answer of ``/v1/health/service/<name>``, and its problems.

    Every entry must have a ``Service`` with an ``ID`` and a ``Port`` (1-65535); its host is
    the service's ``Address``, or its node's when that is empty, as Consul means it. An entry
    with any check that is not ``passing`` is left out even though the query asked for passing
    instances only: one wake-up of a blocking query proves nothing, the answer is re-read every
    time. Service IDs are unique per Consul node only: IDs found on several nodes become
    ``ID@node``. Malformed entries are left out and described in the second list.

    :returns: the endpoints sorted by ``instance_id``, and descriptions of skipped entries.
    """
    problems: list[str] = []
    if not isinstance(nodes, list):
        return (), [f"the answer is not a list but {type(nodes).__name__}"]
    found: list[tuple[str, str, ChatEndpoint]] = []
    for position, entry in enumerate(nodes):
        if not isinstance(entry, Mapping):
            problems.append(f"entry {position} is not an object")
            continue
        service = entry.get("Service")
        node = entry.get("Node")
        node = node if isinstance(node, Mapping) else {}
        if not isinstance(service, Mapping):
            problems.append(f"entry {position} has no Service")
            continue
        service_id = _text(service.get("ID"))
        port = service.get("Port")
        host = _text(service.get("Address")) or _text(node.get("Address"))
        if service_id is None:
            problems.append(f"entry {position} has no service ID")
            continue
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            problems.append(f"{service_id} has an invalid port {port!r}")
            continue
        if host is None:
            problems.append(f"{service_id} has no address")
            continue
        checks = entry.get("Checks") or []
        if not isinstance(checks, Sequence) or any(
            not isinstance(check, Mapping) or check.get("Status") != "passing" for check in checks
        ):
            continue
        node_name = _text(node.get("Node")) or host
        found.append((service_id, node_name, ChatEndpoint(service_id, host, port)))
    counts: dict[str, int] = {}
    for service_id, _, _ in found:
        counts[service_id] = counts.get(service_id, 0) + 1
    endpoints = [
        endpoint
        if counts[service_id] == 1
        else ChatEndpoint(f"{service_id}@{node_name}", endpoint.host, endpoint.port)
        for service_id, node_name, endpoint in found
    ]
    unique: dict[str, ChatEndpoint] = {}
    for endpoint in sorted(endpoints, key=lambda e: (e.instance_id, e.host, e.port)):
        if endpoint.instance_id in unique:
            problems.append(f"{endpoint.instance_id} is listed twice")
            continue
        unique[endpoint.instance_id] = endpoint
    return tuple(unique.values()), problems


class _Subscribers:
    def __init__(self) -> None:
        self._callbacks: list[Subscriber] = []

    def add(self, callback: Subscriber) -> Callable[[], None]:
        self._callbacks.append(callback)

        def unsubscribe() -> None:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

        return unsubscribe

    def notify(self, instances: Instances) -> None:
        for callback in list(self._callbacks):
            try:
                callback(instances)
            except Exception:
                log.failure("a subscriber to the chat instances failed")


# --- following Consul -------------------------------------------------------------------------


class HealthyInstances(Service):
    """The passing instances of *service_name*, kept current from Consul while running.

    ``instances`` is sorted by ``instance_id`` and is the same tuple object until the list
    changes. ``last_success`` is the clock time of the last answer from Consul (any answer, even
    one that changed nothing), ``consul_reachable`` whether the last call got one,
    ``consul_index`` the ``X-Consul-Index`` of the last answer applied.

    With a *registry*, exports ``snet_chat_instances_healthy`` (instances in the list),
    ``snet_consul_staleness_seconds`` (seconds since the last answer, computed when scraped;
    before the first answer, since the service started) and ``snet_consul_reachable`` (1/0).
    """

    def __init__(
        self,
        *,
        consul: TreqConsul,
        service_name: str,
        clock: IReactorTime,
        refresh_interval: float = 5.0,
        wait: float = 30.0,
        retry_delay: Callable[[int], float] | None = None,
        min_interval: float = DEFAULT_MIN_INTERVAL,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """
        :param refresh_interval: seconds between two periodic (non-blocking) reads.
        :param wait: how long Consul may hold a blocking query (its ``wait``), in seconds.
        :param retry_delay: delay before the next blocking query after the *n*-th failure in a
            row; by default exponential from 0.2 s to 5 s with jitter.
        :param min_interval: seconds between the starts of two blocking queries, at least.
        """
        self._consul = consul
        self.service_name = service_name
        self._clock = clock
        self._wait = wait
        self._instances: Instances = ()
        self._empty_logged = False
        self._subscribers = _Subscribers()
        self._started_at: float | None = None
        self._problems: frozenset[str] = frozenset()
        # Ordering of answers: the index of the last applied one, and a count of applied
        # answers (a call that saw none applied while it ran can trust a lower index).
        self._applied_index = 0
        self._generation = 0
        # Both paths tell one ConsulReach of their answers and failures.
        self._reach = ConsulReach(
            service_name, clock, kept=lambda: f"{len(self._instances)} instances"
        )
        self._loop = BlockingQuery(
            service_name,
            self._fetch,
            self._watched,
            clock=clock,
            retry_delay=retry_delay or exponential_backoff(initial=0.2, maximum=5.0),
            min_interval=min_interval,
            reach=self._reach,
        )
        self._refresher = TimerService(refresh_interval, self._periodic_refresh)
        self._refresher.clock = clock
        self._refresh_skip = False
        self._refresh_call: Deferred[None] | None = None
        if registry is not None:
            self._export(registry)

    # The read interface.

    @property
    def instances(self) -> Instances:
        """The instances Consul last reported as passing, sorted by ``instance_id``."""
        return self._instances

    @property
    def last_success(self) -> float | None:
        return self._reach.last_success

    @property
    def consul_reachable(self) -> bool:
        return self._reach.reachable

    @property
    def consul_index(self) -> int | None:
        """The ``X-Consul-Index`` of the last answer applied (None before the first)."""
        return self._applied_index if self._generation else None

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call *callback(instances)* after every change of the list; returns an unsubscribe."""
        return self._subscribers.add(callback)

    def staleness(self) -> float:
        """Seconds since the last answer from Consul (since the start before the first one;
        NaN if never started)."""
        since = self.last_success if self.last_success is not None else self._started_at
        if since is None:
            return math.nan
        return max(0.0, self._clock.seconds() - since)

    def _export(self, registry: CollectorRegistry) -> None:
        Gauge(
            "snet_chat_instances_healthy",
            "Chat instances Consul reports as passing (the last list seen)",
            registry=registry,
        ).set_function(lambda: len(self._instances))
        Gauge(
            "snet_consul_staleness_seconds",
            "Seconds since the chat instance list was last read from Consul",
            registry=registry,
        ).set_function(self.staleness)
        Gauge(
            "snet_consul_reachable",
            "1 if the last call to Consul got an answer, else 0",
            registry=registry,
        ).set_function(lambda: 1.0 if self.consul_reachable else 0.0)

    # Starting and stopping.

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._started_at = self._clock.seconds()
        self._loop.start()
        self._refresh_skip = True  # the call TimerService makes as it starts
        self._refresher.startService()

    def stopService(self) -> Deferred[None]:
        """Stop both paths; fires once no call to Consul is in flight and no timer is left."""
        super().stopService()  # type: ignore[no-untyped-call]
        waits: list[Deferred[Any]] = [self._loop.stop()]
        if self._refresher.running:
            waits.append(self._refresher.stopService())
        call = self._refresh_call
        if call is not None:
            call.cancel()
            waits.append(call)
        done: Deferred[None] = DeferredList(waits, consumeErrors=True).addCallback(lambda _: None)
        return done

    # The blocking-query loop.

    def _read(self, index: int = 0) -> Deferred[Any]:
        """``(index, nodes)`` of the passing instances; a blocking read after *index* > 0.
        Never blocks on index 0: that read answers at once with the current index."""
        d: Deferred[Any]
        if index > 0:
            d = self._consul.health.service(
                self.service_name,
                index=str(index),
                wait=consul_duration(self._wait),
                passing=True,
            )
        else:
            d = self._consul.health.service(self.service_name, passing=True)
        return d

    def _fetch(self, index: int) -> Deferred[tuple[object, object]]:
        """The loop's call; the body carries the generation it was sent in."""
        generation = self._generation
        d: Deferred[tuple[object, object]] = self._read(index).addCallback(
            lambda answer: (answer[0], (answer[1], generation))
        )
        return d

    def _watched(self, answer: Answer) -> None:
        nodes, generation = cast(tuple[object, int], answer.body)
        self._consider(answer.index, nodes, generation, force=answer.went_back)

    # The periodic refresh.

    def _periodic_refresh(self) -> Deferred[None] | None:
        """The refresh timer's call: a read, but for the call as the timer starts."""
        if self._refresh_skip:
            self._refresh_skip = False
            return None
        return self._refresh()

    def _refresh(self) -> Deferred[None]:
        generation = self._generation
        d: Deferred[Any] = self._read()
        self._refresh_call = d

        def settled(result: object) -> object:
            if self._refresh_call is d:
                self._refresh_call = None
            return result

        d.addBoth(settled)
        d.addCallbacks(
            self._refreshed, self._refresh_failed, callbackArgs=(generation,)
        ).addErrback(self._refresh_bug)
        return d

    def _refreshed(self, answer: tuple[object, object], generation: int) -> None:
        if not self.running:
            return
        raw_index, nodes = answer
        index = consul_index(raw_index)
        self._reach.succeeded()
        self._loop.wake()  # the loop may be waiting out a back-off: Consul answers again
        if self._consider(index, nodes, generation, force=False) and index < self._loop.index:
            log_went_back(self.service_name, self._loop.index, index)
            self._loop.restart()

    def _refresh_failed(self, failure: Failure) -> None:
        if not self.running or failure.check(CancelledError):  # type: ignore[no-untyped-call]
            return
        self._reach.failed(failure, None)

    def _refresh_bug(self, failure: Failure) -> None:
        log.failure("bug in the periodic refresh of {service}", failure, service=self.service_name)

    # Applying answers.

    def _consider(self, index: int, nodes: object, generation: int, *, force: bool) -> bool:
        """Apply an answer unless a newer one was applied while its call ran.

        An answer with a lower index than the last applied one is stale if something was
        applied after its call was sent; if nothing was, Consul's index really went backwards
        (an agent restart), and the answer is applied (so is one the loop saw go backwards,
        *force*). Returns whether the answer was applied.
        """
        if not force and index < self._applied_index and generation != self._generation:
            return False
        self._applied_index = index
        self._generation += 1
        endpoints, problems = endpoints_from_health(nodes)
        for problem in sorted(set(problems) - self._problems):
            log.warn(
                "ignoring an entry of {service} from consul: {problem}",
                service=self.service_name,
                problem=problem,
            )
        self._problems = frozenset(problems)
        if not endpoints and self._instances:
            if not self._empty_logged:
                self._empty_logged = True
                log.warn(
                    "consul lists no passing instance of {service}; keeping the last {count}",
                    service=self.service_name,
                    count=len(self._instances),
                )
            return True
        if self._empty_logged:
            self._empty_logged = False
            log.info("consul lists instances of {service} again", service=self.service_name)
        if endpoints != self._instances:
            self._instances = endpoints
            log.info(
                "{service}: {count} passing instances ({instance_ids})",
                service=self.service_name,
                count=len(endpoints),
                instance_ids=", ".join(e.instance_id for e in endpoints) or "none",
            )
            self._subscribers.notify(endpoints)
        return True


# --- one fixed address ------------------------------------------------------------------------


def endpoint_from_url(url: str, what: str = "--chat-url") -> ChatEndpoint:
    """The endpoint at ``http://HOST[:PORT]`` (port 80 by default; IPv6 in brackets).

    Its ``instance_id`` is ``HOST:PORT`` (``[v6]:PORT``).

    :raises ConfigError: for another scheme, no host, a bad port, or a path or query.
    """
    host, port = parse_http_address(url, what)
    name = f"[{host}]" if ":" in host else host
    return ChatEndpoint(f"{name}:{port}", host, port)


class StaticInstances(Service):
    """One fixed chat address (a proxy, or a single instance) that never changes.

    Starting and stopping it does nothing; it is a Service so that it fits where
    :class:`HealthyInstances` goes.
    """

    def __init__(self, url: str) -> None:
        """:raises ConfigError: if *url* is not ``http://HOST[:PORT]``."""
        self.endpoint = endpoint_from_url(url)
        self._instances: Instances = (self.endpoint,)

    @property
    def instances(self) -> Instances:
        """The one endpoint."""
        return self._instances

    def stopService(self) -> Deferred[None]:
        """Nothing to stop: fires at once."""
        super().stopService()  # type: ignore[no-untyped-call]
        return succeed(None)

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """The list never changes, so *callback* is never called."""
        return lambda: None
