"""Unit tests of snet.server.ratelimit: the client address behind trusted proxies, the
Retry-After arithmetic of the sliding window, and what each policy does when Redis does not
answer (driven with a fake clock; the counting itself is tested against a real Redis in
tests/integration/test_ratelimit.py)."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.test.requesthelper import DummyRequest

from snet.server.ratelimit import (
    Limit,
    LoginThrottle,
    RegistrationThrottle,
    SlidingWindow,
    address_key,
    client_address,
    forwarded_client,
    parse_address,
    parse_networks,
    seconds_until_allowed,
    served_over_tls,
)
from snet.storage import RedisPool
from snet.testing import failure_of, result_of
from snet.web.errors import ErrorCode, Unavailable

PROXIES = parse_networks("10.0.0.0/8, 192.168.1.1, fd00::/8")

# --- client addresses -------------------------------------------------------------------


def request_from(peer: str, *forwarded: str) -> DummyRequest:
    request = DummyRequest([b""])
    request.client = type("Peer", (), {"host": peer})()  # type: ignore[assignment]
    request.getClientAddress = lambda: request.client  # type: ignore[method-assign]
    for value in forwarded:
        request.requestHeaders.addRawHeader(b"X-Forwarded-For", value.encode())
    return request


def test_without_trusted_proxies_the_peer_is_the_client_whatever_the_header_says() -> None:
    assert client_address(request_from("203.0.113.5", "1.1.1.1")) == "203.0.113.5"


def test_an_untrusted_peer_is_the_client_even_with_trusted_proxies_configured() -> None:
    request = request_from("203.0.113.5", "1.1.1.1")
    assert client_address(request, PROXIES) == "203.0.113.5"


def test_behind_a_trusted_proxy_the_right_most_untrusted_entry_is_the_client() -> None:
    request = request_from("10.1.2.3", "6.6.6.6, 198.51.100.7", "192.168.1.1")
    assert client_address(request, PROXIES) == "198.51.100.7"


def test_a_forged_entry_left_of_the_real_client_is_ignored() -> None:
    assert forwarded_client("10.0.0.1", ["127.0.0.1, 198.51.100.7"], PROXIES) == "198.51.100.7"


def test_garbage_stops_the_walk_at_the_last_trusted_hop() -> None:
    assert forwarded_client("10.0.0.1", ["1.2.3.4, evil, 10.9.9.9"], PROXIES) == "10.9.9.9"


def test_a_trusted_peer_without_the_header_is_the_client() -> None:
    assert client_address(request_from("10.0.0.1"), PROXIES) == "10.0.0.1"


def proto_request(peer: str, *protos: str, secure: bool = False) -> DummyRequest:
    request = request_from(peer)
    request.isSecure = lambda: secure  # type: ignore[method-assign]
    for value in protos:
        request.requestHeaders.addRawHeader(b"X-Forwarded-Proto", value.encode())
    return request


@pytest.mark.parametrize(
    ("request_", "proxies", "over_tls"),
    [
        (proto_request("203.0.113.5", secure=True), (), True),  # our own TLS listener
        (proto_request("203.0.113.5", "https"), (), False),  # no proxy is trusted
        (proto_request("203.0.113.5", "https"), PROXIES, False),  # an untrusted peer says so
        (proto_request("10.0.0.1", "https"), PROXIES, True),
        (proto_request("10.0.0.1", "HTTPS, http"), PROXIES, True),  # the client's hop first
        (proto_request("10.0.0.1", "http"), PROXIES, False),
        (proto_request("10.0.0.1"), PROXIES, False),
    ],
)
def test_served_over_tls_believes_only_a_trusted_proxy(
    request_: DummyRequest, proxies: Any, over_tls: bool
) -> None:
    assert served_over_tls(request_, proxies) is over_tls


def test_only_trusted_entries_give_the_left_most() -> None:
    assert forwarded_client("10.0.0.1", ["10.0.0.3, 10.0.0.2"], PROXIES) == "10.0.0.3"


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("1.2.3.4", "1.2.3.4"),
        (" 1.2.3.4:8080 ", "1.2.3.4"),
        ("::1", "::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:1.2.3.4", "1.2.3.4"),
        ("unknown", None),
        ("", None),
        ("1.2.3.4.5", None),
    ],
)
def test_addresses_are_parsed_with_ports_brackets_and_mapped_ipv4(
    text: str, parsed: str | None
) -> None:
    result = parse_address(text)
    assert (str(result) if result is not None else None) == parsed


def test_ipv6_addresses_are_limited_by_their_64() -> None:
    assert address_key("2001:db8:1:2:aaaa::1") == address_key("2001:db8:1:2:bbbb::9")
    assert address_key("2001:db8:1:2::1") == "2001:db8:1:2::/64"
    assert address_key("203.0.113.5") == "203.0.113.5"


def test_trusted_proxies_must_be_addresses_or_networks() -> None:
    with pytest.raises(ValueError):
        parse_networks("10.0.0.0/8,proxy.local")
    assert parse_networks("") == ()


ipv4 = st.ip_addresses(v=4).map(str)
untrusted = ipv4.filter(lambda a: not any(ipaddress.ip_address(a) in n for n in PROXIES))
trusted = st.sampled_from(["10.0.0.1", "10.200.3.4", "192.168.1.1", "fd00::5"])


@given(
    forged=st.lists(st.one_of(ipv4, st.text(max_size=12)), max_size=4),
    client=untrusted,
    hops=st.lists(trusted, max_size=3),
    peer=trusted,
)
def test_whatever_a_client_forges_the_address_the_first_proxy_saw_wins(
    forged: list[str], client: str, hops: list[str], peer: str
) -> None:
    entries = [e.replace(",", "") for e in forged] + [client, *hops]
    assert forwarded_client(peer, [", ".join(entries)], PROXIES) == client


@given(peer=untrusted, header=st.text(max_size=40))
def test_an_untrusted_peer_is_never_overridden(peer: str, header: str) -> None:
    assert forwarded_client(peer, [header], PROXIES) == peer


# --- the arithmetic of the window -------------------------------------------------------


def weighted(previous: int, current: int, elapsed: float, window: float) -> float:
    return previous * (1 - elapsed / window) + current


@given(
    limit=st.integers(1, 50),
    window=st.floats(1, 3600),
    fraction=st.floats(0, 0.999),
    current=st.integers(0, 60),
    previous=st.integers(0, 60),
)
def test_retry_after_is_exactly_when_one_more_event_fits(
    limit: int, window: float, fraction: float, current: int, previous: int
) -> None:
    elapsed = fraction * window
    wait = seconds_until_allowed(limit, window, elapsed, current, previous)
    fits_now = weighted(previous, current, elapsed, window) + 1 <= limit
    assert (wait == 0) == fits_now
    later = elapsed + wait + 1e-6 * window
    if later < window:
        assert weighted(previous, current, later, window) + 1 <= limit + 1e-6
    else:
        assert weighted(current, 0, later - window, window) + 1 <= limit + 1e-6
    if wait > 0.01 * window:
        earlier = elapsed + wait - 0.01 * window
        if earlier < window:
            assert weighted(previous, current, earlier, window) + 1 > limit - 1e-6
        else:
            assert weighted(current, 0, earlier - window, window) + 1 > limit - 1e-6


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Limit("x", 0, 60.0)
    with pytest.raises(ValueError):
        Limit("x", 1, 0.0)


# --- Redis unavailable --------------------------------------------------------------------


class SilentRedis:
    """A txredisapi handler whose calls never answer."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: Deferred()


class BrokenRedis:
    """A txredisapi handler whose calls fail at once."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: defer.fail(ConnectionError("refused"))


def counters(handler: object, clock: Clock) -> SlidingWindow:
    return SlidingWindow(RedisPool(handler, clock=clock, timeout=2.0), clock=clock, timeout=0.5)


def test_logins_are_let_through_within_the_timeout_when_redis_does_not_answer() -> None:
    clock = Clock()
    throttle = LoginThrottle(counters(SilentRedis(), clock))
    attempt = defer.ensureDeferred(throttle.begin("42", "203.0.113.5"))
    for _ in range(3):  # three limits, each waits at most its timeout
        clock.advance(0.5)
    result = result_of(attempt)
    succeeded = defer.ensureDeferred(result.succeeded())
    clock.advance(0.5)
    result_of(succeeded)


def test_logins_are_let_through_when_redis_refuses_connections() -> None:
    throttle = LoginThrottle(counters(BrokenRedis(), Clock()))
    attempt = result_of(defer.ensureDeferred(throttle.begin("42", "203.0.113.5")))
    result_of(defer.ensureDeferred(attempt.succeeded()))


def test_registrations_are_refused_with_503_when_redis_does_not_answer() -> None:
    clock = Clock()
    throttle = RegistrationThrottle(counters(SilentRedis(), clock))
    d = defer.ensureDeferred(throttle.begin("203.0.113.5"))
    clock.advance(0.5)
    error = failure_of(d).value
    assert isinstance(error, Unavailable)
    assert error.code == ErrorCode.RATE_LIMITS_UNAVAILABLE and error.retry_after == 1
