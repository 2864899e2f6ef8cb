"""The chat instance's entry in Consul: registering it, keeping it there, and taking it out.

:class:`ChatRegistration` registers one :class:`ServiceInstance` with the local Consul agent
when it starts, retries with a back-off policy while the agent cannot be reached, watches that
the agent still has the instance (a dev agent's restart forgets it) and registers it again
when not, and deregisters it when it stops, without ever letting a dead agent block shutdown.

An agent that cannot be reached is asked again (with the same back-off) until it answers;
only its answer that it no longer has the instance registers it again. A persistent agent
comes back from a restart with the instance and its passing check; registering it again
then would reset the check to critical and take the instance out of every balancer's list
until the check's next run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import consul
from attrs import frozen
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from snet.consul import ConsulUnavailable, TreqConsul, consul_duration
from snet.httpcall import TimedOut, within
from snet.retry import exponential_backoff

__all__ = ["ChatRegistration", "ServiceInstance"]

log = Logger()


@frozen
class ServiceInstance:
    """What a chat instance registers: its identity, where peers reach it, and its check."""

    service_name: str
    instance_id: str
    address: str
    port: int
    version: str
    tags: tuple[str, ...] = ()
    check_interval: float = 1.0
    """Seconds between two runs of the HTTP health check."""
    check_timeout: float = 1.0
    """Seconds the health check waits for ``/health`` to answer."""
    deregister_critical_after: float = 60.0
    """Seconds after which Consul removes an instance whose check stays critical."""
    connect_native: bool = False
    """Whether the instance serves Connect TLS itself: it registers as Connect-native
    (``Connect: {Native: true}``) and its check calls ``https://`` without verifying the
    certificate (``TLSSkipVerify``: the agent is no Connect client; ``/health`` tells
    nothing)."""

    def check_url(self) -> str:
        """The URL Consul's HTTP check calls: ``http(s)://address:port/health``."""
        host = f"[{self.address}]" if ":" in self.address else self.address
        scheme = "https" if self.connect_native else "http"
        return f"{scheme}://{host}:{self.port}/health"

    def registration(self) -> dict[str, Any]:
        """The keyword arguments of py-consul's ``agent.service.register`` for this instance."""
        check = consul.Check.http(
            self.check_url(),
            consul_duration(self.check_interval),
            timeout=consul_duration(self.check_timeout),
            deregister=consul_duration(self.deregister_critical_after),
        )
        if not self.connect_native:
            return {**self._common(), "check": check}
        return {
            **self._common(),
            "check": {**check, "TLSSkipVerify": True},
            "connect": {"Native": True},
        }

    def _common(self) -> dict[str, Any]:
        return {
            "name": self.service_name,
            "service_id": self.instance_id,
            "address": self.address,
            "port": self.port,
            "tags": [*self.tags, f"version={self.version}"],
            "meta": {"version": self.version},
        }


def _accepted(answer: object) -> None:
    # py-consul's boolean callback is False for an unexpected 2xx or a 404.
    if not answer:
        raise consul.ConsulException(f"the agent did not accept the registration ({answer!r})")


class ChatRegistration(Service):
    """Keeps one :class:`ServiceInstance` registered with the Consul agent while running.

    Start it once the instance can serve (its check starts critical and passes after its first
    run). ``stopService`` deregisters, bounded by *stop_timeout* seconds.
    """

    def __init__(
        self,
        *,
        consul: TreqConsul,
        instance: ServiceInstance,
        clock: IReactorTime,
        retry_delay: Callable[[int], float] = exponential_backoff(),  # noqa: B008 (a pure policy)
        watch_interval: float = 2.0,
        stop_timeout: float = 5.0,
    ) -> None:
        self._consul = consul
        self.instance = instance
        self._clock = clock
        self._retry_delay = retry_delay
        self._watch_interval = watch_interval
        self._stop_timeout = stop_timeout
        self._registered = False
        self._ever_registered = False
        self._attempt = 0
        self._timer: IDelayedCall | None = None
        self._register_call: Deferred[None] | None = None
        self._watch_call: Deferred[None] | None = None
        self._unanswered = 0
        """Watches in a row the agent could not answer."""

    @property
    def registered(self) -> bool:
        """Whether the agent has the instance, as far as the last call to it showed."""
        return self._registered

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._attempt = 0
        self._register()

    # Registering, with retries.

    def _register(self) -> None:
        self._timer = None
        if not self.running:
            return
        self._attempt += 1
        attempt = self._attempt
        d: Deferred[Any] = self._consul.agent.service.register(**self.instance.registration())
        self._register_call = d  # before the callbacks, which clear it, can run
        d.addCallback(_accepted).addCallbacks(
            self._register_done, self._register_failed, errbackArgs=(attempt,)
        )

    def _register_done(self, _: None) -> None:
        self._register_call = None
        if not self.running:
            return  # stopService deregisters once this call has settled
        self._registered = True
        self._attempt = 0
        fields = {
            "service_id": self.instance.instance_id,
            "service_name": self.instance.service_name,
            "address": self.instance.address,
            "port": self.instance.port,
            "version": self.instance.version,
        }
        if self._ever_registered:
            log.info("registered again {service_id} ({service_name} at {address}:{port})", **fields)
        else:
            log.info(
                "registered {service_id} ({service_name} at {address}:{port}, version {version})",
                **fields,
            )
        self._ever_registered = True
        self._timer = self._clock.callLater(self._watch_interval, self._watch)

    def _register_failed(self, failure: Failure, attempt: int) -> None:
        self._register_call = None
        if not self.running:
            return
        delay = self._retry_delay(attempt)
        if isinstance(failure.value, (ConsulUnavailable, consul.ConsulException)):
            log.warn(
                "could not register {service_id} (attempt {attempt}): {error};"
                " retrying in {delay:.2f}s",
                service_id=self.instance.instance_id,
                attempt=attempt,
                delay=delay,
                error=failure.getErrorMessage(),
            )
        else:
            log.failure(
                "could not register {service_id} (attempt {attempt}); retrying in {delay:.2f}s",
                failure,
                service_id=self.instance.instance_id,
                attempt=attempt,
                delay=delay,
            )
        self._timer = self._clock.callLater(delay, self._register)

    # Watching that the agent still has the instance.

    def _watch(self) -> None:
        self._timer = None
        if not self.running:
            return
        d: Deferred[Any] = self._consul.agent.service_definition(self.instance.instance_id)
        self._watch_call = d
        d.addCallbacks(self._watched, self._watch_failed)

    def _watched(self, definition: object) -> None:
        self._watch_call = None
        if not self.running:
            return
        unanswered, self._unanswered = self._unanswered, 0
        if definition is None:
            self._lost("the agent no longer has it")
            return
        if unanswered:
            log.info(
                "the agent answers again and still has {service_id}",
                service_id=self.instance.instance_id,
            )
        self._timer = self._clock.callLater(self._watch_interval, self._watch)

    def _watch_failed(self, failure: Failure) -> None:
        self._watch_call = None
        if not self.running:
            return
        self._unanswered += 1
        delay = self._retry_delay(self._unanswered)
        if self._unanswered == 1:
            log.warn(
                "cannot ask the agent whether it still has {service_id}: {error};"
                " asking again until it answers",
                service_id=self.instance.instance_id,
                error=failure.getErrorMessage(),
            )
        self._timer = self._clock.callLater(delay, self._watch)

    def _lost(self, reason: str) -> None:
        self._registered = False
        log.warn("lost {service_id}: {reason}", service_id=self.instance.instance_id, reason=reason)
        self._attempt = 0
        self._register()

    # Stopping.

    def stopService(self) -> Deferred[None]:
        """Cancel retries and watching, deregister; fires when done or after *stop_timeout*.

        A registration already sent is let finish first, so that the deregistration comes after
        it; a failure or a timeout is logged, never raised.
        """
        super().stopService()  # type: ignore[no-untyped-call]
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._watch_call is not None:
            self._watch_call.cancel()
        in_flight = self._register_call
        settled: Deferred[None]
        if in_flight is None:
            settled = succeed(None)
        else:
            settled = Deferred()

            def fire(result: object) -> object:
                settled.callback(None)
                return result

            in_flight.addBoth(fire)

        service_id = self.instance.instance_id

        def deregister(_: None) -> Deferred[Any]:
            d: Deferred[Any] = self._consul.agent.service.deregister(service_id)
            return d

        def deregistered(known: object) -> None:
            self._registered = False
            if known:
                log.info("deregistered {service_id}", service_id=service_id)
            else:
                log.info(
                    "deregistered {service_id} (the agent did not have it)", service_id=service_id
                )

        def failed(failure: Failure) -> None:
            if failure.check(TimedOut):  # type: ignore[no-untyped-call]
                log.warn(
                    "gave up deregistering {service_id}: no answer within {timeout}s",
                    service_id=service_id,
                    timeout=self._stop_timeout,
                )
                if in_flight is not None:
                    in_flight.cancel()
            else:
                log.warn(
                    "could not deregister {service_id}: {error}",
                    service_id=service_id,
                    error=failure.getErrorMessage(),
                )

        work = within(settled.addCallback(deregister), self._stop_timeout, self._clock)
        return work.addCallbacks(deregistered, failed)
