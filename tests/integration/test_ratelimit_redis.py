"""Integration tests of snet.server.ratelimit against the real Redis of the test session:
counts shared by two independent clients (two "processes"), atomic under concurrency, the
sliding window, and the login and registration policies (time from a fake clock)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock

from snet.config import RedisConfig
from snet.server.ratelimit import (
    Limit,
    LoginLimits,
    LoginThrottle,
    RateLimited,
    RegistrationThrottle,
    SlidingWindow,
)
from snet.storage import RedisPool, redis_pool
from snet.testing.servers import Redis
from snet.web.errors import ErrorCode

pytestmark = pytest.mark.integration

REDIS_DB = 9
"""A Redis database of this module's own on the shared server."""

START = 1_800_000_000.0
"""A moment at the start of a window of every length the tests use."""


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(START)
    return clock


@pytest.fixture
def counters(redis: RedisPool, clock: Clock) -> SlidingWindow:
    return SlidingWindow(redis, clock=clock, timeout=2.0)


@pytest_twisted.async_yield_fixture
async def other_process(redis_server: Redis) -> AsyncIterator[RedisPool]:
    """A second, independent client of the same Redis database, as another process has."""
    config = RedisConfig.from_url(redis_server.url)
    client = redis_pool(RedisConfig(config.host, config.port, REDIS_DB), timeout=2.0)
    try:
        yield client
    finally:
        await client.disconnect()


LIMIT = Limit("test", 5, 60.0)


@pytest_twisted.ensureDeferred
async def test_two_processes_share_one_limit(
    counters: SlidingWindow, other_process: RedisPool, clock: Clock
) -> None:
    other = SlidingWindow(other_process, clock=clock, timeout=2.0)
    outcomes = []
    for n in range(8):
        window = counters if n % 2 == 0 else other
        outcomes.append((await window.hit(LIMIT, "k")).allowed)
    assert outcomes == [True] * 5 + [False] * 3


@pytest_twisted.ensureDeferred
async def test_concurrent_hits_never_count_past_the_limit(
    counters: SlidingWindow, other_process: RedisPool, clock: Clock
) -> None:
    other = SlidingWindow(other_process, clock=clock, timeout=2.0)
    hits = await defer.gatherResults(
        [defer.ensureDeferred((counters, other)[n % 2].hit(LIMIT, "k")) for n in range(40)]
    )
    assert sum(hit.allowed for hit in hits) == 5


@pytest_twisted.ensureDeferred
async def test_a_refused_hit_says_when_to_retry_and_is_then_allowed(
    counters: SlidingWindow, clock: Clock
) -> None:
    for _ in range(5):
        assert (await counters.hit(LIMIT, "k")).allowed
    clock.advance(30)
    refused = await counters.hit(LIMIT, "k")
    assert not refused.allowed
    # 5 in this window: it must become the previous window and fade to 4 -> 30 + 12 s
    assert refused.retry_after == 42
    clock.advance(refused.retry_after - 1)
    assert not (await counters.hit(LIMIT, "k")).allowed
    clock.advance(1)
    assert (await counters.hit(LIMIT, "k")).allowed


@pytest_twisted.ensureDeferred
async def test_the_window_slides_a_burst_at_a_window_edge_is_not_doubled(
    counters: SlidingWindow, clock: Clock
) -> None:
    clock.advance(59)
    for _ in range(5):
        assert (await counters.hit(LIMIT, "k")).allowed
    clock.advance(2)  # a new fixed window, but the last minute already holds 5
    assert not (await counters.hit(LIMIT, "k")).allowed


@pytest_twisted.ensureDeferred
async def test_a_refund_gives_a_count_back_once(counters: SlidingWindow) -> None:
    hits = [await counters.hit(LIMIT, "k") for _ in range(5)]
    await counters.refund(hits[0])
    await counters.refund(await counters.hit(LIMIT, "other"))
    assert (await counters.hit(LIMIT, "k")).allowed
    assert not (await counters.hit(LIMIT, "k")).allowed


@pytest_twisted.ensureDeferred
async def test_keys_expire_after_two_windows(counters: SlidingWindow, redis: RedisPool) -> None:
    hit = await counters.hit(LIMIT, "k")
    assert hit.counted_key is not None
    assert 0 < await redis.call("ttl", hit.counted_key) <= 121


# --- logins --------------------------------------------------------------------------------

SMALL = LoginLimits(
    per_address=Limit("login-address", 6, 900.0),
    per_account_address=Limit("login-account-address", 3, 900.0),
    per_account=Limit("login-account", 8, 3600.0),
)
OWNER, ATTACKER = "198.51.100.10", "203.0.113.66"


async def fail(throttle: LoginThrottle, account: str, address: str) -> None:
    attempt = await throttle.begin(account, address)
    attempt.failed()


@pytest_twisted.ensureDeferred
async def test_wrong_passwords_from_one_address_are_refused_but_the_owner_elsewhere_gets_in(
    counters: SlidingWindow,
) -> None:
    throttle = LoginThrottle(counters, SMALL)
    for _ in range(3):
        await fail(throttle, "42", ATTACKER)
    with pytest.raises(RateLimited) as refused:
        await throttle.begin("42", ATTACKER)
    assert refused.value.status == 429
    assert refused.value.code == ErrorCode.TOO_MANY_FAILED_LOGINS
    assert 900 < refused.value.retry_after <= 2 * 900  # the window slides
    attempt = await throttle.begin("42", OWNER)
    await attempt.succeeded()


@pytest_twisted.ensureDeferred
async def test_one_address_guessing_many_accounts_hits_the_per_address_limit(
    counters: SlidingWindow,
) -> None:
    throttle = LoginThrottle(counters, SMALL)
    for account in range(6):
        await fail(throttle, str(account), ATTACKER)
    with pytest.raises(RateLimited):
        await throttle.begin("99", ATTACKER)
    await (await throttle.begin("99", OWNER)).succeeded()


@pytest_twisted.ensureDeferred
async def test_a_right_password_gives_the_counts_back(counters: SlidingWindow) -> None:
    throttle = LoginThrottle(counters, SMALL)
    await fail(throttle, "42", OWNER)
    await fail(throttle, "42", OWNER)
    await (await throttle.begin("42", OWNER)).succeeded()
    await fail(throttle, "42", OWNER)  # the third failure: the success was not counted
    with pytest.raises(RateLimited):
        await throttle.begin("42", OWNER)


@pytest_twisted.ensureDeferred
async def test_an_attempt_whose_password_could_not_be_checked_is_not_counted(
    counters: SlidingWindow,
) -> None:
    throttle = LoginThrottle(counters, SMALL)
    for _ in range(10):
        await (await throttle.begin("42", ATTACKER)).abandoned()
    await fail(throttle, "42", ATTACKER)
    await fail(throttle, "42", ATTACKER)
    await fail(throttle, "42", ATTACKER)
    with pytest.raises(RateLimited):
        await throttle.begin("42", ATTACKER)


@pytest_twisted.ensureDeferred
async def test_a_distributed_attack_locks_out_new_addresses_but_not_the_owners_known_one(
    counters: SlidingWindow,
) -> None:
    throttle = LoginThrottle(counters, SMALL)
    await (await throttle.begin("42", OWNER)).succeeded()  # the owner's usual address
    for n in range(4):
        for _ in range(2):
            await fail(throttle, "42", f"203.0.113.{n}")
    with pytest.raises(RateLimited):
        await throttle.begin("42", "203.0.113.200")
    with pytest.raises(RateLimited):
        await throttle.begin("42", "2001:db8::1")
    await (await throttle.begin("42", OWNER)).succeeded()
    await (await throttle.begin("43", "203.0.113.200")).succeeded()  # other accounts


@pytest_twisted.ensureDeferred
async def test_attempts_refused_per_address_leave_the_account_counters_alone(
    counters: SlidingWindow,
) -> None:
    throttle = LoginThrottle(counters, SMALL)
    for _ in range(3):
        await fail(throttle, "42", ATTACKER)
    for _ in range(50):
        with pytest.raises(RateLimited):
            await throttle.begin("42", ATTACKER)
    for n in range(5):  # 3 + 5 = 8: the per-account limit is only now reached
        await fail(throttle, "42", f"192.0.2.{n}")
    with pytest.raises(RateLimited):
        await throttle.begin("42", "192.0.2.100")


# --- registrations -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_registrations_per_address_are_limited_and_abandoned_ones_given_back(
    counters: SlidingWindow,
) -> None:
    throttle = RegistrationThrottle(counters)
    first = await throttle.begin(OWNER)
    await first.abandoned()
    for _ in range(10):
        await throttle.begin(OWNER)
    with pytest.raises(RateLimited) as refused:
        await throttle.begin(OWNER)
    assert refused.value.code == ErrorCode.TOO_MANY_REGISTRATIONS
    assert 3600 < refused.value.retry_after <= 2 * 3600
    await throttle.begin(ATTACKER)
