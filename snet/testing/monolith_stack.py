"""A monolith with one chat instance, on servers a test already runs: what tests of the public
API call.

``monolith_with_one_chat`` starts a chat instance registered with the Consul agent, waits until
Consul reports it passing, then starts ``twistd -n snet-server`` discovering it; each gets a
database of its own (``<name>_chat``, ``<name>_server``) and a Redis database number of its
own, so that test modules never see each other's data. Both are stopped on exit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from snet.testing.fleet import ChatFleet, monolith
from snet.testing.processes import TwistdProcess
from snet.testing.servers import ConsulAgent, MariaDB, Redis


@contextmanager
def monolith_with_one_chat(
    consul: ConsulAgent,
    mariadb: MariaDB,
    redis: Redis,
    *,
    name: str,
    chat_redis_db: int,
    server_redis_db: int,
) -> Iterator[tuple[str, ChatFleet]]:
    """Yield the monolith's base URL (``http://127.0.0.1:PORT``) and its chat fleet."""
    fleet = ChatFleet(
        consul_url=consul.url,
        mysql_url=mariadb.create_database(f"{name}_chat"),
        redis_url=redis.url.replace("/0", f"/{chat_redis_db}"),
        count=1,
    )
    process: TwistdProcess | None = None
    try:
        fleet.wait_all_passing()
        process = monolith(
            consul_url=consul.url,
            mysql_url=mariadb.create_database(f"{name}_server"),
            redis_url=redis.url.replace("/0", f"/{server_redis_db}"),
            chat_service=fleet.service,
        ).start()
        assert process.health_url is not None
        yield process.health_url.removesuffix("/health"), fleet
    finally:
        if process is not None:
            process.stop()
        fleet.stop()
