"""``twistd snet-chat``: options and the wiring of one chat (dialogs) instance."""

from __future__ import annotations

import uuid
from functools import partial
from typing import Any

from attrs import frozen
from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime, IStreamServerEndpoint
from twisted.python import usage

from snet import __version__
from snet.chat.app import ChatAPI
from snet.chat.registration import ChatRegistration, ServiceInstance
from snet.chat.schema import apply_chat_schema
from snet.chat.store import Dialogs, MessageStore, chat_pool
from snet.chat.unread import UnreadIndex, UnreadRepairs
from snet.config import ConfigError, parse_host_port
from snet.connect import CertificateWatcher, ConnectAuthorizer
from snet.connect.wiring import (
    PLAINTEXT_FLAG,
    certificate_watcher,
    connect_endpoint,
    insecure_plaintext,
    warn_insecure_plaintext,
)
from snet.consul import TreqConsul
from snet.lifecycle import ClosedOnStop, ServingInstance, admin_listener
from snet.options import ServiceOptions, non_negative_float, positive_float
from snet.rediswire import redis_wire
from snet.storage import REDIS_TIMEOUT
from snet.web.draining import InFlight
from snet.web.limits import LimitedSite
from snet.web.metrics import HTTPMetrics


class Options(ServiceOptions):
    """Options of one chat instance; each one can also come from the environment."""

    synopsis = "[options]"
    longdesc = (
        "Run one instance of the snet dialogs service. It serves its HTTP API on --listen "
        "(default tcp:9001), stores messages in MySQL, keeps unread counters in Redis and "
        "registers with the Consul agent once it can serve. It serves over Connect TLS: only "
        "callers with a Connect certificate that Consul's intentions allow reach /v1 "
        "(--insecure-plaintext turns that off)."
    )
    optFlags = [PLAINTEXT_FLAG]
    optParameters = [
        [
            "advertise",
            None,
            None,
            "HOST:PORT that Consul and peers use to reach this instance "
            "(default: the listen interface or this host's address, and the listening port).",
            str,
        ],
        ["service-name", None, None, "Name to register under (default snet-chat).", str],
        ["instance-id", None, None, "Consul service ID (default: unique per instance).", str],
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
        "advertise": "SNET_ADVERTISE",
        "service-name": "SNET_SERVICE_NAME",
        "instance-id": "SNET_INSTANCE_ID",
        "deregister-grace": "SNET_DEREGISTER_GRACE",
        "check-interval": "SNET_CHECK_INTERVAL",
        "deregister-after": "SNET_DEREGISTER_AFTER",
    }
    fallbacks = {
        "listen": "tcp:9001",
        "admin-listen": "tcp:9101:interface=127.0.0.1",
        "service-name": "snet-chat",
        "deregister-grace": 0.5,
        "check-interval": 1.0,
        "deregister-after": 60.0,
    }

    def postOptions(self) -> None:
        super().postOptions()
        try:
            self["advertise-address"] = (
                parse_host_port(self["advertise"], "--advertise") if self["advertise"] else None
            )
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        self["insecure-plaintext"] = insecure_plaintext(self["insecure-plaintext"], self.environ)
        name = self["service-name"]
        if not name or not all(c.isalnum() or c in "-_" for c in name):
            raise usage.UsageError(f"--service-name: {name!r} is not a valid Consul service name")


REPAIR_INTERVAL = 1.0
"""Seconds between two looks for unread counters to repair (``snet.chat.unread``)."""


def default_instance_id(service_name: str) -> str:
    """An ID unique per instance, and opaque: the monolith passes it to its clients
    (``X-Snet-Chat-Instance``), so it names no address. Consul's catalogue says where the
    instance runs, and the instance logs it when it registers."""
    return f"{service_name}-{uuid.uuid4().hex[:12]}"


@frozen
class ChatConnect:
    """A chat instance's Connect parts (all None with ``--insecure-plaintext``)."""

    watcher: CertificateWatcher | None = None
    authorizer: ConnectAuthorizer | None = None

    def endpoint(self, endpoint: IStreamServerEndpoint) -> IStreamServerEndpoint:
        """*endpoint*, over Connect TLS unless plaintext."""
        return endpoint if self.watcher is None else connect_endpoint(endpoint, self.watcher)


def chat_connect(options: Any, consul: TreqConsul, clock: IReactorTime) -> ChatConnect:
    """The instance's identity (a watcher of its service's leaf, to be ready before it
    listens) and the authorizer of its callers; nothing with ``--insecure-plaintext``."""
    if options["insecure-plaintext"]:
        warn_insecure_plaintext("serving the chat API")
        return ChatConnect()
    service = options["service-name"]
    watcher = certificate_watcher(consul, service, clock)
    return ChatConnect(
        watcher, ConnectAuthorizer(consul=consul, target=service, source=watcher, clock=clock)
    )


def makeService(options: Any, reactor: Any = None) -> IService:
    """Wire one chat instance: storage, HTTP API, listener and Consul registration, all on
    *reactor* (None: the global reactor)."""
    if reactor is None:
        from twisted.internet import reactor
    pool = chat_pool(options["mysql-config"], reactor=reactor)
    redis = redis_wire(options["redis-config"], reactor, timeout=REDIS_TIMEOUT)
    in_flight = InFlight()
    consul = TreqConsul(options["consul-config"], reactor=reactor)
    connect = chat_connect(options, consul, reactor)
    unread = UnreadIndex(redis)
    repairs = UnreadRepairs(pool, unread)
    messages = MessageStore(pool)
    metrics = HTTPMetrics()
    messages.track(metrics.registry)
    api = ChatAPI(
        dialogs=Dialogs(messages, unread, repairs, reactor),
        in_flight=in_flight,
        metrics=metrics,
        version=__version__,
        clock=reactor,
        authorizer=connect.authorizer,
    )

    def registration(host: str, port: int) -> ChatRegistration:
        service_name = options["service-name"]
        return ChatRegistration(
            consul=consul,
            instance=ServiceInstance(
                service_name=service_name,
                instance_id=options["instance-id"] or default_instance_id(service_name),
                address=host,
                port=port,
                version=__version__,
                check_interval=options["check-interval"],
                deregister_critical_after=options["deregister-after"],
                connect_native=connect.watcher is not None,
            ),
            clock=reactor,
        )

    return ServingInstance(
        endpoint=connect.endpoint(serverFromString(reactor, options["listen"])),
        site=LimitedSite(api.resource(), options["http-limits"], reactor=reactor),
        listen_description=options["listen"],
        apply_schema=partial(apply_chat_schema, pool),
        in_flight=in_flight,
        clock=reactor,
        drain_timeout=options["drain-timeout"],
        reactor=reactor,
        advertise=options["advertise-address"],
        announce=registration,
        announce_grace=options["deregister-grace"],
        workers=[repairs.service(REPAIR_INTERVAL, reactor), admin_listener(options, api, reactor)],
        prerequisites=[connect.watcher] if connect.watcher is not None else [],
        resources=[
            ClosedOnStop("consul", consul.close),
            ClosedOnStop("redis", redis.disconnect),
            ClosedOnStop("mysql", pool.close),
        ],
    )
