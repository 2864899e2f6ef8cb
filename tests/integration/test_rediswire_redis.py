"""RedisWire against a real Redis server of its own: logging in as an ACL user, its database,
scripts Redis does not know yet, many calls in flight, and Redis frozen or restarted."""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import gatherResults

from snet.config import RedisConfig
from snet.rediswire import RedisError, RedisUnavailable, RedisWire, Script, redis_wire
from snet.testing.servers import Redis


@pytest.fixture
def server() -> Iterator[Redis]:
    with Redis() as redis:  # its own: the tests log in as an ACL user, freeze and kill it
        yield redis


@pytest_twisted.async_yield_fixture
async def wire(server: Redis) -> AsyncIterator[RedisWire]:
    client = redis_wire(RedisConfig("127.0.0.1", server.port), reactor, timeout=1.0)
    try:
        yield client
    finally:
        await client.disconnect()


@pytest_twisted.ensureDeferred
async def test_an_acl_user_logs_in_and_works_in_its_own_database(server: Redis) -> None:
    answer = server.command("ACL", "SETUSER", "snet-chat", "on", ">s3cret", "~snet:*", "+@all")
    assert answer == b"+OK"
    user = redis_wire(
        RedisConfig("127.0.0.1", server.port, db=5, password="s3cret", username="snet-chat"),
        reactor,
        timeout=1.0,
    )
    try:
        assert await user.call("SET", "snet:k", "v") == "OK"
        assert await user.call("GET", "snet:k") == b"v"
        assert await user.call("CLIENT", "INFO") is not None
        with pytest.raises(RedisError, match="NOPERM"):
            await user.call("SET", "elsewhere", "v")
    finally:
        await user.disconnect()
    assert server.command("SELECT", "5") == b"+OK"
    wrong = redis_wire(
        RedisConfig("127.0.0.1", server.port, password="nope", username="snet-chat"),
        reactor,
        timeout=1.0,
    )
    try:
        with pytest.raises(RedisUnavailable, match="WRONGPASS"):
            await wrong.call("PING")
    finally:
        await wrong.disconnect()


@pytest_twisted.ensureDeferred
async def test_a_script_redis_forgot_is_run_from_its_source_and_known_again(
    wire: RedisWire, server: Redis
) -> None:
    script = Script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    assert await wire.eval(script, ["n"], [2]) == 2
    assert await wire.call("SCRIPT", "EXISTS", script.sha) == [1]
    assert server.command("SCRIPT", "FLUSH") == b"+OK"
    assert await wire.eval(script, ["n"], [3]) == 5
    assert await wire.call("SCRIPT", "EXISTS", script.sha) == [1]


@pytest_twisted.ensureDeferred
async def test_many_calls_in_flight_get_their_own_answers(wire: RedisWire) -> None:
    answers = await gatherResults([wire.call("INCR", "counter") for _ in range(300)])
    assert answers == list(range(1, 301))
    keys = await gatherResults([wire.call("SET", f"k{n}", n) for n in range(50)])
    assert keys == ["OK"] * 50
    values = await gatherResults([wire.call("GET", f"k{n}") for n in range(50)])
    assert values == [str(n).encode() for n in range(50)]


@pytest_twisted.ensureDeferred
async def test_a_frozen_redis_fails_calls_in_time_and_serves_them_once_thawed(
    wire: RedisWire, server: Redis
) -> None:
    assert await wire.call("PING") == "PONG"
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)
    try:
        with pytest.raises(RedisUnavailable, match="within 1 s"):
            await wire.call("INCR", "while-frozen")
    finally:
        os.kill(server.pid, signal.SIGCONT)
    assert await wire.call("PING") == "PONG"


@pytest_twisted.ensureDeferred
async def test_after_a_restart_the_next_calls_are_served_on_a_new_connection(
    wire: RedisWire, server: Redis
) -> None:
    assert await wire.call("SET", "k", "before") == "OK"
    server.kill()
    with pytest.raises(RedisUnavailable):
        await wire.call("GET", "k")
    server.start()
    assert await wire.call("GET", "k") is None, "a new, empty Redis"
    assert await wire.call("SET", "k", "after") == "OK"
