"""The order in which a serving process (chat instance or monolith) starts and stops."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import capturedLogs, formatEvent
from twisted.web.test.requesthelper import DummyRequest

from snet.lifecycle import ClosedOnStop, ServingInstance
from snet.testing import result_of
from snet.web.draining import InFlight


class Recorder:
    """Fakes of the instance's collaborators that write what happens to one shared list."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.schema_results: list[Deferred[None]] = []
        self.deregistered: Deferred[None] = Deferred()
        self.registered_at: tuple[str, int] | None = None

    # the listening port
    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "0.0.0.0", 9555)

    def stopListening(self) -> Deferred[None]:
        self.events.append("stop listening")
        return succeed(None)

    # the endpoint
    def listen(self, factory: Any) -> Deferred[Any]:
        self.events.append("listen")
        return succeed(self)

    # the message store
    def apply_schema(self) -> Deferred[None]:
        self.events.append("apply schema")
        d: Deferred[None] = Deferred()
        self.schema_results.append(d)
        return d

    # the registration
    def make_registration(self, host: str, port: int) -> Recorder:
        self.registered_at = (host, port)
        return self

    def startService(self) -> None:
        self.events.append("register")

    def stopService(self) -> Deferred[None]:
        self.events.append("deregister")
        return self.deregistered

    def close(self) -> None:
        self.events.append("close")


class Worker(Service):
    """A background worker (discovery, fan-out) that records when it starts and stops."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    def startService(self) -> None:
        self.recorder.events.append("start worker")

    def stopService(self) -> None:
        self.recorder.events.append("stop worker")


def make_instance(
    recorder: Recorder,
    clock: Clock,
    in_flight: InFlight,
    resources: list[ClosedOnStop] | None = None,
    linger: float = 0.0,
) -> ServingInstance:
    return ServingInstance(
        endpoint=recorder,  # type: ignore[arg-type]
        site=None,  # type: ignore[arg-type]
        listen_description="tcp:0:interface=127.0.0.1",
        apply_schema=recorder.apply_schema,
        in_flight=in_flight,
        clock=clock,
        drain_timeout=5.0,
        announce=recorder.make_registration,  # type: ignore[arg-type]
        announce_grace=0.5,
        linger=linger,
        workers=[Worker(recorder)],
        resources=[ClosedOnStop("pool", recorder.close)] if resources is None else resources,
        schema_retry_delay=lambda attempt: 2.0**attempt,
    )


def test_it_registers_only_after_listening_and_applying_the_schema_retrying_with_back_off() -> None:
    recorder, clock = Recorder(), Clock()
    instance = make_instance(recorder, clock, InFlight())
    instance.startService()
    assert recorder.events == ["listen", "apply schema"]
    recorder.schema_results[0].errback(ConnectionRefusedError("mysql down"))
    clock.advance(1.9)
    assert recorder.events == ["listen", "apply schema"]
    clock.advance(0.1)  # attempt 1 failed -> 2 s
    recorder.schema_results[1].errback(ConnectionRefusedError("mysql still down"))
    clock.advance(4.0)  # attempt 2 failed -> 4 s
    assert recorder.events == ["listen", "apply schema", "apply schema", "apply schema"]
    recorder.schema_results[2].callback(None)
    assert recorder.events[-2:] == ["start worker", "register"]
    assert recorder.registered_at == ("127.0.0.1", 9555)


def test_stop_deregisters_then_waits_then_closes_the_port_then_drains_then_closes() -> None:
    recorder, clock = Recorder(), Clock()
    in_flight = InFlight()
    instance = make_instance(recorder, clock, in_flight)
    instance.startService()
    recorder.schema_results[0].callback(None)
    del recorder.events[:]

    stopped = instance.stopService()
    assert recorder.events == ["deregister"]
    recorder.deregistered.callback(None)
    clock.advance(0.4)
    assert recorder.events == ["deregister"]  # the grace period lets watchers notice
    clock.advance(0.1)
    assert recorder.events == ["deregister", "stop listening", "stop worker", "close"]
    assert result_of(stopped) is None


def test_stop_waits_for_requests_in_flight_up_to_the_drain_timeout() -> None:
    recorder, clock = Recorder(), Clock()
    in_flight = InFlight()
    instance = make_instance(recorder, clock, in_flight)
    instance.startService()
    recorder.schema_results[0].callback(None)
    finished, stuck = DummyRequest([b"done"]), DummyRequest([b"stuck"])
    in_flight.begin(finished)
    in_flight.begin(stuck)
    del recorder.events[:]

    stopped = instance.stopService()
    recorder.deregistered.callback(None)
    clock.advance(0.5)
    assert recorder.events == ["deregister", "stop listening"]  # still draining
    finished.finish()
    clock.advance(4.9)
    assert recorder.events == ["deregister", "stop listening"]  # one request still in flight
    clock.advance(0.1)  # the drain timeout ends the wait for the stuck one
    assert recorder.events == ["deregister", "stop listening", "stop worker", "close"]
    assert result_of(stopped) is None


def test_a_request_on_a_kept_alive_connection_during_the_linger_is_served_before_the_exit() -> None:
    """After the port is closed the instance lingers: a request that comes in on a connection
    kept alive from before (a client answered just before the drain began) is served, told
    Connection: close, and waited for; only then do the workers and resources stop."""
    recorder, clock = Recorder(), Clock()
    in_flight = InFlight()
    instance = make_instance(recorder, clock, in_flight, linger=0.25)
    instance.startService()
    recorder.schema_results[0].callback(None)
    del recorder.events[:]

    stopped = instance.stopService()
    recorder.deregistered.callback(None)
    clock.advance(0.5)
    assert recorder.events == ["deregister", "stop listening"]
    clock.advance(0.2)
    late = DummyRequest([b"late"])
    in_flight.begin(late)
    assert late.responseHeaders.getRawHeaders(b"connection") == [b"close"]
    clock.advance(0.05)  # the linger is over; the late request is still in flight
    assert recorder.events == ["deregister", "stop listening"]
    late.finish()
    assert recorder.events == ["deregister", "stop listening", "stop worker", "close"]
    assert result_of(stopped) is None


def test_stop_before_the_schema_is_applied_never_registers() -> None:
    recorder, clock = Recorder(), Clock()
    instance = make_instance(recorder, clock, InFlight())
    instance.startService()
    recorder.schema_results[0].errback(ConnectionRefusedError("mysql down"))
    stopped = instance.stopService()
    assert result_of(stopped) is None
    clock.advance(100)
    assert "register" not in recorder.events
    assert "start worker" not in recorder.events
    assert clock.getDelayedCalls() == []


def test_a_resource_stops_by_closing_its_pool_or_client_and_waits_for_the_closing() -> None:
    closing: Deferred[None] = Deferred()
    resource = ClosedOnStop("redis", lambda: closing)
    resource.startService()
    stopped = resource.stopService()
    assert not resource.running
    assert not stopped.called
    closing.callback(None)
    assert result_of(stopped) is None


def test_resources_close_one_after_another_in_the_order_given_once_the_workers_stopped() -> None:
    recorder, clock = Recorder(), Clock()
    consul_closed: Deferred[None] = Deferred()

    def close(name: str, result: Deferred[None] | None = None) -> Deferred[None] | None:
        recorder.events.append(f"close {name}")
        return result

    instance = make_instance(
        recorder,
        clock,
        InFlight(),
        resources=[
            ClosedOnStop("consul", lambda: close("consul", consul_closed)),
            ClosedOnStop("redis", lambda: close("redis")),
            ClosedOnStop("mysql", lambda: close("mysql")),
        ],
    )
    instance.startService()
    assert all(resource.running for resource in instance.resources)
    recorder.schema_results[0].callback(None)
    del recorder.events[:]

    stopped = instance.stopService()
    recorder.deregistered.callback(None)
    clock.advance(0.5)
    assert recorder.events == ["deregister", "stop listening", "stop worker", "close consul"]
    consul_closed.callback(None)
    assert recorder.events[-2:] == ["close redis", "close mysql"]
    assert result_of(stopped) is None


def test_a_resource_that_fails_to_close_is_logged_and_the_next_ones_still_close() -> None:
    recorder, clock = Recorder(), Clock()

    def broken() -> None:
        raise OSError("already gone")

    instance = make_instance(
        recorder,
        clock,
        InFlight(),
        resources=[ClosedOnStop("consul", broken), ClosedOnStop("mysql", recorder.close)],
    )
    instance.startService()
    recorder.schema_results[0].callback(None)
    with capturedLogs() as events:
        stopped = instance.stopService()
        recorder.deregistered.callback(None)
        clock.advance(0.5)
    assert result_of(stopped) is None
    assert recorder.events[-1] == "close"
    failures = [e for e in events if "log_failure" in e]
    assert [formatEvent(e) for e in failures] == ["while closing consul"]


class TakenPort:
    """An endpoint whose port another process holds."""

    def listen(self, factory: Any) -> Deferred[Any]:
        return fail(CannotListenError("", 9555, OSError("address in use")))


def test_an_instance_that_cannot_listen_logs_why_and_stops_its_reactor() -> None:
    reactor = MemoryReactorClock()
    instance = ServingInstance(
        endpoint=TakenPort(),  # type: ignore[arg-type]
        site=None,  # type: ignore[arg-type]
        listen_description="tcp:9555",
        apply_schema=lambda: succeed(None),
        in_flight=InFlight(),
        clock=reactor,
        drain_timeout=5.0,
        reactor=reactor,
    )
    with capturedLogs() as events:
        instance.startService()
    assert reactor.hasStopped
    assert [formatEvent(e) for e in events if "log_failure" in e] == ["could not start"]


class Identity(Service):
    """A prerequisite (like the Connect certificate watcher): ready once ``ready_now``."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.waiting: list[Deferred[str]] = []

    def startService(self) -> None:
        super().startService()
        self.recorder.events.append("start identity")

    def stopService(self) -> None:
        super().stopService()
        self.recorder.events.append("stop identity")

    def ready(self) -> Deferred[str]:
        d: Deferred[str] = Deferred(self.waiting.remove)
        self.waiting.append(d)
        return d

    def ready_now(self) -> None:
        self.recorder.events.append("identity ready")
        for d in self.waiting:
            d.callback("identity")


def with_identity(recorder: Recorder, clock: Clock) -> tuple[ServingInstance, Identity]:
    identity = Identity(recorder)
    instance = make_instance(recorder, clock, InFlight())
    instance.prerequisites = [identity]
    return instance, identity


def test_it_listens_only_once_its_prerequisites_are_ready() -> None:
    recorder, clock = Recorder(), Clock()
    instance, identity = with_identity(recorder, clock)
    instance.startService()
    assert recorder.events == ["start identity"]
    identity.ready_now()
    recorder.schema_results[0].callback(None)
    assert recorder.events == [
        "start identity",
        "identity ready",
        "listen",
        "apply schema",
        "start worker",
        "register",
    ]
    recorder.deregistered.callback(None)
    stopped = instance.stopService()
    clock.advance(0.5)
    result_of(stopped)
    assert recorder.events[-4:] == ["stop listening", "stop worker", "stop identity", "close"]


def test_stop_while_waiting_for_a_prerequisite_never_listens_and_stops_it() -> None:
    recorder, clock = Recorder(), Clock()
    instance, identity = with_identity(recorder, clock)
    with capturedLogs() as events:
        instance.startService()
        result_of(instance.stopService())
    assert recorder.events == ["start identity", "stop identity", "close"]
    assert identity.waiting == []
    assert not [e for e in events if e.get("log_failure") is not None]
