"""The feed cache in Redis and the fan-out worker that fills it. MySQL (snet.server.social)
stays the truth: every key here can be dropped at any time and is rebuilt from it.

Keys:

``snet:feed:{user_id}`` (sorted set)
    The ids of the newest FEED_SIZE posts of the users *user_id* follows, scored by id (ids
    grow with time), plus the member ``"0"`` scored 0: the mark of a *built* feed. A feed
    without the mark is rebuilt from MySQL on its next read, merging in whatever the fan-out
    added meanwhile (so that a post fanned out during a rebuild is not lost). Built feeds
    expire after FEED_TTL seconds; unbuilt ones, which only the fan-out creates, after
    UNBUILT_TTL.
``snet:post:{post_id}`` (string)
    The post's public JSON, or ``-`` (a tombstone) once it is deleted. A body is written when
    the post is created or updated and read back from MySQL when missing (with ``NX``, so
    that an older copy never replaces a newer one or a tombstone); an update never replaces a
    tombstone.
``snet:feed:jobs`` (list)
    Fan-out jobs ``{"op": "add"|"remove", "post", "author", "after"}``. A request only pushes
    a job; ``FeedFanout`` pops one, handles the next FANOUT_BATCH followers (ids above
    ``after``) in one Lua call and pushes the rest back, so no request and no single step
    does unbounded work, and several jobs (and monolith instances) share the work fairly.

Writes that find Redis unreachable are kept in memory (bounded) and retried by the worker
before it takes new jobs. Reads that find Redis unreachable are served from MySQL (degraded,
logged once per outage); with MySQL down too they fail (503).
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any

import txredisapi
from attrs import define, field
from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from snet.server.social import FEED_SIZE, Post, Social
from snet.storage import RedisPool

log = Logger(namespace="snet.server.feed")

FEED_KEY = "snet:feed:{user_id}"
POST_KEY_PREFIX = "snet:post:"
POST_KEY = POST_KEY_PREFIX + "{post_id}"
JOBS_KEY = "snet:feed:jobs"
BUILT_MARK = "0"
TOMBSTONE = "-"

FEED_TTL = 7 * 24 * 3600
"""Seconds a built feed lives after its (re)build."""
UNBUILT_TTL = 120
"""Seconds an unbuilt feed (fan-out additions awaiting a rebuild) lives."""
BODY_TTL = 24 * 3600
"""Seconds a cached post body lives."""
TOMBSTONE_TTL = FEED_TTL + 3600
"""Seconds a deleted post's tombstone lives: longer than any feed that may still hold it."""
FANOUT_BATCH = 500
"""Followers handled per fan-out step."""
MAX_PENDING = 100_000
"""Failed cache writes kept for retry; the oldest are dropped beyond this (feeds then heal
by their TTL)."""
READ_ATTEMPTS = 3


def feed_key(user_id: int) -> str:
    return FEED_KEY.format(user_id=user_id)


def post_key(post_id: int) -> str:
    return POST_KEY.format(post_id=post_id)


# KEYS: follower feeds. ARGV: post id, feed size, unbuilt TTL.
_FANOUT_ADD = """
local id = ARGV[1]
local size = tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
    local built = redis.call('ZSCORE', key, '0')
    redis.call('ZADD', key, id, id)
    if built then
        redis.call('ZREMRANGEBYRANK', key, 1, -(size + 1))
    else
        redis.call('ZREMRANGEBYRANK', key, 0, -(size + 1))
        if redis.call('TTL', key) < 0 then
            redis.call('EXPIRE', key, ARGV[3])
        end
    end
end
return #KEYS
"""

# KEYS: follower feeds. ARGV: post id.
_FANOUT_REMOVE = """
for _, key in ipairs(KEYS) do
    redis.call('ZREM', key, ARGV[1])
end
return #KEYS
"""

# KEYS[1]: the feed. ARGV: feed size, TTL, post ids...
_REBUILD = """
local key = KEYS[1]
for i = 3, #ARGV do
    redis.call('ZADD', key, ARGV[i], ARGV[i])
end
redis.call('ZADD', key, 0, '0')
redis.call('ZREMRANGEBYRANK', key, 1, -(tonumber(ARGV[1]) + 1))
redis.call('EXPIRE', key, ARGV[2])
return redis.call('ZCARD', key) - 1
"""

# KEYS[1]: the feed. ARGV: first rank, last rank, body key prefix.
# nil for an unbuilt feed, else a flat list: id, body (nil if not cached), id, body, ...
_READ = """
local key = KEYS[1]
if not redis.call('ZSCORE', key, '0') then
    return nil
end
local out = {}
for _, id in ipairs(redis.call('ZREVRANGE', key, ARGV[1], ARGV[2])) do
    if id ~= '0' then
        out[#out + 1] = id
        out[#out + 1] = redis.call('GET', ARGV[3] .. id) or ''
    end
end
return out
"""

# KEYS[1]: a body key. ARGV: body, TTL. Writes the body unless the post is deleted.
_SET_BODY_UNLESS_DELETED = """
if redis.call('GET', KEYS[1]) == '-' then
    return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return 1
"""


def _body(post: Post) -> str:
    return json.dumps(post.to_json(), ensure_ascii=False, separators=(",", ":"))


@define
class FeedMetrics:
    """The feed's Prometheus metrics, in the registry the app's other metrics use."""

    registry: CollectorRegistry = field(factory=CollectorRegistry)
    rebuilds: Counter = field(init=False)
    batches: Counter = field(init=False)
    degraded_reads: Counter = field(init=False)
    pending: Gauge = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.rebuilds = Counter(
            "snet_feed_rebuilds", "Feeds rebuilt from MySQL into Redis", registry=self.registry
        )
        self.batches = Counter(
            "snet_feed_fanout_batches",
            "Fan-out batches applied, by operation",
            ["op"],
            registry=self.registry,
        )
        self.degraded_reads = Counter(
            "snet_feed_degraded_reads",
            "Feed reads served from MySQL because Redis was unavailable",
            registry=self.registry,
        )
        self.pending = Gauge(
            "snet_feed_pending_writes",
            "Cache writes waiting for Redis to come back",
            registry=self.registry,
        )


@define
class FeedCache:
    """Feeds in Redis over the truth in MySQL (``social``); see the module's docstring."""

    social: Social
    redis: RedisPool
    metrics: FeedMetrics = field(factory=FeedMetrics)
    batch_size: int = FANOUT_BATCH
    _pending: deque[tuple[str, tuple[Any, ...]]] = field(factory=deque, init=False)
    _degraded: bool = field(default=False, init=False)

    # --- reads --------------------------------------------------------------------------

    def read(self, user_id: int, offset: int, limit: int) -> Deferred[list[Post]]:
        """Posts *offset* to *offset* + *limit* of *user_id*'s feed (never past FEED_SIZE),
        newest first: from Redis, rebuilt from MySQL if missing, straight from MySQL if
        Redis is unavailable."""
        return Deferred.fromCoroutine(self._read(user_id, offset, limit))

    async def _read(self, user_id: int, offset: int, limit: int) -> list[Post]:
        end = min(offset + limit, FEED_SIZE)
        if offset >= end:
            return []
        try:
            posts = await self._read_cached(user_id, offset, end)
        except txredisapi.RedisError as e:
            self.metrics.degraded_reads.inc()
            if not self._degraded:
                self._degraded = True
                log.warn(
                    "Redis unavailable, serving feeds from MySQL: {error}",
                    error=f"{type(e).__name__}: {e}",
                )
            return await self.social.feed_page(user_id, offset, end - offset)
        if self._degraded:
            self._degraded = False
            log.info("Redis is back: feeds are served from it again")
        return posts

    async def _read_cached(self, user_id: int, offset: int, end: int) -> list[Post]:
        key = feed_key(user_id)
        posts: list[Post] = []
        for _attempt in range(READ_ATTEMPTS):
            read_args = [offset, end - 1, POST_KEY_PREFIX]
            flat = await self.redis.call("eval", _READ, [key], read_args)
            if flat is None:
                await self.rebuild(user_id)
                flat = await self.redis.call("eval", _READ, [key], read_args)
                if flat is None:
                    # Dropped again at once (a friendship changed meanwhile): ask MySQL.
                    return await self.social.feed_page(user_id, offset, end - offset)
            pairs = [(int(flat[i]), flat[i + 1]) for i in range(0, len(flat), 2)]
            missing = [post_id for post_id, body in pairs if not body]
            found = await self._fill_bodies(missing) if missing else {}
            posts = []
            gone: list[int] = []
            for post_id, body in pairs:
                if body == TOMBSTONE:
                    gone.append(post_id)
                elif body:
                    posts.append(Post.from_json(json.loads(body)))
                elif post_id in found:
                    posts.append(found[post_id])
                else:
                    gone.append(post_id)
            if not gone:
                return posts
            # Deleted posts the remove fan-out has not reached yet: drop them and read again,
            # so that the page is full.
            await self.redis.call("zrem", key, *[str(post_id) for post_id in gone])
        return posts

    async def _fill_bodies(self, post_ids: list[int]) -> dict[int, Post]:
        found = await self.social.posts(post_ids)
        for post in found.values():
            await self.redis.call(
                "set", post_key(post.id), _body(post), expire=BODY_TTL, only_if_not_exists=True
            )
        return found

    def rebuild(self, user_id: int) -> Deferred[int]:
        """Rebuild *user_id*'s feed from MySQL, merged with what the fan-out added to it;
        fires with its size."""
        return Deferred.fromCoroutine(self._rebuild(user_id))

    async def _rebuild(self, user_id: int) -> int:
        ids = await self.social.feed_ids(user_id, FEED_SIZE)
        size = await self.redis.call(
            "eval", _REBUILD, [feed_key(user_id)], [FEED_SIZE, FEED_TTL, *map(str, ids)]
        )
        self.metrics.rebuilds.inc()
        log.debug("feed of {user_id} rebuilt with {size} posts", user_id=user_id, size=size)
        return int(size)

    # --- writes (after MySQL changed) ------------------------------------------------------
    #
    # They never fail: MySQL has changed already, so a Redis that cannot be reached must not
    # turn the request into an error. What could not be written is retried by the worker.

    def post_created(self, post: Post) -> Deferred[None]:
        """Cache *post*'s body and queue its fan-out to its author's followers."""
        job = {"op": "add", "post": post.id, "author": post.author_id, "after": 0}
        return self._write(
            [
                ("set", (post_key(post.id), _body(post)), {"expire": BODY_TTL}),
                ("rpush", (JOBS_KEY, json.dumps(job)), {}),
            ]
        )

    def post_updated(self, post: Post) -> Deferred[None]:
        """Replace *post*'s cached body (unless it is deleted meanwhile)."""
        return self._write(
            [("eval", (_SET_BODY_UNLESS_DELETED, [post_key(post.id)], [_body(post), BODY_TTL]), {})]
        )

    def post_deleted(self, post: Post) -> Deferred[None]:
        """Tombstone *post* (feeds skip it at once) and queue its removal from followers'
        feeds."""
        job = {"op": "remove", "post": post.id, "author": post.author_id, "after": 0}
        return self._write(
            [
                ("set", (post_key(post.id), TOMBSTONE), {"expire": TOMBSTONE_TTL}),
                ("rpush", (JOBS_KEY, json.dumps(job)), {}),
            ]
        )

    def follows_changed(self, user_id: int) -> Deferred[None]:
        """*user_id* followed or unfollowed someone: drop their feed (rebuilt on next read)."""
        return self._write([("delete", (feed_key(user_id),), {})])

    def _write(self, calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._write_all(calls))

    async def _write_all(self, calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]]) -> None:
        for index, (command, args, kwargs) in enumerate(calls):
            try:
                await self.redis.call(command, *args, **kwargs)
            except txredisapi.ConnectionError as e:
                log.warn(
                    "feed cache write {command} failed, kept for retry: {error}",
                    command=command,
                    error=f"{type(e).__name__}: {e}",
                )
                for later in calls[index:]:
                    self._keep(later)
                return
            except Exception:
                log.failure("feed cache write {command} failed", command=command)

    def _keep(self, call: tuple[str, tuple[Any, ...], dict[str, Any]]) -> None:
        command, args, kwargs = call
        if len(self._pending) >= MAX_PENDING:
            dropped = self._pending.popleft()
            log.error("feed cache write {command} dropped: too many pending", command=dropped[0])
        self._pending.append((command, (args, kwargs)))
        self.metrics.pending.set(len(self._pending))

    @property
    def pending(self) -> int:
        """How many cache writes wait for Redis."""
        return len(self._pending)

    # --- the fan-out ----------------------------------------------------------------------

    def work(self) -> Deferred[bool]:
        """One step of background work: retry pending writes, then apply one fan-out batch.
        Fires with whether there was a batch to apply (so more may follow at once)."""
        return Deferred.fromCoroutine(self._work())

    async def _work(self) -> bool:
        while self._pending:
            command, (args, kwargs) = self._pending[0]
            try:
                await self.redis.call(command, *args, **kwargs)
            except txredisapi.ConnectionError:
                raise
            except Exception:
                log.failure("dropping feed cache write {command}", command=command)
            self._pending.popleft()
            self.metrics.pending.set(len(self._pending))
        raw = await self.redis.call("lpop", JOBS_KEY)
        if raw is None:
            return False
        try:
            job = json.loads(raw)
            op, post_id, author, after = job["op"], job["post"], job["author"], job["after"]
            if op not in ("add", "remove"):
                raise ValueError(op)
            post_id, author, after = int(post_id), int(author), int(after)
        except (ValueError, KeyError, TypeError):
            log.error("dropping a malformed fan-out job: {job!r}", job=raw)
            return True
        try:
            followers = await self.social.followers(author, after=after, limit=self.batch_size)
            if followers:
                keys = [feed_key(follower) for follower in followers]
                if op == "add":
                    await self.redis.call(
                        "eval", _FANOUT_ADD, keys, [post_id, FEED_SIZE, UNBUILT_TTL]
                    )
                else:
                    await self.redis.call("eval", _FANOUT_REMOVE, keys, [post_id])
                self.metrics.batches.labels(op=op).inc()
            if len(followers) == self.batch_size:
                job["after"] = followers[-1]
                await self.redis.call("rpush", JOBS_KEY, json.dumps(job))
        except Exception:
            # The batch is applied again later (its Lua calls are idempotent).
            self._keep(("rpush", (JOBS_KEY, raw), {}))
            raise
        return True


class FeedFanout(TimerService):
    """Drains the fan-out queue in the background: every *interval* seconds, up to
    *batches_per_tick* batches, one after another. ``stopService`` waits for the current
    batch to finish."""

    def __init__(
        self,
        feed: FeedCache,
        *,
        clock: IReactorTime,
        interval: float = 0.1,
        batches_per_tick: int = 10,
    ) -> None:
        super().__init__(interval, self._tick)  # type: ignore[no-untyped-call]
        self.clock = clock
        self.feed = feed
        self.batches_per_tick = batches_per_tick
        self._failing = False

    def _tick(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._run_tick())

    async def _run_tick(self) -> None:
        for _ in range(self.batches_per_tick):
            try:
                more = await self.feed.work()
            except Exception as e:
                if not self._failing:
                    self._failing = True
                    log.warn("feed fan-out paused: {error}", error=f"{type(e).__name__}: {e}")
                return
            if self._failing:
                self._failing = False
                log.info("feed fan-out resumed")
            if not more or not self._loop.running:  # stopped meanwhile
                return
