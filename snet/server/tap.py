"""``twistd snet-server``: options and the wiring of the monolith."""

from __future__ import annotations

from functools import partial
from typing import Any

from attrs import evolve, frozen
from twisted.application.service import IService
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IReactorTime
from twisted.python import usage

from snet import __version__
from snet.connect import CertificateWatcher, ConnectPolicyForHTTPS
from snet.connect.wiring import (
    MONOLITH_SERVICE,
    PLAINTEXT_FLAG,
    certificate_watcher,
    insecure_plaintext,
    warn_insecure_plaintext,
)
from snet.consul import TreqConsul
from snet.lifecycle import ClosedOnStop, ServingInstance, admin_listener
from snet.options import ServiceOptions, flag_or_environment, positive_float, positive_int
from snet.server.accounts import Accounts
from snet.server.app import ServerAPI
from snet.server.chat_client import ChatClient, chat_http_client
from snet.server.discovery import HealthyInstances, StaticInstances, endpoint_from_url
from snet.server.ejection import PassiveHealth
from snet.server.feed import FeedCache, FeedFanout, FeedMetrics
from snet.server.fleetview import FleetHistory, FleetView
from snet.server.ratelimit import (
    LoginLimits,
    LoginThrottle,
    RegistrationLimits,
    RegistrationThrottle,
    SlidingWindow,
    parse_networks,
)
from snet.server.roundrobin import RoundRobin, random_start
from snet.server.schema import apply_server_schema
from snet.server.social import Social
from snet.storage import mysql_pool, redis_pool
from snet.web.draining import InFlight
from snet.web.limits import LimitedSite
from snet.web.metrics import HTTPMetrics
from snet.web.reuseport import reuse_port_endpoint


class Options(ServiceOptions):
    """Options of the monolith; each one can also come from the environment."""

    synopsis = "[options]"
    longdesc = (
        "Run the snet monolith: the public JSON API on --listen (default tcp:8080). Dialog "
        "calls go round-robin to every chat instance Consul reports as passing for "
        "--chat-service, or all to one --chat-url. Instances that keep failing calls are "
        "ejected for a while; failed calls are retried on another instance within "
        "--chat-attempts, a retry budget and --chat-deadline. Chat instances are called over "
        "Connect TLS with the snet-server identity (--insecure-plaintext, or --chat-url, "
        "calls them in plain HTTP)."
    )
    optFlags = [
        PLAINTEXT_FLAG,
        [
            "reuse-port",
            None,
            "Listen with SO_REUSEPORT, so that several monolith processes "
            "on this host share --listen (a tcp: endpoint), each with its own --admin-listen "
            "(env SNET_REUSE_PORT=1).",
        ],
        [
            "no-batch-sends",
            None,
            "Send every dialog send to its chat instance in a call of its own, never in a "
            "batch call with the sends that came while the call before was out (to compare; "
            "env SNET_NO_BATCH_SENDS=1).",
        ],
    ]
    optParameters = [
        ["chat-service", None, None, "Consul service name of the chat instances "
         "(default snet-chat).", str],
        ["chat-url", None, None, "Send every dialog call to this one URL (e.g. a proxy) "
         "instead of discovering instances in Consul.", str],
        ["refresh-interval", None, None, "Seconds between periodic reads of Consul's list, "
         "beside the blocking queries (default 5).", positive_float],
        ["chat-timeout", None, None, "Seconds one attempt on a chat instance may take, from "
         "connecting to the last byte of the answer (default 2: chat calls take milliseconds, "
         "and a stopped instance must be found out quickly enough to retry elsewhere).",
         positive_float],
        ["chat-deadline", None, None, "Seconds a dialog call may take end to end, retries "
         "included: no attempt starts after it (default 10).", positive_float],
        ["chat-attempts", None, None, "Attempts per dialog call that reach a chat instance, "
         "the first included; sends are retried with the same Idempotency-Key (default 3).",
         positive_int],
        ["eject-after", None, None, "Failed attempts in a row (timeout, lost connection, "
         "5xx) that take a chat instance out of rotation for a growing back-off; a refused "
         "connection does at once (default 3).", positive_int],
        ["chat-connect-timeout", None, None, "Seconds to connect to a chat instance before "
         "trying the next one (default 1).", positive_float],
        ["trusted-proxies", None, None, "Comma-separated addresses or CIDR networks of the "
         "proxies in front of the monolith: only from them is X-Forwarded-For believed "
         "(default none: the client address is the socket's peer).", str],
        ["registrations-per-hour", None, None, "Registrations one client address may make "
         "per hour, for all monolith processes together (default 30).", positive_int],
        ["failed-logins-per-address", None, None, "Failed logins one client address may make "
         "per 15 minutes, over all accounts (default 30; 10 per account and address, and "
         "200 per account from addresses it never logged in from).", positive_int],
    ]  # fmt: skip
    environment = {
        "chat-service": "SNET_CHAT_SERVICE",
        "chat-url": "SNET_CHAT_URL",
        "refresh-interval": "SNET_REFRESH_INTERVAL",
        "chat-timeout": "SNET_CHAT_TIMEOUT",
        "chat-connect-timeout": "SNET_CHAT_CONNECT_TIMEOUT",
        "chat-deadline": "SNET_CHAT_DEADLINE",
        "chat-attempts": "SNET_CHAT_ATTEMPTS",
        "eject-after": "SNET_EJECT_AFTER",
        "trusted-proxies": "SNET_TRUSTED_PROXIES",
        "registrations-per-hour": "SNET_REGISTRATIONS_PER_HOUR",
        "failed-logins-per-address": "SNET_FAILED_LOGINS_PER_ADDRESS",
    }
    fallbacks = {
        "listen": "tcp:8080",
        "admin-listen": "tcp:8081:interface=127.0.0.1",
        "chat-service": "snet-chat",
        "refresh-interval": 5.0,
        "chat-timeout": 2.0,
        "chat-connect-timeout": 1.0,
        "chat-deadline": 10.0,
        "chat-attempts": 3,
        "eject-after": 3,
        "trusted-proxies": "",
        "registrations-per-hour": 30,
        "failed-logins-per-address": 30,
    }

    def postOptions(self) -> None:
        super().postOptions()
        self["insecure-plaintext"] = insecure_plaintext(self["insecure-plaintext"], self.environ)
        for flag, variable in (
            ("reuse-port", "SNET_REUSE_PORT"),
            ("no-batch-sends", "SNET_NO_BATCH_SENDS"),
        ):
            self[flag] = flag_or_environment(self[flag], self.environ, variable)
        if self["reuse-port"]:
            try:
                reuse_port_endpoint(None, self["listen"])
            except ValueError as e:
                raise usage.UsageError(f"--reuse-port: {e}") from None
        if self["chat-url"]:
            try:
                endpoint_from_url(self["chat-url"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None
        try:
            self["trusted-networks"] = parse_networks(self["trusted-proxies"])
        except ValueError as e:
            raise usage.UsageError(f"--trusted-proxies: {e}") from None


@frozen
class MonolithConnect:
    """The monolith's Connect parts: its identity (to be ready before it listens) and the TLS
    policy its chat client calls instances with; None for plain HTTP."""

    watcher: CertificateWatcher | None = None
    policy: ConnectPolicyForHTTPS | None = None


def monolith_connect(
    options: Any, consul: TreqConsul | None, clock: IReactorTime
) -> MonolithConnect:
    """Connect for calls to the discovered chat instances; plain HTTP with
    ``--insecure-plaintext`` or to one ``--chat-url`` (a proxy, or a plaintext instance)."""
    if consul is None:
        warn_insecure_plaintext(f"calling chat at --chat-url {options['chat-url']}")
        return MonolithConnect()
    if options["insecure-plaintext"]:
        warn_insecure_plaintext("calling chat instances")
        return MonolithConnect()
    watcher = certificate_watcher(consul, MONOLITH_SERVICE, clock)
    return MonolithConnect(watcher, ConnectPolicyForHTTPS(watcher, options["chat-service"]))


def makeService(options: Any, reactor: Any = None) -> IService:
    """Wire the monolith: storage, feed, chat discovery and balancing, HTTP API, listener,
    all on *reactor* (None: the global reactor)."""
    if reactor is None:
        from twisted.internet import reactor
    pool = mysql_pool(options["mysql-config"], reactor=reactor)
    redis = redis_pool(options["redis-config"], reactor=reactor)
    metrics = HTTPMetrics()
    in_flight = InFlight()
    resources: list[IService] = []

    consul: TreqConsul | None = None
    if options["chat-url"]:
        instances: Any = StaticInstances(options["chat-url"])
    else:
        consul = TreqConsul(options["consul-config"], reactor=reactor)
        instances = HealthyInstances(
            consul=consul,
            service_name=options["chat-service"],
            clock=reactor,
            refresh_interval=options["refresh-interval"],
            registry=metrics.registry,
        )
        resources.append(ClosedOnStop("consul", consul.close))
    connect = monolith_connect(options, consul, reactor)
    http = chat_http_client(
        reactor, connect_timeout=options["chat-connect-timeout"], tls=connect.policy
    )
    health = PassiveHealth(
        clock=reactor,
        consecutive_failures=options["eject-after"],
        registry=metrics.registry,
    )
    balancer = RoundRobin(instances, health=health, start=random_start)
    chat = ChatClient(
        balancer=balancer,
        http=http,
        clock=reactor,
        timeout=options["chat-timeout"],
        deadline=options["chat-deadline"],
        max_attempts=options["chat-attempts"],
        connect_timeout=options["chat-connect-timeout"],
        registry=metrics.registry,
        tls=connect.policy is not None,
        batch_sends=not options["no-batch-sends"],
    )
    accounts = Accounts(pool=pool, clock=reactor)
    social = Social(pool=pool, clock=reactor)
    feed = FeedCache(social=social, redis=redis, metrics=FeedMetrics(registry=metrics.registry))
    counters = SlidingWindow(redis, clock=reactor)
    login_limits = LoginLimits(
        per_address=evolve(LoginLimits().per_address, count=options["failed-logins-per-address"])
    )
    registration_limits = RegistrationLimits(
        per_address=evolve(
            RegistrationLimits().per_address, count=options["registrations-per-hour"]
        )
    )
    api = ServerAPI(
        accounts=accounts,
        social=social,
        feed=feed,
        chat=chat,
        in_flight=in_flight,
        metrics=metrics,
        version=__version__,
        clock=reactor,
        logins=LoginThrottle(counters, login_limits),
        registrations=RegistrationThrottle(counters, registration_limits),
        trusted_proxies=options["trusted-networks"],
    )
    resources += [
        ClosedOnStop("chat-http", http.close),
        ClosedOnStop("redis", redis.disconnect),
        ClosedOnStop("mysql", pool.close),
    ]
    history = FleetHistory(registry=metrics.registry, clock=reactor)
    fleet = FleetView(
        instances=instances,
        balancer=balancer,
        health=health,
        history=history,
        clock=reactor,
        consul_ui=None if options["chat-url"] else f"{options['consul-config'].url}/ui/",
    )
    return ServingInstance(
        endpoint=(
            reuse_port_endpoint(reactor, options["listen"])
            if options["reuse-port"]
            else serverFromString(reactor, options["listen"])
        ),
        site=LimitedSite(api.resource(), options["http-limits"], reactor=reactor),
        listen_description=options["listen"],
        apply_schema=partial(apply_server_schema, pool),
        in_flight=in_flight,
        clock=reactor,
        drain_timeout=options["drain-timeout"],
        reactor=reactor,
        workers=[
            instances,
            FeedFanout(feed, clock=reactor),
            history,
            admin_listener(options, api, reactor, fleet=fleet.resource()),
        ],
        prerequisites=[connect.watcher] if connect.watcher is not None else [],
        resources=resources,
    )
