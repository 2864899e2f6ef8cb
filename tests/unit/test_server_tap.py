"""``twistd snet-server``'s makeService: the service tree it wires, all on the reactor it is
given (a memory reactor here: nothing listens or connects for real)."""

from __future__ import annotations

import pytest
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.python.usage import UsageError

from snet.connect import ConnectPolicyForHTTPS
from snet.consul import TreqConsul
from snet.lifecycle import LINGER, ServingInstance
from snet.server.discovery import HealthyInstances, StaticInstances
from snet.server.feed import FeedFanout
from snet.server.fleetview import FleetHistory
from snet.server.tap import Options, makeService, monolith_connect
from snet.testing import result_of
from snet.testing.connect import TestCA, give_identity, identified_before_listening
from snet.web.reuseport import ReusePortEndpoint

ENVIRON = {
    "SNET_MYSQL": "mysql://server:secret@127.0.0.1:3307/snet",
    "SNET_REDIS": "redis://127.0.0.1:6380/1",
    "CONSUL_HTTP_ADDR": "127.0.0.1:8501",
}


def make_service(args: list[str], reactor: MemoryReactorClock) -> ServingInstance:
    options = Options(environ=ENVIRON)
    options.parseOptions(["--listen", "tcp:0:interface=127.0.0.1", *args])
    service = makeService(options, reactor=reactor)
    assert isinstance(service, ServingInstance)
    return service


def connections_to(reactor: MemoryReactorClock, port: int) -> int:
    return sum(1 for _, p, *_ in reactor.tcpClients if p == port)


def test_the_monolith_discovers_chat_in_consul_and_closes_consul_http_redis_then_mysql() -> None:
    reactor = MemoryReactorClock()
    service = make_service([], reactor)
    assert service.clock is reactor
    discovery, fanout, history, admin = service.workers
    assert isinstance(history, FleetHistory) and history.clock is reactor
    assert isinstance(admin, StreamServerEndpointService)
    assert isinstance(discovery, HealthyInstances)
    assert isinstance(fanout, FeedFanout)
    assert fanout.clock is reactor
    assert [r.name for r in service.resources] == ["consul", "chat-http", "redis", "mysql"]
    assert service.announce is None


def test_with_a_chat_url_the_monolith_sends_every_dialog_call_there_and_needs_no_consul() -> None:
    service = make_service(["--chat-url", "http://chat.example:9001"], MemoryReactorClock())
    assert isinstance(service.workers[0], StaticInstances)
    assert [r.name for r in service.resources] == ["chat-http", "redis", "mysql"]


def test_the_monolith_listens_and_connects_only_through_the_reactor_it_is_given() -> None:
    reactor = MemoryReactorClock()
    service = make_service(["--insecure-plaintext"], reactor)
    service.startService()
    [(port, site, _, interface)] = reactor.tcpServers
    assert (port, site, interface) == (0, service.site, "127.0.0.1")
    assert connections_to(reactor, 6380) == 4  # the Redis pool
    discovery = service.workers[0]
    discovery.startService()  # normally once the schema is applied
    reactor.advance(0)
    assert connections_to(reactor, 8501) == 1  # the blocking query on Consul's health API
    result_of(discovery.stopService())

    stopped = service.stopService()
    reactor.advance(LINGER)  # kept-alive connections stay open that long after the port closes
    assert result_of(stopped) is None
    assert not any(r.running for r in service.resources)
    assert reactor.getDelayedCalls() == []


def test_by_default_it_calls_chat_over_connect_tls_with_an_identity_it_has_before_listening() -> (
    None
):
    reactor = MemoryReactorClock()
    service = make_service(["--chat-service", "dialogs"], reactor)
    watcher = identified_before_listening(service, reactor, TestCA(), 8501)
    assert watcher.service == "snet-server"
    assert len(reactor.tcpServers) == 1
    stopped = service.stopService()
    reactor.advance(LINGER)
    result_of(stopped)
    assert not watcher.running


def test_the_chat_client_accepts_only_the_chat_service_s_identity() -> None:
    options = Options(environ=ENVIRON)
    options.parseOptions(["--chat-service", "dialogs"])
    reactor = MemoryReactorClock()
    consul = TreqConsul(options["consul-config"], reactor=reactor)
    connect = monolith_connect(options, consul, reactor)
    assert isinstance(connect.policy, ConnectPolicyForHTTPS)
    assert connect.watcher is not None
    ca = TestCA()
    give_identity(connect.watcher, ca)
    assert connect.policy.expected_id() == ca.spiffe_id("dialogs").uri


def test_plaintext_or_a_chat_url_needs_no_identity_and_says_so() -> None:
    for args in (["--insecure-plaintext"], ["--chat-url", "http://chat.example:9001"]):
        with capturedLogs() as events:
            service = make_service(args, MemoryReactorClock())
        assert service.prerequisites == []
        warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
        assert any("--insecure-plaintext" in w for w in warnings), args


def test_plaintext_can_come_from_the_environment() -> None:
    options = Options(environ={**ENVIRON, "SNET_INSECURE_PLAINTEXT": "true"})
    options.parseOptions([])
    assert options["insecure-plaintext"] is True


def test_the_admin_listener_is_on_127_0_0_1_unless_the_operator_says_otherwise() -> None:
    default, given = Options(environ=ENVIRON), Options(environ=ENVIRON)
    default.parseOptions([])
    given.parseOptions(["--admin-listen", "tcp:9090"])
    assert default["admin-listen"] == "tcp:8081:interface=127.0.0.1"
    assert given["admin-listen"] == "tcp:9090"


def test_with_reuse_port_the_monolith_listens_on_a_shared_tcp_port() -> None:
    service = make_service(["--reuse-port"], MemoryReactorClock())
    assert isinstance(service.endpoint, ReusePortEndpoint)
    assert (service.endpoint.interface, service.endpoint.port) == ("127.0.0.1", 0)


def test_reuse_port_comes_from_the_environment_too_and_needs_a_tcp_endpoint() -> None:
    options = Options(environ={**ENVIRON, "SNET_REUSE_PORT": "1"})
    options.parseOptions(["--listen", "tcp:8080"])
    assert options["reuse-port"] is True
    with pytest.raises(UsageError, match="--reuse-port"):
        Options(environ=ENVIRON).parseOptions(["--reuse-port", "--listen", "unix:/tmp/s"])


def test_sends_are_batched_unless_the_flag_or_the_environment_says_not() -> None:
    default, flag = Options(environ=ENVIRON), Options(environ=ENVIRON)
    env = Options(environ={**ENVIRON, "SNET_NO_BATCH_SENDS": "1"})
    default.parseOptions([])
    flag.parseOptions(["--no-batch-sends"])
    env.parseOptions([])
    assert (default["no-batch-sends"], flag["no-batch-sends"], env["no-batch-sends"]) == (
        False,
        True,
        True,
    )


def test_without_reuse_port_the_listener_is_twisteds_own_endpoint() -> None:
    service = make_service([], MemoryReactorClock())
    assert not isinstance(service.endpoint, ReusePortEndpoint)
