"""``twistd snet-server``: options and the wiring of the monolith."""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService
from twisted.internet import reactor as global_reactor
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from snet import __version__
from snet.consul import TreqConsul
from snet.lifecycle import ServingInstance
from snet.options import ServiceOptions, positive_float
from snet.server.accounts import Accounts
from snet.server.app import ServerAPI
from snet.server.balancer import RoundRobin
from snet.server.chat_client import ChatClient, chat_http_client
from snet.server.discovery import HealthyInstances, StaticInstances, endpoint_from_url
from snet.server.feed import FeedCache, FeedFanout, FeedMetrics
from snet.server.social import Social
from snet.storage import mysql_pool, redis_pool
from snet.web import HTTPMetrics, InFlight, QuietSite


class Options(ServiceOptions):
    """Options of the monolith; each one can also come from the environment."""

    synopsis = "[options]"
    longdesc = (
        "Run the snet monolith: the public JSON API on --listen (default tcp:8080). Dialog "
        "calls go round-robin to every chat instance Consul reports as passing for "
        "--chat-service, or all to one --chat-url."
    )
    optParameters = [
        ["chat-service", None, None, "Consul service name of the chat instances "
         "(default snet-chat).", str],
        ["chat-url", None, None, "Send every dialog call to this one URL (e.g. a proxy) "
         "instead of discovering instances in Consul.", str],
        ["refresh-interval", None, None, "Seconds between periodic reads of Consul's list, "
         "beside the blocking queries (default 5).", positive_float],
        ["chat-timeout", None, None, "Seconds a chat instance may take to answer (default 5).",
         positive_float],
        ["chat-connect-timeout", None, None, "Seconds to connect to a chat instance before "
         "trying the next one (default 1).", positive_float],
    ]  # fmt: skip
    environment = {
        "chat-service": "SNET_CHAT_SERVICE",
        "chat-url": "SNET_CHAT_URL",
        "refresh-interval": "SNET_REFRESH_INTERVAL",
        "chat-timeout": "SNET_CHAT_TIMEOUT",
        "chat-connect-timeout": "SNET_CHAT_CONNECT_TIMEOUT",
    }
    fallbacks = {
        "listen": "tcp:8080",
        "chat-service": "snet-chat",
        "refresh-interval": 5.0,
        "chat-timeout": 5.0,
        "chat-connect-timeout": 1.0,
    }

    def postOptions(self) -> None:
        super().postOptions()
        if self["chat-url"]:
            try:
                endpoint_from_url(self["chat-url"])
            except ValueError as e:
                raise usage.UsageError(str(e)) from None


def makeService(options: Any) -> IService:
    """Wire the monolith: storage, feed, chat discovery and balancing, HTTP API, listener."""
    reactor: Any = global_reactor
    pool = mysql_pool(options["mysql-config"], reactor=reactor)
    redis = redis_pool(options["redis-config"])
    metrics = HTTPMetrics()
    in_flight = InFlight()
    closers: list[Any] = []

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
        closers.append(consul.close)
    http = chat_http_client(reactor, connect_timeout=options["chat-connect-timeout"])
    chat = ChatClient(
        balancer=RoundRobin(instances),
        http=http,
        clock=reactor,
        timeout=options["chat-timeout"],
        connect_timeout=options["chat-connect-timeout"],
        registry=metrics.registry,
    )
    accounts = Accounts(pool=pool, clock=reactor)
    social = Social(pool=pool, clock=reactor)
    feed = FeedCache(social=social, redis=redis, metrics=FeedMetrics(registry=metrics.registry))
    api = ServerAPI(
        accounts=accounts,
        social=social,
        feed=feed,
        chat=chat,
        in_flight=in_flight,
        metrics=metrics,
        version=__version__,
        clock=reactor,
    )
    closers += [http.close, lambda: redis.disconnect(), pool.close]
    return ServingInstance(
        endpoint=serverFromString(reactor, options["listen"]),
        site=QuietSite(api.resource()),  # type: ignore[no-untyped-call]
        listen_description=options["listen"],
        apply_schema=accounts.apply_schema,
        in_flight=in_flight,
        clock=reactor,
        drain_timeout=options["drain-timeout"],
        workers=[instances, FeedFanout(feed, clock=reactor)],
        closers=closers,
    )
