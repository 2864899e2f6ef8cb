"""Rate limits of the monolith, shared by all its processes through Redis, and the client
address they are keyed by.

**Counters.** ``SlidingWindow`` counts events per key in Redis with the sliding-window
approximation: the count of the current fixed window plus the previous window's count
weighted by how much of it still overlaps the last ``window`` seconds. One Lua script
checks and counts atomically, so any number of processes share one limit exactly; an
event over the limit is refused and not counted (a client hammering at a closed door
does not keep it closed). Time comes from an injected clock (IReactorTime), so tests
drive windows with ``task.Clock``; processes agree on windows as far as their clocks do.

**Logins** (``LoginThrottle``). Each attempt is counted before the password is checked
(a refused attempt costs no scrypt) and the count is given back when the password was
right, so only failures stay counted. In order:

1. *per client address*, over all accounts (default 30 failures / 15 min): stops one
   address guessing many accounts; it only ever locks out that address.
2. *per account and client address* (10 / 15 min): stops one address guessing one
   account; the account's owner at any other address is not affected.
3. *per account*, over all addresses, much higher (200 / hour): only a guess spread over
   many addresses reaches it. Then the account is under a distributed attack, and
   attempts from addresses that have not logged in to it successfully in the last 30
   days are refused, while addresses that have ("known addresses", remembered at each
   successful login) still get their passwords checked. So an attacker cannot lock the
   owner out from where the owner usually logs in; an owner at a new address waits for
   the attack to slow down (Retry-After says how long).

Per-address limits come first, so attempts refused there never touch the account's
counters. Addresses are keyed as given, except IPv6 by their /64 (one host usually has a
whole /64).

**Registrations** (``RegistrationThrottle``): per client address (10 / hour), counted
when begun and given back if the registration did not happen.

**Refusal**: ``RateLimited``, an ``ApiError`` with status 429, a ``code`` and
``retry_after`` seconds (the app's error mapping turns it into ``Retry-After`` and the
JSON error body).

**Redis unavailable** (a Redis error, or no answer within ``timeout``, 0.5 s): each
limit says what happens (``Limit.fail_open``). Login limits fail open: a login is never
made impossible by a cache, and each attempt still costs the attacker a scrypt-bound
round trip. Registration limits fail closed (503, retry shortly): a registration can
wait, and it is where unthrottled abuse leaves lasting rows behind.

**Client address** (``client_address``): the socket peer, unless the peer is one of the
trusted proxies; then the right-most ``X-Forwarded-For`` entry that is not a trusted proxy
(entries to its left are the client's to forge).
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Sequence
from typing import Any

from attrs import define, field, frozen, validators
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from snet.storage import RedisPool
from snet.web.errors import ApiError, ErrorCode, Unavailable

log = Logger(namespace="snet.server.ratelimit")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class RateLimited(ApiError):
    """Too many requests (429): try again after ``retry_after`` seconds."""

    status = 429
    default_code = ErrorCode.RATE_LIMITED

    def __init__(self, message: str, *, retry_after: int, code: int | None = None) -> None:
        super().__init__(message, code=code, retry_after=retry_after)
        self.retry_after: int = retry_after


# --- client addresses -------------------------------------------------------------------


def parse_networks(text: str | Iterable[str]) -> tuple[Network, ...]:
    """Trusted proxies from an option: addresses or CIDRs, comma-separated (or a list).

    :raises ValueError: on anything that is not an address or network.
    """
    parts = text.split(",") if isinstance(text, str) else list(text)
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in parts if p.strip())


def parse_address(text: str) -> Address | None:
    """*text* as an IP address (``1.2.3.4``, ``1.2.3.4:80``, ``::1``, ``[::1]:80``), IPv4
    inside IPv6 (``::ffff:1.2.3.4``) unwrapped; None if it is not one."""
    text = text.strip()
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: Address, proxies: Sequence[Network]) -> bool:
    return any(address in network for network in proxies)


def forwarded_client(peer: str, forwarded_for: Sequence[str], proxies: Sequence[Network]) -> str:
    """The client's address, given the socket *peer*, the ``X-Forwarded-For`` header
    values (in order) and the trusted *proxies*.

    The peer, unless it is a trusted proxy. Then the entries are walked from the right
    (each proxy appends the address it got the request from), skipping trusted proxies;
    the first other one is the client. If an entry is not an address, the walk stops at
    the last trusted hop before it; if every entry is trusted, the left-most one wins.
    """
    peer_address = parse_address(peer)
    if peer_address is None or not _trusted(peer_address, proxies):
        return str(peer_address) if peer_address is not None else peer
    hop = peer_address
    entries = [e for value in forwarded_for for e in value.split(",")]
    for entry in reversed(entries):
        address = parse_address(entry)
        if address is None:
            break
        hop = address
        if not _trusted(address, proxies):
            break
    return str(hop)


def client_address(request: IRequest, trusted_proxies: Sequence[Network] = ()) -> str:
    """The address of *request*'s client (see ``forwarded_client``); ``X-Forwarded-For``
    counts only when the socket peer is one of *trusted_proxies*."""
    peer = request.getClientAddress()  # type: ignore[no-untyped-call]
    host = str(getattr(peer, "host", "") or "unknown")
    if not trusted_proxies:
        return str(parse_address(host) or host)
    values = request.requestHeaders.getRawHeaders(b"X-Forwarded-For") or []
    texts = [v.decode("latin-1") for v in values]
    return forwarded_client(host, texts, trusted_proxies)


def served_over_tls(request: IRequest, trusted_proxies: Sequence[Network] = ()) -> bool:
    """Whether the browser reached *request* over TLS: this process's own TLS listener, or a
    trusted proxy (the socket peer is one of *trusted_proxies*) that says
    ``X-Forwarded-Proto: https`` (the left-most value: the proto the client used)."""
    if request.isSecure():  # type: ignore[no-untyped-call]
        return True
    if not trusted_proxies:
        return False
    peer = parse_address(str(getattr(request.getClientAddress(), "host", "") or ""))  # type: ignore[no-untyped-call]
    if peer is None or not _trusted(peer, trusted_proxies):
        return False
    values = request.requestHeaders.getRawHeaders(b"X-Forwarded-Proto") or []
    first = b",".join(values).split(b",")[0].strip().lower()
    return first == b"https"


def address_key(address: str) -> str:
    """The key a limit counts *address* under: IPv4 as is, IPv6 by its /64."""
    parsed = parse_address(address)
    if isinstance(parsed, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((parsed, 64), strict=False))
    return str(parsed) if parsed is not None else address


# --- counters -----------------------------------------------------------------------------

_positive = validators.gt(0)


@frozen
class Limit:
    """At most *count* events per *window* seconds per key; *name* is part of the Redis
    key. With *fail_open*, the event is allowed when Redis cannot be asked."""

    name: str
    count: int = field(validator=_positive)
    window: float = field(validator=validators.gt(0.0))
    fail_open: bool = True


_HIT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
local cost = tonumber(ARGV[3])
if previous * tonumber(ARGV[2]) + current + cost > tonumber(ARGV[1]) then
  return {0, current, previous}
end
if cost > 0 then
  current = redis.call('INCRBY', KEYS[1], cost)
  redis.call('EXPIRE', KEYS[1], ARGV[4])
end
return {1, current, previous}
"""
"""KEYS: this window's counter, the previous window's. ARGV: limit, weight of the previous
window, cost, expiry. Counts *cost* unless that would go over the limit."""

_REFUND = """
local count = tonumber(redis.call('GET', KEYS[1]) or '0')
if count > 0 then
  return redis.call('DECRBY', KEYS[1], math.min(count, tonumber(ARGV[1])))
end
return 0
"""


def seconds_until_allowed(
    limit: int, window: float, elapsed: float, current: int, previous: int, cost: int = 1
) -> float:
    """How long until *cost* more events fit under *limit*, when *elapsed* (0 <= e <
    *window*) seconds of the current window have passed, with *current* events counted
    in it and *previous* in the window before. 0 if they fit now."""
    room = limit - cost
    fraction = elapsed / window
    if current <= room:
        if previous * (1 - fraction) + current <= room:
            return 0.0
        needed = 1 - (room - current) / previous
        return max(0.0, (needed - fraction) * window)
    # This window alone is over: wait for it to become the previous one and fade enough.
    needed = 1 - room / current if room > 0 else 1.0
    return (1 - fraction) * window + needed * window


@frozen
class Hit:
    """The outcome of one check: whether it was *allowed*, when to retry if not, and the
    Redis key it was counted under (to give it back), if it was counted."""

    allowed: bool
    retry_after: int = 0
    counted_key: str | None = None
    cost: int = 0


class RedisUnavailable(Exception):
    """Redis could not be asked (error or timeout) for a limit."""


@define
class SlidingWindow:
    """Sliding-window counters in Redis (see the module docstring).

    :param prefix: the start of every key (``snet:rate``).
    :param timeout: seconds a check may wait for Redis before it counts as unavailable.
    """

    redis: RedisPool
    clock: IReactorTime
    prefix: str = "snet:rate"
    timeout: float = 0.5

    def key(self, limit: Limit, key: str, index: int) -> str:
        return f"{self.prefix}:{limit.name}:{key}:{index}"

    async def hit(self, limit: Limit, key: str, cost: int = 1) -> Hit:
        """Count *cost* events for *key* under *limit*, unless that would go over it.

        *cost* 0 only asks whether one more event would fit (and counts nothing).

        :raises RedisUnavailable: if Redis does not answer in time.
        """
        now = self.clock.seconds()
        index = math.floor(now / limit.window)
        elapsed = now - index * limit.window
        current_key = self.key(limit, key, index)
        keys = [current_key, self.key(limit, key, index - 1)]
        weight = repr(1.0 - elapsed / limit.window)
        expiry = math.ceil(2 * limit.window) + 1
        args = [limit.count, weight, cost, expiry]
        reply = await self._ask("eval", _HIT, keys, args)
        allowed, current, previous = (int(x) for x in reply)
        if allowed:
            return Hit(True, 0, current_key if cost > 0 else None, cost)
        wait = seconds_until_allowed(
            limit.count, limit.window, elapsed, current, previous, max(cost, 1)
        )
        return Hit(False, max(1, math.ceil(wait)))

    async def refund(self, hit: Hit) -> None:
        """Give back what *hit* counted (nothing if it counted nothing)."""
        if hit.counted_key is not None:
            await self._ask("eval", _REFUND, [hit.counted_key], [hit.cost])

    async def remember(self, key: str, seconds: float) -> None:
        """Set flag *key* for *seconds*."""
        await self._ask("set", f"{self.prefix}:{key}", "1", expire=math.ceil(seconds))

    async def remembers(self, key: str) -> bool:
        """Whether flag *key* is set."""
        return bool(await self._ask("exists", f"{self.prefix}:{key}"))

    async def _ask(self, command: str, *args: Any, **kwargs: Any) -> Any:
        d: Deferred[Any] = self.redis.call(command, *args, **kwargs)
        d.addTimeout(self.timeout, self.clock)
        try:
            return await d
        except Exception as e:
            raise RedisUnavailable(f"{type(e).__name__}: {e}") from e


async def _checked(counters: SlidingWindow, limit: Limit, key: str, cost: int = 1) -> Hit | None:
    """``counters.hit``, or None when Redis is unavailable and *limit* fails open.

    :raises Unavailable: when Redis is unavailable and *limit* fails closed.
    """
    try:
        return await counters.hit(limit, key, cost)
    except RedisUnavailable as e:
        if limit.fail_open:
            log.warn(
                "rate limit {limit} not checked (allowed): Redis unavailable: {error}",
                limit=limit.name,
                error=str(e),
            )
            return None
        log.warn(
            "rate limit {limit} not checked (refused): Redis unavailable: {error}",
            limit=limit.name,
            error=str(e),
        )
        raise Unavailable(
            "rate limits cannot be checked now; retry shortly",
            code=ErrorCode.RATE_LIMITS_UNAVAILABLE,
        ) from None


async def _refund_all(counters: SlidingWindow, hits: Iterable[Hit | None]) -> None:
    for hit in hits:
        if hit is not None and hit.counted_key is not None:
            try:
                await counters.refund(hit)
            except RedisUnavailable as e:
                log.warn("rate limit count not given back: {error}", error=str(e))


# --- policies -----------------------------------------------------------------------------

DAY = 24 * 3600.0


@frozen
class LoginLimits:
    """The failed-login limits, in the order they are checked (see the module docstring)."""

    per_address: Limit = Limit("login-address", 30, 900.0)
    per_account_address: Limit = Limit("login-account-address", 10, 900.0)
    per_account: Limit = Limit("login-account", 200, 3600.0)
    known_address_for: float = 30 * DAY


@define
class LoginAttempt:
    """One login attempt that the limits let through: tell it how the password check went."""

    _throttle: LoginThrottle
    account: str
    address: str
    _hits: list[Hit | None]
    _done: bool = field(default=False, init=False)

    async def succeeded(self) -> None:
        """The password was right: give the counts back and remember the address."""
        if self._done:
            return
        self._done = True
        await _refund_all(self._throttle.counters, self._hits)
        try:
            await self._throttle.counters.remember(
                self._throttle.known_key(self.account, self.address),
                self._throttle.limits.known_address_for,
            )
        except RedisUnavailable as e:
            log.warn("known address not remembered: {error}", error=str(e))

    def failed(self) -> None:
        """The password was wrong (or there is no such account): the counts stay."""
        self._done = True

    async def abandoned(self) -> None:
        """The password could not be checked (MySQL unavailable, the client went away):
        give the counts back, remember nothing."""
        if self._done:
            return
        self._done = True
        await _refund_all(self._throttle.counters, self._hits)


@define
class LoginThrottle:
    """Failed-login limits per client address, per account and address, and per account."""

    counters: SlidingWindow
    limits: LoginLimits = LoginLimits()

    def known_key(self, account: str, address: str) -> str:
        return f"login-known:{account}:{address_key(address)}"

    async def begin(self, account: str, address: str) -> LoginAttempt:
        """Count a login attempt to *account* from *address* before its password is checked.

        :raises RateLimited: if a limit refuses it (nothing stays counted then).
        :raises Unavailable: only if a limit was configured to fail closed.
        """
        where = address_key(address)
        limits = self.limits
        hits: list[Hit | None] = []
        for limit, key in (
            (limits.per_address, where),
            (limits.per_account_address, f"{account}:{where}"),
        ):
            hit = await _checked(self.counters, limit, key)
            if hit is not None and not hit.allowed:
                await _refund_all(self.counters, hits)
                raise self._refused(limit, hit, account, where)
            hits.append(hit)
        hit = await _checked(self.counters, limits.per_account, account)
        if hit is not None and not hit.allowed and not await self._known(account, address):
            await _refund_all(self.counters, hits)
            raise self._refused(limits.per_account, hit, account, where)
        hits.append(hit)
        return LoginAttempt(self, account, address, hits)

    async def _known(self, account: str, address: str) -> bool:
        try:
            return await self.counters.remembers(self.known_key(account, address))
        except RedisUnavailable:
            return True  # the limits fail open: so does this exception to them

    def _refused(self, limit: Limit, hit: Hit, account: str, address: str) -> RateLimited:
        log.info(
            "login to {account} from {address} refused by {limit}; retry after {retry_after}s",
            account=account,
            address=address,
            limit=limit.name,
            retry_after=hit.retry_after,
        )
        return RateLimited(
            "too many failed logins; retry later",
            retry_after=hit.retry_after,
            code=ErrorCode.TOO_MANY_FAILED_LOGINS,
        )


@frozen
class RegistrationLimits:
    """Registrations per client address; fails closed (see the module docstring)."""

    per_address: Limit = Limit("register-address", 10, 3600.0, fail_open=False)


@define
class Registration:
    """A registration the limit let through; ``abandoned()`` gives the count back."""

    _counters: SlidingWindow
    _hit: Hit | None

    async def abandoned(self) -> None:
        """The registration did not happen (invalid input, an error): uncount it."""
        hit, self._hit = self._hit, None
        await _refund_all(self._counters, [hit])


@define
class RegistrationThrottle:
    """Registrations per client address."""

    counters: SlidingWindow
    limits: RegistrationLimits = RegistrationLimits()

    async def begin(self, address: str) -> Registration:
        """Count a registration from *address*.

        :raises RateLimited: if the address registered too often lately.
        :raises Unavailable: if Redis cannot be asked (this limit fails closed).
        """
        limit = self.limits.per_address
        hit = await _checked(self.counters, limit, address_key(address))
        if hit is not None and not hit.allowed:
            log.info(
                "registration from {address} refused; retry after {retry_after}s",
                address=address,
                retry_after=hit.retry_after,
            )
            raise RateLimited(
                "too many registrations from this address; retry later",
                retry_after=hit.retry_after,
                code=ErrorCode.TOO_MANY_REGISTRATIONS,
            )
        return Registration(self.counters, hit)
