"""``twistd snet-chat``: options and the wiring of one chat (dialogs) instance."""

from __future__ import annotations

import uuid
from typing import Any

from twisted.application.service import IService
from twisted.internet import reactor as global_reactor
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from snet import __version__
from snet.chat.app import ChatAPI
from snet.chat.registration import ChatRegistration, ServiceInstance
from snet.chat.store import MessageStore, UnreadCounters
from snet.config import ConfigError, ConsulConfig, MySQLConfig, RedisConfig, parse_host_port
from snet.consul import TreqConsul
from snet.lifecycle import ServingInstance
from snet.options import EnvironmentOptions, non_negative_float, positive_float
from snet.storage import mysql_pool, redis_pool
from snet.web import HTTPMetrics, InFlight, QuietSite


class Options(EnvironmentOptions):
    """Options of one chat instance; each one can also come from the environment."""

    synopsis = "[options]"
    longdesc = (
        "Run one instance of the snet dialogs service. It serves its HTTP API on --listen, "
        "stores messages in MySQL, keeps unread counters in Redis and registers with the "
        "Consul agent once it can serve."
    )
    optParameters = [
        ["listen", None, None, "Endpoint string to listen on (default tcp:9001).", str],
        [
            "advertise",
            None,
            None,
            "HOST:PORT that Consul and peers use to reach this instance "
            "(default: the listen interface or this host's address, and the listening port).",
            str,
        ],
        [
            "consul",
            None,
            None,
            "Consul agent HTTP address (default CONSUL_HTTP_ADDR, else http://127.0.0.1:8500).",
            str,
        ],
        ["service-name", None, None, "Name to register under (default snet-chat).", str],
        ["instance-id", None, None, "Consul service ID (default: unique per instance).", str],
        ["mysql", None, None, "mysql://USER:PASSWORD@HOST:PORT/DATABASE (required).", str],
        ["redis", None, None, "redis://HOST:PORT/DB (default redis://127.0.0.1:6379/0).", str],
        [
            "drain-timeout",
            None,
            None,
            "Seconds to let in-flight requests finish on stop (default 10).",
            positive_float,
        ],
        [
            "deregister-grace",
            None,
            None,
            "Seconds between deregistering and closing the port, for watchers to notice "
            "(default 0.5).",
            non_negative_float,
        ],
        [
            "check-interval",
            None,
            None,
            "Consul HTTP check interval in seconds (default 1).",
            positive_float,
        ],
        [
            "deregister-after",
            None,
            None,
            "Seconds a critical instance stays registered before Consul reaps it (default 60).",
            positive_float,
        ],
    ]
    environment = {
        "listen": "SNET_LISTEN",
        "advertise": "SNET_ADVERTISE",
        "consul": "CONSUL_HTTP_ADDR",
        "service-name": "SNET_SERVICE_NAME",
        "instance-id": "SNET_INSTANCE_ID",
        "mysql": "SNET_MYSQL",
        "redis": "SNET_REDIS",
        "drain-timeout": "SNET_DRAIN_TIMEOUT",
        "deregister-grace": "SNET_DEREGISTER_GRACE",
        "check-interval": "SNET_CHECK_INTERVAL",
        "deregister-after": "SNET_DEREGISTER_AFTER",
    }
    fallbacks = {
        "listen": "tcp:9001",
        "consul": "http://127.0.0.1:8500",
        "service-name": "snet-chat",
        "redis": "redis://127.0.0.1:6379/0",
        "drain-timeout": 10.0,
        "deregister-grace": 0.5,
        "check-interval": 1.0,
        "deregister-after": 60.0,
    }

    def postOptions(self) -> None:
        super().postOptions()
        try:
            self["mysql-config"] = MySQLConfig.from_url(self["mysql"] or "")
            self["redis-config"] = RedisConfig.from_url(self["redis"])
            self["consul-config"] = ConsulConfig.from_url(
                self["consul"], self.environ.get("CONSUL_HTTP_TOKEN")
            )
            self["advertise-address"] = (
                parse_host_port(self["advertise"], "--advertise") if self["advertise"] else None
            )
        except ConfigError as e:
            if not self["mysql"]:
                raise usage.UsageError(
                    "--mysql (or SNET_MYSQL) is required: mysql://USER:PASSWORD@HOST:PORT/DATABASE"
                ) from None
            raise usage.UsageError(str(e)) from None
        name = self["service-name"]
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise usage.UsageError(f"--service-name: {name!r} is not a valid Consul service name")


def default_instance_id(service_name: str, host: str, port: int) -> str:
    """An ID unique per instance that still tells an operator where the instance runs."""
    return f"{service_name}-{host}-{port}-{uuid.uuid4().hex[:8]}"


def makeService(options: Any) -> IService:
    """Wire one chat instance: storage, HTTP API, listener and Consul registration."""
    reactor: Any = global_reactor
    pool = mysql_pool(options["mysql-config"], reactor=reactor)
    redis = redis_pool(options["redis-config"])
    in_flight = InFlight()
    api = ChatAPI(
        messages=MessageStore(pool),
        unread=UnreadCounters(redis),
        in_flight=in_flight,
        metrics=HTTPMetrics(),
        version=__version__,
    )
    consul = TreqConsul(options["consul-config"], reactor=reactor)

    def registration(host: str, port: int) -> ChatRegistration:
        service_name = options["service-name"]
        return ChatRegistration(
            consul=consul,
            instance=ServiceInstance(
                service_name=service_name,
                instance_id=options["instance-id"] or default_instance_id(service_name, host, port),
                address=host,
                port=port,
                version=__version__,
                check_interval=options["check-interval"],
                deregister_critical_after=options["deregister-after"],
            ),
            clock=reactor,
        )

    return ServingInstance(
        endpoint=serverFromString(reactor, options["listen"]),
        site=QuietSite(api.resource()),  # type: ignore[no-untyped-call]
        listen_description=options["listen"],
        apply_schema=api.messages.apply_schema,
        in_flight=in_flight,
        clock=reactor,
        drain_timeout=options["drain-timeout"],
        advertise=options["advertise-address"],
        announce=registration,
        announce_grace=options["deregister-grace"],
        closers=[consul.close, lambda: redis.disconnect(), pool.close],
    )
