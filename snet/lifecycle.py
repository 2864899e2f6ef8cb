"""The life of one serving process (a chat instance or the monolith), in order.

Order matters both ways, so ``ServingInstance`` chains its steps itself instead of relying on
a ``MultiService`` (which starts and stops its children concurrently):

start: start the resources (pools and clients, open from construction on) -> start the
       prerequisites and wait until each is ready (the Connect identity: an instance serves
       TLS and calls its peers only with a certificate) -> listen -> apply the schema
       (retrying while MySQL is away) -> start the workers (discovery, feed fan-out) ->
       announce (register with Consul)
stop:  withdraw the announcement (deregister) -> grace for watchers -> stop listening ->
       linger (connections kept alive between two requests stay open a moment: a request
       that arrives on one is served, with ``Connection: close``, not cut off by the exit) ->
       drain in-flight requests -> stop the workers and the prerequisites -> stop the
       resources one after another, in the order given (the taps give: Consul client, chat
       HTTP client, Redis pool, MySQL pool), each closing its pool or client

A resource is a ``ClosedOnStop`` service: its ``stopService`` closes the pool or client and
returns the Deferred that fires once it is closed. A prerequisite is a service with a
``ready()`` method (:class:`Prerequisite`), such as ``snet.connect.CertificateWatcher``.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, Service
from twisted.internet.defer import (
    CancelledError,
    Deferred,
    gatherResults,
    inlineCallbacks,
    maybeDeferred,
)
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import (
    IDelayedCall,
    IListeningPort,
    IReactorCore,
    IReactorTime,
    IStreamServerEndpoint,
)
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import Site

from snet.retry import exponential_backoff
from snet.web.draining import InFlight
from snet.web.limits import LimitedSite
from snet.web.service import ServiceApp

log = Logger()

LINGER = 0.25
"""Seconds a stopping instance keeps its kept-alive connections open after it stops
listening (``ServingInstance``'s default): a closed-loop client answered just before the
drain began sends its next request within a round trip."""


def listen_interface(description: str) -> str | None:
    """The ``interface=`` of an endpoint string, when it names one specific address."""
    for part in description.split(":"):
        key, _, value = part.partition("=")
        if key == "interface" and value not in ("", "0.0.0.0", "::"):  # noqa: S104
            return value
    return None


def host_address() -> str:
    """This host's address as its peers see it (in a container: the container's address)."""
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class Prerequisite(Protocol):
    """A service the instance needs before it listens: ``ready()`` fires once it is."""

    running: bool | int

    def startService(self) -> None: ...

    def stopService(self) -> Deferred[Any] | None: ...

    def ready(self) -> Deferred[Any]:
        """Fires once the service can be used (at once if it already can)."""


class ClosedOnStop(Service):
    """A pool or client as a service: ``stopService`` closes it (*close* may return a
    Deferred) and returns a Deferred that fires once it is closed."""

    def __init__(self, name: str, close: Callable[[], object]) -> None:
        self.setName(name)  # type: ignore[no-untyped-call]
        self._close = close

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return maybeDeferred(self._close).addCallback(lambda _: None)


class ServingInstance(Service):
    """One serving process as a twistd service: see the module docstring for the order."""

    def __init__(
        self,
        *,
        endpoint: IStreamServerEndpoint,
        site: Site,
        listen_description: str,
        apply_schema: Callable[[], Deferred[None]],
        in_flight: InFlight,
        clock: IReactorTime,
        drain_timeout: float,
        advertise: tuple[str, int] | None = None,
        announce: Callable[[str, int], IService] | None = None,
        announce_grace: float = 0.0,
        linger: float = LINGER,
        workers: Sequence[IService] = (),
        resources: Sequence[IService] = (),
        prerequisites: Sequence[Prerequisite] = (),
        schema_retry_delay: Callable[[int], float] | None = None,
        reactor: IReactorCore | None = None,
    ) -> None:
        """*reactor* is stopped when the instance cannot start (None: the global reactor)."""
        self.endpoint = endpoint
        self.site = site
        self.listen_description = listen_description
        self.advertise = advertise
        self.apply_schema = apply_schema
        self.in_flight = in_flight
        self.announce = announce
        self.clock = clock
        self.drain_timeout = drain_timeout
        self.announce_grace = announce_grace
        self.linger = linger
        self.workers = list(workers)
        self.resources = list(resources)
        self.prerequisites = list(prerequisites)
        self.schema_retry_delay = schema_retry_delay or exponential_backoff()
        self._reactor = reactor
        self.port: IListeningPort | None = None
        self.announcement: IService | None = None
        self._workers_started = False
        self._waiting: Deferred[Any] | None = None
        self._starting: Deferred[None] | None = None
        self._retry: IDelayedCall | None = None
        self._stopping = False

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        for resource in self.resources:
            resource.startService()
        self._starting = self._start()
        self._starting.addErrback(self._start_failed)

    @inlineCallbacks
    def _start(self) -> Any:
        for prerequisite in self.prerequisites:
            prerequisite.startService()
        for prerequisite in self.prerequisites:
            self._waiting = prerequisite.ready()
            try:
                yield self._waiting
            except CancelledError:
                if self._stopping:
                    return
                raise
            finally:
                self._waiting = None
        if self._stopping:
            return
        self.port = yield self.endpoint.listen(self.site)
        assert self.port is not None
        bound: Any = self.port.getHost()
        host, port = self.advertise or (
            listen_interface(self.listen_description) or host_address(),
            bound.port,
        )
        log.info(
            "listening on {listen}, advertised as {host}:{port}",
            listen=self.listen_description,
            host=host,
            port=port,
        )
        yield self._schema_applied()
        if self._stopping:
            return
        for worker in self.workers:
            worker.startService()
        self._workers_started = True
        if self.announce is not None:
            self.announcement = self.announce(host, port)
            self.announcement.startService()

    def _schema_applied(self) -> Deferred[None]:
        """Apply the schema, retrying with back-off while MySQL cannot be reached."""
        done: Deferred[None] = Deferred()

        def attempt(number: int) -> None:
            self._retry = None
            if self._stopping:
                done.callback(None)
                return
            d = self.apply_schema()

            def failed(failure: Any) -> None:
                delay = self.schema_retry_delay(number)
                log.warn(
                    "schema not applied (attempt {attempt}), retrying in {delay:.1f}s: {error}",
                    attempt=number,
                    delay=delay,
                    error=failure.getErrorMessage(),
                )
                self._retry = self.clock.callLater(delay, attempt, number + 1)

            d.addCallbacks(lambda _: done.callback(None), failed)

        attempt(1)
        return done

    def _start_failed(self, failure: Any) -> None:
        log.failure("could not start", failure)
        if self._reactor is not None:
            self._reactor.stop()
        else:
            from twisted.internet import reactor

            reactor.stop()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self._stopping = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        if self._waiting is not None:
            self._waiting.cancel()
        return self._stop()

    @inlineCallbacks
    def _stop(self) -> Any:
        if self.announcement is not None:
            yield self.announcement.stopService()
            if self.announce_grace > 0:
                yield deferLater(self.clock, self.announce_grace)
        self.in_flight.start_draining()
        if self.port is not None:
            yield self.port.stopListening()
            log.info("stopped listening; {count} requests in flight", count=self.in_flight.count)
            if self.linger > 0:
                # A client that got its last answer just before the drain began may be sending
                # its next request on that connection now: serve it (it is answered with
                # Connection: close) rather than exit under it.
                yield deferLater(self.clock, self.linger)
        remaining = yield self.in_flight.drained(self.drain_timeout, self.clock)
        if remaining:
            log.warn("drain timeout: {count} requests still in flight", count=remaining)
        stopping = [w for w in self.workers if self._workers_started] + [
            p for p in self.prerequisites if p.running
        ]
        if stopping:
            yield gatherResults([maybeDeferred(s.stopService) for s in stopping])
        for resource in self.resources:
            try:
                yield maybeDeferred(resource.stopService)
            except Exception:
                log.failure("while closing {resource}", resource=resource.name)
        log.info("stopped")


def admin_listener(
    options: Any, app: ServiceApp, reactor: Any, fleet: IResource | None = None
) -> IService:
    """The admin listener (``--admin-listen``) serving *app*'s operator routes: a worker of
    the ServingInstance, so it is up before the instance registers and answers (``/metrics``
    during the drain included) until the public listener has drained."""
    return StreamServerEndpointService(
        serverFromString(reactor, options["admin-listen"]),
        LimitedSite(app.admin_resource(fleet), options["http-limits"], reactor=reactor),
    )
