"""Session fixtures: real servers started once per test run, from their real binaries.

Integration tests ask for ``consul_agent``, ``mariadb`` or ``redis_server``; each starts on
free 127.0.0.1 ports in a temporary directory the first time a test needs it and is stopped
at the end of the run (or at exit, if the run is interrupted).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_twisted

from snet.config import RedisConfig
from snet.rediswire import RedisWire, redis_wire
from snet.storage import RedisPool, redis_pool
from snet.testing.servers import ConsulAgent, MariaDB, Redis


@pytest.fixture(scope="session")
def consul_agent() -> Iterator[ConsulAgent]:
    with ConsulAgent() as agent:
        yield agent


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDB]:
    with MariaDB() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[Redis]:
    with Redis() as server:
        yield server


@pytest_twisted.async_yield_fixture
async def redis(request: pytest.FixtureRequest, redis_server: Redis) -> AsyncIterator[RedisPool]:
    """A client of the shared Redis server, on the database number the test module names
    (``REDIS_DB``), emptied first, so that modules never see each other's keys."""
    config = RedisConfig.from_url(redis_server.url)
    client = redis_pool(RedisConfig(config.host, config.port, request.module.REDIS_DB), timeout=2.0)
    try:
        await client.call("flushdb")
        yield client
    finally:
        await client.disconnect()


@pytest_twisted.async_yield_fixture
async def chat_redis(
    request: pytest.FixtureRequest, redis: RedisPool, redis_server: Redis
) -> AsyncIterator[RedisWire]:
    """A chat instance's Redis client (``snet.rediswire``) on the database of ``redis``, which
    that fixture empties first."""
    from twisted.internet import reactor

    config = RedisConfig.from_url(redis_server.url)
    db = request.module.REDIS_DB
    wire = redis_wire(RedisConfig(config.host, config.port, db), reactor, timeout=2.0)
    try:
        yield wire
    finally:
        await wire.disconnect()
