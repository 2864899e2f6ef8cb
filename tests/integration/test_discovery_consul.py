"""HealthyInstances, RoundRobin and ChatClient on the real reactor against a real Consul agent.

The agent is this module's own (not the session's ``consul_agent``): a test here stops and
starts it, which would make every registration of other modules vanish.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Generator, Iterator
from typing import Any

import consul
import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import capturedLogs, formatEvent
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from snet.config import ConsulConfig
from snet.consul import TreqConsul
from snet.retry import exponential_backoff
from snet.server.chat_client import ChatClient, chat_http_client
from snet.server.discovery import HealthyInstances
from snet.server.roundrobin import RoundRobin
from snet.testing.servers import ConsulAgent, free_port
from snet.testing.waiting import connections_to, eventually, sleep

pytestmark = pytest.mark.integration

Inline = Generator[Deferred[Any], Any, None]


@pytest.fixture(scope="module")
def agent() -> Iterator[ConsulAgent]:
    with ConsulAgent() as consul_agent:
        yield consul_agent


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


class Setup:
    """A Consul client, a service name of the test's own, and what to undo afterwards."""

    def __init__(self, agent: ConsulAgent) -> None:
        self.agent = agent
        self.client = TreqConsul(ConsulConfig.from_url(agent.url), timeout=2.0)
        self.name = unique("snet-chat")
        self.registered: list[str] = []
        self.watchers: list[HealthyInstances] = []

    @inlineCallbacks
    def register(self, service_id: str, port: int, *, passing: bool = True) -> Inline:
        """Register an instance with a TTL check, and make the check pass unless told not."""
        yield self.client.agent.service.register(
            self.name,
            service_id=service_id,
            address="127.0.0.1",
            port=port,
            check=consul.Check.ttl("60s"),
        )
        self.registered.append(service_id)
        if passing:
            yield self.client.agent.check.ttl_pass(f"service:{service_id}")

    def watch(self, **kwargs: Any) -> HealthyInstances:
        options: dict[str, Any] = {
            "refresh_interval": 60.0,  # so that only blocking queries explain quick updates
            "wait": 10.0,
            "retry_delay": exponential_backoff(initial=0.05, maximum=0.3),
        }
        options.update(kwargs)
        instances = HealthyInstances(
            consul=self.client,
            service_name=self.name,
            clock=reactor,  # type: ignore[arg-type]
            **options,
        )
        self.watchers.append(instances)
        instances.startService()
        return instances

    @inlineCallbacks
    def close(self) -> Inline:
        for instances in self.watchers:
            if instances.running:
                yield instances.stopService()
        if self.agent.running:
            for service_id in self.registered:
                # The agent may have forgotten it already (a restart).
                with contextlib.suppress(Exception):
                    yield self.client.agent.service.deregister(service_id)
        yield self.client.close()


@pytest_twisted.async_yield_fixture
async def setup(agent: ConsulAgent) -> Any:
    if not agent.running:
        await threads.deferToThread(agent.start)
    s = Setup(agent)
    yield s
    await s.close()
    assert connections_to(agent.http_port) == []


def ids_of(instances: HealthyInstances) -> list[str]:
    return [e.instance_id for e in instances.instances]


@pytest_twisted.inlineCallbacks
def test_passing_instances_appear_and_a_deregistered_one_leaves_within_a_second(
    setup: Setup,
) -> Inline:
    first, second = unique("chat-1"), unique("chat-2")
    yield setup.register(first, 18081)
    yield setup.register(second, 18082)
    instances = setup.watch()
    yield eventually(lambda: len(instances.instances) == 2, 5, "both instances")
    assert ids_of(instances) == sorted([first, second])
    assert {e.url for e in instances.instances} == {
        "http://127.0.0.1:18081",
        "http://127.0.0.1:18082",
    }
    assert instances.consul_reachable and instances.last_success is not None

    yield sleep(0.2)  # the loop is now blocked in a query
    changed: Deferred[None] = Deferred()
    instances.subscribe(
        lambda now: None if changed.called or len(now) != 1 else changed.callback(None)
    )
    yield setup.client.agent.service.deregister(second)
    # Within 5 s, while the periodic refresh runs every 60 s: the blocking query saw it.
    timeout = reactor.callLater(5, changed.cancel)  # type: ignore[attr-defined]
    yield changed
    timeout.cancel()
    assert ids_of(instances) == [first]


@pytest_twisted.inlineCallbacks
def test_a_new_instance_joins_only_once_its_check_passes(setup: Setup) -> Inline:
    """Its registration wakes the blocking query while its check is still critical."""
    first, late = unique("chat-1"), unique("chat-late")
    yield setup.register(first, 18091)
    instances = setup.watch()
    yield eventually(lambda: len(instances.instances) == 1, 5, "the first instance")
    yield setup.register(late, 18092, passing=False)
    yield sleep(0.3)
    assert ids_of(instances) == [first]
    yield setup.client.agent.check.ttl_pass(f"service:{late}")
    # Within 5 s, while the periodic refresh runs every 60 s: the blocking query saw it.
    yield eventually(lambda: len(instances.instances) == 2, 5, "the late instance")


@pytest_twisted.inlineCallbacks
def test_an_agent_outage_keeps_the_last_list_and_the_recovery_follows_consul(
    setup: Setup,
) -> Inline:
    first, second = unique("chat-1"), unique("chat-2")
    yield setup.register(first, 18101)
    yield setup.register(second, 18102)
    instances = setup.watch()
    yield eventually(lambda: len(instances.instances) == 2, 5, "both instances")
    kept = instances.instances
    with capturedLogs() as events:
        yield threads.deferToThread(setup.agent.stop)
        yield eventually(lambda: not instances.consul_reachable, 5, "the outage to be seen")
        yield sleep(1.0)  # several failed retries
        assert instances.instances is kept
        yield threads.deferToThread(setup.agent.start)
        yield eventually(lambda: instances.consul_reachable, 5, "the recovery")
        # The dev agent starts empty: until an instance registers again, the last list stays.
        yield sleep(0.5)
        assert instances.instances == kept
        yield setup.register(first, 18101)
        yield eventually(lambda: ids_of(instances) == [first], 2, "the re-registered instance")
    said = [
        str(formatEvent(e))
        for e in events
        if e.get("log_namespace") in {"snet.server.discovery", "snet.blocking_query"}
    ]
    outages = [m for m in said if m.startswith("cannot read")]
    assert len(outages) == 1, said
    assert f"{setup.name} from consul, keeping 2 instances: " in outages[0], outages
    assert len([m for m in said if "reachable again" in m]) == 1, said
    assert len([m for m in said if "keeping the last 2" in m]) == 1, said


class FakeChatInstance(Resource):
    """A chat instance's /v1/unread, answering with its name."""

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.user_ids: list[str] = []

    def render_GET(self, request: Request) -> bytes:
        self.user_ids.append(request.getHeader("x-snet-user-id") or "")
        request.setHeader("Content-Type", "application/json")
        return json.dumps({"total": 0, "dialogs": [], "served_by": self.name}).encode()


@pytest_twisted.inlineCallbacks
def test_calls_spread_evenly_over_live_instances_and_skip_one_that_refuses(
    setup: Setup,
) -> Inline:
    """Three passing instances in Consul; one's port is closed: its calls go on at once."""
    live = [FakeChatInstance(unique("chat-live")) for _ in range(2)]
    ports = [
        reactor.listenTCP(0, Site(r), interface="127.0.0.1")  # type: ignore[attr-defined]
        for r in live
    ]
    dead = unique("chat-dead")
    http = chat_http_client(reactor, connect_timeout=1.0, max_per_host=4)
    try:
        for resource, port in zip(live, ports, strict=True):
            yield setup.register(resource.name, port.getHost().port)
        yield setup.register(dead, free_port())
        instances = setup.watch()
        yield eventually(lambda: len(instances.instances) == 3, 5, "three instances")
        client = ChatClient(
            balancer=RoundRobin(instances),
            http=http,
            clock=reactor,  # type: ignore[arg-type]
            timeout=5.0,
        )
        started = time.monotonic()
        served = []
        for user in range(1, 13):
            reply = yield client.unread(request_id=f"req-{user}", user_id=user)
            assert reply.status == 200
            assert reply.body["served_by"] == reply.instance
            served.append(reply.instance)
        assert time.monotonic() - started < 5.0
        assert sorted(set(served)) == sorted(r.name for r in live)
        assert [served.count(r.name) for r in live] == [6, 6]
        assert sorted(int(u) for r in live for u in r.user_ids) == list(range(1, 13))
    finally:
        yield http.close()
        for port in ports:
            yield port.stopListening()
