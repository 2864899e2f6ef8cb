"""TreqConsul and ChatRegistration on the real reactor against a real Consul dev agent."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs, formatEvent
from twisted.web.resource import Resource
from twisted.web.server import Site

from snet.chat.registration import ChatRegistration, ServiceInstance
from snet.config import ConsulConfig
from snet.consul import TreqConsul
from snet.retry import exponential_backoff
from snet.testing.servers import ConsulAgent
from snet.testing.waiting import connections_to, eventually, sleep

pytestmark = pytest.mark.integration

Inline = Generator[Deferred[Any], Any, None]


@pytest.fixture(scope="module")
def agent() -> Iterator[ConsulAgent]:
    """An agent of this module's own: a test here restarts it."""
    with ConsulAgent() as consul_agent:
        yield consul_agent


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Health(Resource):
    isLeaf = True

    def render_GET(self, request: object) -> bytes:
        return b"ok"


@pytest_twisted.inlineCallbacks
def test_register_and_deregister_round_trip(agent: ConsulAgent) -> Inline:
    client = TreqConsul(ConsulConfig.from_url(agent.url))
    name, service_id = unique("roundtrip"), unique("roundtrip-1")
    try:
        accepted = yield client.agent.service.register(
            name, service_id=service_id, address="127.0.0.1", port=4321, tags=["version=1"]
        )
        assert accepted is True
        services = yield client.agent.services()
        assert services[service_id]["Service"] == name
        assert services[service_id]["Tags"] == ["version=1"]
        definition = yield client.agent.service_definition(service_id)
        assert definition["Port"] == 4321
        index, nodes = yield client.health.service(name)
        assert isinstance(index, str)
        assert [n["Service"]["ID"] for n in nodes] == [service_id]
        assert (yield client.agent.service.deregister(service_id)) is True
        assert (yield client.agent.service_definition(service_id)) is None
        assert service_id not in (yield client.agent.services())
    finally:
        yield client.close()
    assert connections_to(agent.http_port) == []


@pytest_twisted.inlineCallbacks
def test_blocking_query_wakes_on_a_registration(agent: ConsulAgent) -> Inline:
    """health.service(index=..., wait="5s", passing=True) answers soon after a registration."""
    client = TreqConsul(ConsulConfig.from_url(agent.url))
    name, service_id = unique("blocking"), unique("blocking-1")
    try:
        index, nodes = yield client.health.service(name, passing=True)
        assert nodes == []
        started = time.monotonic()
        query = client.health.service(name, index=index, wait="5s", passing=True)
        yield sleep(0.2)
        yield client.agent.service.register(name, service_id=service_id, port=4322)
        # A wake-up is any change of the service's health: loop until it is there.
        while True:
            index, nodes = yield query
            if nodes:
                break
            query = client.health.service(name, index=index, wait="5s", passing=True)
        elapsed = time.monotonic() - started
        assert [n["Service"]["ID"] for n in nodes] == [service_id]
        assert elapsed < 4.0, f"the blocking query took {elapsed:.2f}s"
        yield client.agent.service.deregister(service_id)
    finally:
        yield client.close()


@pytest_twisted.inlineCallbacks
def test_close_cancels_a_blocking_query_and_leaves_no_connection(agent: ConsulAgent) -> Inline:
    client = TreqConsul(ConsulConfig.from_url(agent.url))
    index, _ = yield client.health.service(unique("idle"))
    query = client.health.service(unique("idle"), index=index, wait="30s")
    query.addErrback(lambda _: None)
    yield sleep(0.1)
    assert connections_to(agent.http_port) != []
    yield client.close()
    assert connections_to(agent.http_port) == []


def registration_with(agent: ConsulAgent) -> tuple[Any, TreqConsul, ChatRegistration]:
    """A ``/health`` that passes on a port of its own, a Consul client of *agent* and the
    registration of a chat instance there (quick retries and watches); the caller starts
    and stops them."""
    site = Site(Resource())
    site.resource.putChild(b"health", Health())
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    client = TreqConsul(ConsulConfig.from_url(agent.url), timeout=2.0)
    instance = ServiceInstance(
        service_name=unique("snet-chat"),
        instance_id=unique("chat"),
        address="127.0.0.1",
        port=port.getHost().port,
        version="9.9.9",
    )
    registration = ChatRegistration(
        consul=client,
        instance=instance,
        clock=reactor,  # type: ignore[arg-type]
        retry_delay=exponential_backoff(initial=0.1, maximum=0.5),
        watch_interval=0.3,
        stop_timeout=5.0,
    )
    return port, client, registration


def only_passing(client: TreqConsul, instance: ServiceInstance) -> Callable[[], Deferred[bool]]:
    """Whether *instance* is its service's one passing instance, as Consul says."""

    def passing() -> Deferred[bool]:
        d: Deferred[Any] = client.health.service(instance.service_name, passing=True)
        return d.addCallback(
            lambda answer: [n["Service"]["ID"] for n in answer[1]] == [instance.instance_id]
        )

    return passing


@pytest_twisted.inlineCallbacks
def test_chat_registration_survives_an_agent_restart_and_deregisters_on_stop(
    agent: ConsulAgent,
) -> Inline:
    """Registered with a passing check; registered again after a restart; gone after stop."""
    port, client, registration = registration_with(agent)
    instance = registration.instance
    passing = only_passing(client, instance)

    def known() -> Deferred[bool]:
        d: Deferred[Any] = client.agent.service_definition(instance.instance_id)
        # The agent may answer this before the registration has read its own answer.
        return d.addCallback(lambda definition: definition is not None and registration.registered)

    try:
        with capturedLogs() as events:
            registration.startService()
            yield eventually(known, 5, "the registration")
            definition = yield client.agent.service_definition(instance.instance_id)
            assert "version=9.9.9" in definition["Tags"]
            assert definition["Meta"] == {"version": "9.9.9"}
            yield eventually(passing, 10, "the /health check to pass")

            yield threads.deferToThread(agent.restart)
            yield eventually(known, 10, "the registration after the agent restart")
            assert registration.registered
            yield eventually(passing, 10, "the check to pass after the restart")

            yield registration.stopService()
            assert not registration.registered
            assert (yield client.agent.service_definition(instance.instance_id)) is None
            said = [
                str(formatEvent(e)).split(" ")[0:2]
                for e in events
                if e.get("service_id") == instance.instance_id
            ]
            assert said[0] == ["registered", instance.instance_id], said
            assert ["lost", f"{instance.instance_id}:"] in said, said
            assert said[-2:] == [
                ["registered", "again"],
                ["deregistered", instance.instance_id],
            ], said
    finally:
        if registration.running:
            yield registration.stopService()
        yield client.close()
        yield port.stopListening()
    assert connections_to(agent.http_port) == []


@pytest.fixture(scope="module")
def persistent_agent() -> Iterator[ConsulAgent]:
    """A one-server agent that keeps its state over a restart, as a real one does."""
    with ConsulAgent(persistent=True) as consul_agent:
        yield consul_agent


@pytest_twisted.inlineCallbacks
def test_a_persistent_agents_restart_keeps_the_instance_and_it_is_not_registered_again(
    persistent_agent: ConsulAgent,
) -> Inline:
    """The agent comes back with the instance and its passing check. Registering it again
    (as when the agent forgot it) would reset the check to critical and take the instance
    out of every balancer's list until the check ran again."""
    agent = persistent_agent
    port, client, registration = registration_with(agent)
    instance = registration.instance
    passing = only_passing(client, instance)

    def said() -> list[str]:
        return [str(formatEvent(e)) for e in events if e.get("service_id") == instance.instance_id]

    try:
        with capturedLogs() as events:
            registration.startService()
            yield eventually(passing, 10, "the /health check to pass")
            yield threads.deferToThread(agent.restart)
            yield eventually(
                lambda: any("answers again" in line for line in said()), 10, "the agent's answer"
            )
            assert (yield passing())
            lines = said()
            assert not [line for line in lines if "registered again" in line], lines
            service_id = instance.instance_id
            assert lines[-1] == f"the agent answers again and still has {service_id}"
            assert lines[-2].startswith(f"cannot ask the agent whether it still has {service_id}")
    finally:
        if registration.running:
            yield registration.stopService()
        yield client.close()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_stop_with_the_agent_gone_is_bounded(agent: ConsulAgent) -> Inline:
    """Against a port where nothing listens, stopping still fires, quickly."""
    dead = ConsulConfig.from_url(f"http://127.0.0.1:{agent.http_port}")
    client = TreqConsul(dead, timeout=1.0)
    registration = ChatRegistration(
        consul=client,
        instance=ServiceInstance(unique("gone"), unique("gone-1"), "127.0.0.1", 1, "1"),
        clock=reactor,  # type: ignore[arg-type]
        stop_timeout=2.0,
    )
    yield threads.deferToThread(agent.stop)
    try:
        registration.startService()
        yield sleep(0.3)
        assert not registration.registered
        started = time.monotonic()
        yield registration.stopService()
        assert time.monotonic() - started < 2.5
    finally:
        yield client.close()
        yield threads.deferToThread(agent.start)
