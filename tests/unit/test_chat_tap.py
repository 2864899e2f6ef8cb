"""The chat plugin's options, and the order in which one chat instance starts and stops."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python import usage

from snet.chat.instance import ChatInstance, listen_interface
from snet.chat.tap import Options, default_instance_id
from snet.config import ConsulConfig, MySQLConfig, RedisConfig
from snet.testing import result_of
from snet.web import InFlight

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


def test_instance_ids_are_unique_and_say_where_the_instance_runs() -> None:
    first = default_instance_id("snet-chat", "10.0.0.5", 9001)
    second = default_instance_id("snet-chat", "10.0.0.5", 9001)
    assert first != second
    assert first.startswith("snet-chat-10.0.0.5-9001-")


def test_listen_interface_is_taken_from_the_endpoint_string() -> None:
    assert listen_interface("tcp:9001:interface=127.0.0.1") == "127.0.0.1"
    assert listen_interface("tcp:9001:interface=0.0.0.0") is None
    assert listen_interface("tcp:9001") is None


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


def make_instance(recorder: Recorder, clock: Clock, in_flight: InFlight) -> ChatInstance:
    return ChatInstance(
        endpoint=recorder,  # type: ignore[arg-type]
        site=None,  # type: ignore[arg-type]
        listen_description="tcp:0:interface=127.0.0.1",
        advertise=None,
        messages=recorder,  # type: ignore[arg-type]
        in_flight=in_flight,
        registration=recorder.make_registration,  # type: ignore[arg-type]
        clock=clock,
        drain_timeout=5.0,
        deregister_grace=0.5,
        closers=[recorder.close],
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
    assert recorder.events[-1] == "register"
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
    assert recorder.events == ["deregister", "stop listening", "close"]
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
    assert clock.getDelayedCalls() == []
