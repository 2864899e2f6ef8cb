"""ChatRegistration and its retry policy, against a fake agent in memory and a Clock."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs, formatEvent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from snet.chat.registration import ChatRegistration, ServiceInstance
from snet.config import ConsulConfig
from snet.consul import TreqConsul, consul_duration
from snet.testing import result_of

INSTANCE = ServiceInstance(
    service_name="snet-chat",
    instance_id="chat-1",
    address="10.0.0.5",
    port=8081,
    version="1.2.3",
    tags=("dialogs",),
)


class FakeAgent(Resource):
    """The agent endpoints registration uses; it can be down, hang, or forget its services."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.services: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str]] = []
        self.hang = False
        self.refuse_registrations = False
        self._hanging: list[tuple[Request, str, str, bytes]] = []

    def render(self, request: Request) -> bytes | int:
        assert request.method is not None and request.path is not None
        method, path = request.method.decode(), request.path.decode()
        body = request.content.read() if request.content is not None else b""
        self.requests.append((method, path))
        if self.hang:
            self._hanging.append((request, method, path, body))
            return NOT_DONE_YET
        return self._answer(request, method, path, body)

    def release(self) -> None:
        """Answer the requests that were left hanging."""
        hanging, self._hanging = self._hanging, []
        for request, method, path, body in hanging:
            request.write(self._answer(request, method, path, body))
            request.finish()

    def _answer(self, request: Request, method: str, path: str, body: bytes) -> bytes:
        if method == "PUT" and path == "/v1/agent/service/register" and self.refuse_registrations:
            request.setResponseCode(500)
            return b"refused"
        if method == "PUT" and path == "/v1/agent/service/register":
            definition = {k.lower(): v for k, v in json.loads(body).items()}
            self.services[definition["id"]] = definition
            return b""
        if method == "PUT" and path.startswith("/v1/agent/service/deregister/"):
            if self.services.pop(path.rsplit("/", 1)[1], None) is None:
                request.setResponseCode(404)
            return b""
        if method == "GET" and path.startswith("/v1/agent/service/"):
            service = self.services.get(path.rsplit("/", 1)[1])
            if service is None:
                request.setResponseCode(404)
                return b"unknown service ID"
            return json.dumps({"ID": service["id"], "Service": service["name"]}).encode()
        request.setResponseCode(404)
        return b""


class SwitchableTreq:
    """StubTreq in front of the fake agent, with a switch that makes connections fail."""

    def __init__(self, agent: FakeAgent) -> None:
        self.stub = StubTreq(agent)
        self.down = False

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        if self.down:
            return fail(ConnectionRefusedError("agent is down"))
        d: Deferred[Any] = self.stub.request(method, url, **kwargs)
        return d


class Harness:
    def __init__(self, retry_delay: Any = None, **kwargs: Any) -> None:
        self.clock = Clock()
        self.agent = FakeAgent()
        self.http = SwitchableTreq(self.agent)
        self.consul = TreqConsul(
            ConsulConfig.from_url("http://127.0.0.1:8500"),
            reactor=self.clock,
            http=self.http,  # type: ignore[arg-type]
            timeout=3.0,
        )
        self.delays_asked: list[int] = []

        def policy(attempt: int) -> float:
            self.delays_asked.append(attempt)
            return float(attempt)

        self.registration = ChatRegistration(
            consul=self.consul,
            instance=INSTANCE,
            clock=self.clock,
            retry_delay=retry_delay or policy,
            **kwargs,
        )


@pytest.fixture
def h() -> Harness:
    return Harness(watch_interval=2.0, stop_timeout=5.0)


@pytest.fixture
def logs() -> Iterator[Sequence[LogEvent]]:
    with capturedLogs() as events:
        yield events


def has_result(d: Deferred[Any]) -> bool:
    """Whether *d* has its final result (``d.called`` is also true while it waits on another)."""
    box: list[object] = []

    def keep(result: object) -> object:
        box.append(result)
        return result

    d.addBoth(keep)
    return bool(box)


def messages(events: Sequence[LogEvent]) -> list[str]:
    return [
        str(formatEvent(e)) for e in events if e.get("log_namespace") == "snet.chat.registration"
    ]


def test_starting_registers_the_instance_with_its_check(
    h: Harness, logs: Sequence[LogEvent]
) -> None:
    """The payload: name, ID, address, port, tags with the version, meta, an HTTP check."""
    h.registration.startService()
    assert h.registration.registered
    service = h.agent.services["chat-1"]
    assert service["name"] == "snet-chat"
    assert (service["address"], service["port"]) == ("10.0.0.5", 8081)
    assert service["tags"] == ["dialogs", "version=1.2.3"]
    assert service["meta"] == {"version": "1.2.3"}
    [check] = service["checks"]
    assert check == {
        "http": "http://10.0.0.5:8081/health",
        "interval": "1s",
        "timeout": "1s",
        "DeregisterCriticalServiceAfter": "60s",
    }
    assert messages(logs) == ["registered chat-1 (snet-chat at 10.0.0.5:8081, version 1.2.3)"]


def test_retries_follow_the_policy_while_the_agent_is_down(
    h: Harness, logs: Sequence[LogEvent]
) -> None:
    """Attempt n failing waits retry_delay(n); each failure is logged once with both."""
    h.http.down = True
    h.registration.startService()
    assert not h.registration.registered
    assert [c.getTime() for c in h.clock.getDelayedCalls()] == [1.0]
    h.clock.advance(1.0)  # attempt 2 fails, waits 2 s
    assert [c.getTime() for c in h.clock.getDelayedCalls()] == [3.0]
    h.clock.advance(1.9)
    assert h.delays_asked == [1, 2]
    h.http.down = False
    h.clock.advance(0.1)  # attempt 3 succeeds
    assert h.registration.registered
    assert h.delays_asked == [1, 2]
    failures = [e for e in logs if e.get("attempt") is not None]
    assert [(e["attempt"], e["delay"]) for e in failures] == [(1, 1.0), (2, 2.0)]
    assert "could not register chat-1 (attempt 1)" in messages(logs)[0]
    assert "retrying in 1.00s" in messages(logs)[0]
    assert messages(logs)[-1].startswith("registered chat-1")


def test_after_a_success_the_attempts_count_from_one_again(
    h: Harness, logs: Sequence[LogEvent]
) -> None:
    h.http.down = True
    h.registration.startService()
    h.clock.advance(1.0)
    h.http.down = False
    h.clock.advance(2.0)  # attempt 3 succeeds
    assert h.registration.registered
    h.agent.services.clear()
    h.agent.refuse_registrations = True
    h.clock.advance(2.0)  # the watch: lost; attempt 1 is refused
    assert h.delays_asked == [1, 2, 1]
    assert "could not register chat-1 (attempt 1)" in messages(logs)[-1]


def test_registers_again_when_the_agent_forgets_the_instance(
    h: Harness, logs: Sequence[LogEvent]
) -> None:
    """An agent restart forgets the instance: the next watch sees it and registers again."""
    h.registration.startService()
    h.clock.advance(2.0)
    h.clock.advance(2.0)
    assert h.agent.requests.count(("GET", "/v1/agent/service/chat-1")) == 2
    h.agent.services.clear()
    h.clock.advance(2.0)
    assert "chat-1" in h.agent.services
    assert h.registration.registered
    assert messages(logs)[1:] == [
        "lost chat-1: the agent no longer has it",
        "registered again chat-1 (snet-chat at 10.0.0.5:8081)",
    ]


def test_while_the_agent_cannot_be_reached_it_is_asked_again_not_registered_again(
    h: Harness, logs: Sequence[LogEvent]
) -> None:
    """A persistent agent comes back from a restart with the instance and its passing check:
    registering again would reset the check to critical, so nothing is registered; the
    outage and its end are logged once each."""
    h.registration.startService()
    h.http.down = True
    h.clock.advance(2.0)  # the watch fails: asked again after retry_delay(1)
    h.clock.advance(1.0)  # fails again: retry_delay(2)
    assert h.delays_asked == [1, 2]
    assert h.registration.registered  # as far as the agent last said
    h.http.down = False
    h.clock.advance(2.0)
    registrations = h.agent.requests.count(("PUT", "/v1/agent/service/register"))
    assert registrations == 1
    texts = messages(logs)
    assert texts[1].startswith("cannot ask the agent whether it still has chat-1")
    assert texts[2:] == ["the agent answers again and still has chat-1"]
    h.clock.advance(2.0)  # watching at the usual interval again
    assert h.delays_asked == [1, 2]


def test_registers_again_when_the_agent_comes_back_without_the_instance(
    h: Harness, logs: Sequence[LogEvent]
) -> None:
    """A dev agent comes back empty: its answer, not the outage, registers the instance."""
    h.registration.startService()
    h.http.down = True
    h.clock.advance(2.0)  # the watch fails: asked again in 1 s
    h.http.down = False
    h.agent.services.clear()  # the agent restarted empty
    h.clock.advance(1.0)
    assert h.registration.registered
    assert "chat-1" in h.agent.services
    texts = messages(logs)
    assert texts[1].startswith("cannot ask the agent whether it still has chat-1")
    assert texts[2:] == [
        "lost chat-1: the agent no longer has it",
        "registered again chat-1 (snet-chat at 10.0.0.5:8081)",
    ]


def test_stop_deregisters_and_leaves_no_timer(h: Harness, logs: Sequence[LogEvent]) -> None:
    h.registration.startService()
    assert result_of(h.registration.stopService()) is None
    assert h.agent.services == {}
    assert not h.registration.registered
    assert h.clock.getDelayedCalls() == []
    assert messages(logs)[-1] == "deregistered chat-1"


def test_stop_while_retrying_cancels_the_retry_and_never_registers(
    h: Harness, logs: Sequence[LogEvent]
) -> None:
    """A failed deregistration is logged, not raised; nothing registers after stop."""
    h.http.down = True
    h.registration.startService()
    assert result_of(h.registration.stopService()) is None
    assert h.clock.getDelayedCalls() == []
    assert messages(logs)[-1].startswith("could not deregister chat-1: Consul agent unavailable")
    h.http.down = False
    h.clock.advance(100)
    assert h.agent.requests == []
    assert h.agent.services == {}


def test_stop_is_bounded_when_the_agent_hangs(logs: Sequence[LogEvent]) -> None:
    """stop_timeout (2 s, shorter than the 3 s call timeout here) bounds the deregistration."""
    h = Harness(stop_timeout=2.0)
    h.registration.startService()
    h.agent.hang = True
    d = h.registration.stopService()
    h.clock.advance(1.9)
    assert not has_result(d)
    h.clock.advance(0.1)
    assert result_of(d) is None
    assert h.clock.getDelayedCalls() == []
    assert messages(logs)[-1] == "gave up deregistering chat-1: no answer within 2.0s"


def test_stop_is_bounded_by_the_call_timeout_when_it_is_shorter(
    h: Harness, logs: Sequence[LogEvent]
) -> None:
    """With the 3 s call timeout under the 5 s stop_timeout, the call's own timeout ends it."""
    h.registration.startService()
    h.agent.hang = True
    d = h.registration.stopService()
    h.clock.advance(3.0)
    assert result_of(d) is None
    assert h.clock.getDelayedCalls() == []
    assert "no answer within 3s" in messages(logs)[-1]


def test_stop_waits_for_a_registration_in_flight_then_deregisters(
    h: Harness, logs: Sequence[LogEvent]
) -> None:
    """A registration the agent may already have taken is followed by the deregistration."""
    h.agent.hang = True
    h.registration.startService()
    d = h.registration.stopService()
    assert not has_result(d)
    assert h.agent.requests == [("PUT", "/v1/agent/service/register")]
    h.agent.hang = False
    h.agent.release()
    h.http.stub.flush()
    assert result_of(d) is None
    assert h.agent.requests[-1] == ("PUT", "/v1/agent/service/deregister/chat-1")
    assert h.agent.services == {}
    assert not h.registration.registered
    assert not any(m.startswith("registered") for m in messages(logs))
    h.clock.advance(100)
    assert h.clock.getDelayedCalls() == []
    assert h.agent.requests[-1] == ("PUT", "/v1/agent/service/deregister/chat-1")


def test_stop_cancels_a_watch_in_flight(h: Harness) -> None:
    h.registration.startService()
    h.agent.hang = True
    h.clock.advance(2.0)  # the watch hangs
    h.agent.hang = False
    assert result_of(h.registration.stopService()) is None
    assert h.agent.services == {}
    assert h.clock.getDelayedCalls() == []


def test_a_stopped_registration_can_start_again(h: Harness) -> None:
    h.registration.startService()
    result_of(h.registration.stopService())
    h.registration.startService()
    assert h.registration.registered
    assert "chat-1" in h.agent.services


def test_check_url_brackets_ipv6() -> None:
    assert INSTANCE.check_url() == "http://10.0.0.5:8081/health"
    v6 = ServiceInstance("snet-chat", "chat-2", "::1", 9000, "1")
    assert v6.check_url() == "http://[::1]:9000/health"


def test_check_durations_are_consul_strings() -> None:
    instance = ServiceInstance(
        "snet-chat",
        "chat-3",
        "h",
        1,
        "1",
        check_interval=0.5,
        check_timeout=2.0,
        deregister_critical_after=90,
    )
    check = instance.registration()["check"]
    assert (check["interval"], check["timeout"]) == ("500ms", "2s")
    assert check["DeregisterCriticalServiceAfter"] == "90s"
    assert consul_duration(60.0) == "60s"


def test_a_connect_native_instance_registers_so_and_checks_health_over_tls() -> None:
    instance = ServiceInstance("snet-chat", "chat-4", "10.0.0.5", 8081, "1", connect_native=True)
    registration = instance.registration()
    assert registration["connect"] == {"Native": True}
    assert registration["check"]["http"] == "https://10.0.0.5:8081/health"
    assert registration["check"]["TLSSkipVerify"] is True
    assert "connect" not in INSTANCE.registration()
    assert "TLSSkipVerify" not in INSTANCE.registration()["check"]
