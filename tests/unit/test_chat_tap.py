"""The chat plugin: its options (parsing, environment fallbacks, validation) and the service
tree its makeService wires, all on the reactor it is given (a memory reactor here)."""

from __future__ import annotations

import re

import pytest
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogLevel, capturedLogs, formatEvent
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from snet.chat.registration import ChatRegistration
from snet.chat.tap import REPAIR_INTERVAL, Options, default_instance_id, makeService
from snet.config import ConsulConfig, MySQLConfig, RedisConfig
from snet.lifecycle import LINGER, ServingInstance, listen_interface
from snet.testing import result_of
from snet.testing.connect import TestCA, identified_before_listening

MYSQL = "mysql://chat:secret@db.example:3307/snet"


def parse(args: list[str], environ: dict[str, str] | None = None) -> Options:
    options = Options(environ=environ or {})
    options.parseOptions(args)
    return options


def test_defaults_apply_when_neither_option_nor_environment_is_given() -> None:
    options = parse(["--mysql", MYSQL])
    assert options["listen"] == "tcp:9001"
    assert options["service-name"] == "snet-chat"
    assert options["drain-timeout"] == 10.0
    assert options["consul-config"] == ConsulConfig("http", "127.0.0.1", 8500)
    assert options["redis-config"] == RedisConfig("127.0.0.1", 6379, 0)
    assert options["mysql-config"] == MySQLConfig("db.example", 3307, "chat", "secret", "snet")
    assert options["advertise-address"] is None


def test_every_option_can_come_from_the_environment() -> None:
    options = parse(
        [],
        {
            "SNET_LISTEN": "tcp:9100",
            "SNET_ADVERTISE": "10.1.2.3:9100",
            "CONSUL_HTTP_ADDR": "consul:8501",
            "CONSUL_HTTP_TOKEN": "tok",
            "SNET_SERVICE_NAME": "dialogs",
            "SNET_INSTANCE_ID": "dialogs-a",
            "SNET_MYSQL": MYSQL,
            "SNET_REDIS": "redis://cache:6380/2",
            "SNET_DRAIN_TIMEOUT": "3.5",
        },
    )
    assert options["listen"] == "tcp:9100"
    assert options["advertise-address"] == ("10.1.2.3", 9100)
    assert options["consul-config"] == ConsulConfig("http", "consul", 8501, "tok")
    assert options["consul-config"].token == "tok"
    assert options["service-name"] == "dialogs"
    assert options["instance-id"] == "dialogs-a"
    assert options["redis-config"] == RedisConfig("cache", 6380, 2)
    assert options["drain-timeout"] == 3.5


def test_the_command_line_wins_over_the_environment() -> None:
    options = parse(["--mysql", MYSQL, "--listen", "tcp:1"], {"SNET_LISTEN": "tcp:2"})
    assert options["listen"] == "tcp:1"


@pytest.mark.parametrize(
    ("args", "environ", "message"),
    [
        ([], {}, "--mysql"),
        (["--mysql", "postgres://a@b/c"], {}, "mysql://"),
        (["--mysql", "mysql://a@b"], {}, "DATABASE"),
        (["--mysql", MYSQL, "--redis", "redis://h:notaport/0"], {}, "port"),
        (["--mysql", MYSQL, "--advertise", "nohostport"], {}, "HOST:PORT"),
        (["--mysql", MYSQL, "--drain-timeout", "-1"], {}, "drain-timeout"),
        (["--mysql", MYSQL, "--service-name", "bad name"], {}, "service name"),
        (["--mysql", MYSQL], {"SNET_DRAIN_TIMEOUT": "soon"}, "SNET_DRAIN_TIMEOUT"),
        (["--mysql", MYSQL, "--consul", "ftp://x"], {}, "--consul"),
    ],
)
def test_invalid_settings_are_usage_errors_that_name_the_problem(
    args: list[str], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(usage.UsageError, match=message):
        parse(args, environ)


def test_the_mysql_password_never_shows_in_the_config_repr() -> None:
    assert "secret" not in repr(parse(["--mysql", MYSQL])["mysql-config"])


def test_instance_ids_are_unique_and_name_no_address() -> None:
    """The monolith shows the id to its clients (X-Snet-Chat-Instance)."""
    first = default_instance_id("snet-chat")
    second = default_instance_id("snet-chat")
    assert first != second
    assert re.fullmatch(r"snet-chat-[0-9a-f]{12}", first)


def test_listen_interface_is_taken_from_the_endpoint_string() -> None:
    assert listen_interface("tcp:9001:interface=127.0.0.1") == "127.0.0.1"
    assert listen_interface("tcp:9001:interface=0.0.0.0") is None
    assert listen_interface("tcp:9001") is None


def make_service(args: list[str], reactor: MemoryReactorClock) -> ServingInstance:
    options = parse(
        ["--listen", "tcp:0:interface=127.0.0.1", "--consul", "127.0.0.1:8501", *args],
        {"SNET_MYSQL": MYSQL, "SNET_REDIS": "redis://127.0.0.1:6380/1"},
    )
    service = makeService(options, reactor=reactor)
    assert isinstance(service, ServingInstance)
    return service


def test_a_chat_instance_registers_once_serving_and_closes_consul_redis_then_mysql() -> None:
    reactor = MemoryReactorClock()
    service = make_service(["--deregister-grace", "0.25", "--advertise", "10.0.0.5:9100"], reactor)
    assert service.clock is reactor
    repairs, admin = service.workers
    assert isinstance(repairs, TimerService)
    assert isinstance(admin, StreamServerEndpointService)
    assert (repairs.step, repairs.clock) == (REPAIR_INTERVAL, reactor)
    assert [r.name for r in service.resources] == ["consul", "redis", "mysql"]
    assert (service.advertise, service.announce_grace) == (("10.0.0.5", 9100), 0.25)
    assert service.announce is not None
    registration = service.announce("10.0.0.5", 9100)
    assert isinstance(registration, ChatRegistration)
    assert re.fullmatch(r"snet-chat-[0-9a-f]{12}", registration.instance.instance_id)
    assert (registration.instance.address, registration.instance.port) == ("10.0.0.5", 9100)


def test_a_chat_instance_listens_and_connects_only_through_the_reactor_it_is_given() -> None:
    reactor = MemoryReactorClock()
    service = make_service(["--insecure-plaintext"], reactor)
    service.startService()
    [(port, site, _, interface)] = reactor.tcpServers
    assert (port, site, interface) == (0, service.site, "127.0.0.1")
    assert not any(p == 6380 for _, p, *_ in reactor.tcpClients), "Redis: at the first call"
    assert service.announce is not None
    registration = service.announce("127.0.0.1", 9001)
    registration.startService()  # normally once the schema is applied
    reactor.advance(0)
    assert sum(1 for _, p, *_ in reactor.tcpClients if p == 8501) == 1  # registering
    stopped_registration = registration.stopService()
    reactor.advance(60)
    result_of(stopped_registration)

    stopped = service.stopService()
    reactor.advance(LINGER)  # kept-alive connections stay open that long after the port closes
    assert result_of(stopped) is None
    assert not any(r.running for r in service.resources)
    assert reactor.getDelayedCalls() == []


def test_by_default_it_listens_over_connect_tls_only_once_it_has_its_identity() -> None:
    reactor = MemoryReactorClock()
    service = make_service(["--service-name", "dialogs"], reactor)
    watcher = identified_before_listening(service, reactor, TestCA(), 8501)
    assert watcher.service == "dialogs"
    [(_, factory, _, _)] = reactor.tcpServers
    assert isinstance(factory, TLSMemoryBIOFactory)
    assert factory.wrappedFactory is service.site
    assert service.announce is not None
    registration = service.announce("127.0.0.1", 9001)
    assert isinstance(registration, ChatRegistration)
    assert registration.instance.connect_native
    stopped = service.stopService()
    reactor.advance(LINGER)
    result_of(stopped)
    assert not watcher.running


@pytest.mark.parametrize(
    ("args", "environ", "plaintext"),
    [
        ([], {}, False),
        (["--insecure-plaintext"], {}, True),
        ([], {"SNET_INSECURE_PLAINTEXT": "1"}, True),
        ([], {"SNET_INSECURE_PLAINTEXT": "0"}, False),
    ],
)
def test_plaintext_is_only_by_the_explicit_option_or_its_variable(
    args: list[str], environ: dict[str, str], plaintext: bool
) -> None:
    assert parse(["--mysql", MYSQL, *args], environ)["insecure-plaintext"] is plaintext


def test_plaintext_logs_a_warning_at_start() -> None:
    with capturedLogs() as events:
        service = make_service(["--insecure-plaintext"], MemoryReactorClock())
    assert service.prerequisites == []
    warnings = [formatEvent(e) for e in events if e["log_level"] == LogLevel.warn]
    assert any("--insecure-plaintext" in w for w in warnings)
