"""A chat instance's Redis client: RESP2 commands pipelined on one connection, and nothing else.

Every dialog send updates its reader's unread counter with one Lua script in Redis
(``snet.chat.unread``). Through txredisapi that call cost a chat instance about 0.2 ms of
CPU per send, a fifth of all it spent on the send: a lazy pool of connections handed out
through a ``DeferredQueue``, each command checked and encoded argument by argument, each
answer read line by line and passed through queues of Deferreds. :class:`RedisWire` makes
the same calls with the least machinery that keeps their behaviour:

- **A command** is one write of its encoded arguments (``str`` as UTF-8, ``int`` in
  decimal, ``bytes`` as they are) on the one connection. Commands are pipelined: each gets
  its answer in the order they were written (RESP2: simple strings, errors, integers, bulk
  strings as ``bytes``, arrays as lists; nil as ``None``).
- **A script** (:class:`Script`) is run with ``EVALSHA``; when Redis does not know it
  (``NOSCRIPT``: a new, restarted or flushed Redis), with ``EVAL``, which also keeps it.
- **The connection** is made when a call needs it and none is open; calls that come while
  it is being made wait for it. It says who it is first (``AUTH`` with the user and
  password, ``SELECT`` of the database), pipelined before the calls.
- **Failures.** An error answer fails its call with :class:`RedisError`. A call fails with
  :class:`RedisUnavailable` (which ``snet.storage.is_unavailable`` counts as a back end
  away: 503) when the connection cannot be made or Redis refuses its login or database, when
  it is lost before the call's answer came, or when Redis has not answered within *timeout*
  seconds (a script run again by ``EVAL`` included). A caller that stops waiting sooner
  (its own timeout, a client gone) cancels only its own call: the call keeps its place, and
  its late answer is read and dropped, so that the answers after it still find their calls.
  A watchdog drops the connection when a call has waited *timeout* seconds and Redis has
  said nothing on it since the call was written (a frozen Redis, a peer gone without a
  word); the next call makes a new one.

The monolith still uses txredisapi (``snet.storage.RedisPool``): its Redis calls are not on
the dialog path.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from typing import Any

from attrs import Factory, define, field, frozen
from twisted.internet.defer import Deferred, FirstError, fail, gatherResults, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory as ProtocolFactory
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from snet.config import RedisConfig

log = Logger(namespace="snet.rediswire")

Argument = str | int | bytes
Reply = Any
"""``int``, ``bytes``, ``str`` (a simple string), ``None``, or a list of replies."""


class RedisError(Exception):
    """Redis answered a command with an error (``WRONGPASS ...``, ``NOSCRIPT ...``, ...)."""


class RedisUnavailable(ConnectionError):
    """Redis could not be reached, the connection was lost, or it did not answer in time."""


def _sha1(script: Script) -> str:
    # Redis names scripts by SHA-1: an identifier, not a protection.
    return hashlib.sha1(script.source.encode(), usedforsecurity=False).hexdigest()


@frozen
class Script:
    """A Lua script, known to Redis by its SHA-1."""

    source: str
    sha: str = field(init=False, default=Factory(_sha1, takes_self=True))


def encode_command(arguments: Sequence[Argument]) -> bytes:
    """The RESP2 array of bulk strings for one command."""
    parts = [b"*%d\r\n" % len(arguments)]
    for argument in arguments:
        if isinstance(argument, bytes):
            data = argument
        elif isinstance(argument, str):
            data = argument.encode()
        elif isinstance(argument, int) and not isinstance(argument, bool):
            data = b"%d" % argument
        else:
            raise TypeError(f"a Redis argument is str, int or bytes, not {type(argument).__name__}")
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class MalformedReply(Exception):
    """Bytes from Redis that are not RESP2."""


MAX_DEPTH = 16
"""Arrays nested deeper than this are refused as malformed (snet's scripts answer flat)."""


def parse_reply(buffer: bytes, start: int = 0, depth: int = 0) -> tuple[Reply, int] | None:
    """The reply that begins at *start* of *buffer* and the index after it, or None if the
    buffer does not hold all of it yet. An error reply is returned as a :class:`RedisError`.

    :raises MalformedReply: if the bytes are not a RESP2 reply.
    """
    end = buffer.find(b"\r\n", start)
    if end < 0:
        return None
    kind, line, after = buffer[start : start + 1], buffer[start + 1 : end], end + 2
    malformed = MalformedReply(f"not a RESP2 reply: {buffer[start:end][:60]!r}")
    try:
        if kind == b":":
            return int(line), after
        if kind == b"+":
            return line.decode(), after
        if kind == b"-":
            return RedisError(line.decode(errors="replace")), after
        if kind == b"$":
            length = int(line)
            if length == -1:
                return None, after
            if length < 0:
                raise malformed
            if len(buffer) < after + length + 2:
                return None
            return buffer[after : after + length], after + length + 2
        if kind == b"*":
            count = int(line)
            if count == -1:
                return None, after
            if count < 0 or depth >= MAX_DEPTH:
                raise malformed
            items: list[Reply] = []
            for _ in range(count):
                parsed = parse_reply(buffer, after, depth + 1)
                if parsed is None:
                    return None
                item, after = parsed
                items.append(item)
            return items, after
    except ValueError as e:
        raise malformed from e
    raise malformed


class _Call:
    """One command written on a connection and waiting for its answer. A caller that stops
    waiting (its own timeout) cancels the answer; the call keeps its place in line, and its
    answer, when it comes, is dropped."""

    __slots__ = ("answer", "written_at")

    def __init__(self, written_at: float) -> None:
        self.written_at = written_at
        self.answer: Deferred[Reply] = Deferred()


class _Connection(Protocol):
    """One connection to Redis: calls in the order they were written, answers in that order.

    While calls wait, a watchdog looks at the oldest: if it has waited *silence* seconds and
    Redis has said nothing on the connection since it was written (a frozen Redis, a peer gone
    without a word), the connection is dropped, its calls fail, and the next call makes a new
    one. Redis answering slowly keeps it."""

    def __init__(self, clock: IReactorTime, silence: float) -> None:
        self.clock = clock
        self.silence = silence
        self.calls: deque[_Call] = deque()
        self.buffer = b""
        self.heard_at = float("-inf")
        self.open = False
        self.closed: Deferred[None] = Deferred()
        self._watchdog: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.open = True

    def send(self, data: bytes, count: int = 1) -> list[_Call]:
        """Write *count* commands encoded in *data*; their calls, in order."""
        now = self.clock.seconds()
        calls = [_Call(now) for _ in range(count)]
        self.calls.extend(calls)
        if self._watchdog is None:
            self._watchdog = self.clock.callLater(self.silence, self._watch)
        assert self.transport is not None
        self.transport.write(data)
        return calls

    def dataReceived(self, data: bytes) -> None:
        self.heard_at = self.clock.seconds()
        buffer = self.buffer + data if self.buffer else data
        start = 0
        try:
            while start < len(buffer):
                parsed = parse_reply(buffer, start)
                if parsed is None:
                    break
                reply, start = parsed
                if not self.calls:
                    raise MalformedReply("Redis answered a command nobody sent")
                answer = self.calls.popleft().answer
                if answer.called:  # it timed out: its answer is dropped
                    continue
                if isinstance(reply, RedisError):
                    answer.errback(reply)
                else:
                    answer.callback(reply)
        except MalformedReply as e:
            log.error("dropping the Redis connection: {error}", error=str(e))
            self.buffer = b""
            self.drop()
            return
        self.buffer = buffer[start:]

    def _watch(self) -> None:
        self._watchdog = None
        if self.open and self.calls and not self.drop_if_silent():
            due = max(self.calls[0].written_at, self.heard_at) + self.silence - self.clock.seconds()
            self._watchdog = self.clock.callLater(max(due, 0.0), self._watch)

    def drop_if_silent(self) -> bool:
        """Drop the connection if its oldest call has waited *silence* seconds and Redis has
        said nothing since it was written; whether it did."""
        if not (self.open and self.calls):
            return False
        oldest = self.calls[0].written_at
        if self.heard_at >= oldest or self.clock.seconds() - oldest < self.silence:
            return False
        log.warn(
            "Redis said nothing for {silence} s: making a new connection", silence=self.silence
        )
        self.drop()
        return True

    def drop(self) -> None:
        """Abort the connection; no call is written on it from now on."""
        self.open = False
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.open = False
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        calls, self.calls = self.calls, deque()
        for call in calls:
            if not call.answer.called:
                call.answer.errback(
                    RedisUnavailable(f"the Redis connection was lost: {reason.getErrorMessage()}")
                )
        self.closed.callback(None)


@define
class RedisWire:
    """Calls to the Redis of *config* on one pipelined connection (see the module docstring),
    made through *endpoint*; each fails with :class:`RedisUnavailable` if Redis has not
    answered within *timeout* seconds of *clock*. :func:`redis_wire` makes one."""

    config: RedisConfig
    endpoint: IStreamClientEndpoint
    clock: IReactorTime
    timeout: float
    _connection: _Connection | None = field(default=None, init=False)
    _waiting: list[Deferred[_Connection]] | None = field(default=None, init=False)
    _connecting: Deferred[Any] | None = field(default=None, init=False)
    _stopped: bool = field(default=False, init=False)
    _out: bool = field(default=False, init=False)

    def call(self, *arguments: Argument) -> Deferred[Reply]:
        """Run one command (``call("ZCARD", key)``); fires with its answer."""
        return self._call(arguments, self.timeout)

    def eval(
        self, script: Script, keys: Sequence[Argument], arguments: Sequence[Argument]
    ) -> Deferred[Reply]:
        """Run *script* on *keys* with *arguments*: ``EVALSHA``, or ``EVAL`` if Redis does not
        know the script yet; both within the one timeout."""
        tail = (len(keys), *keys, *arguments)
        started = self.clock.seconds()

        def unknown(failure: Failure) -> Deferred[Reply]:
            error = failure.value
            if not (isinstance(error, RedisError) and str(error).startswith("NOSCRIPT")):
                return fail(failure)
            left = self.timeout - (self.clock.seconds() - started)
            if left <= 0:
                return fail(RedisUnavailable(f"Redis did not answer within {self.timeout:g} s"))
            return self._call(("EVAL", script.source, *tail), left)

        return self.call("EVALSHA", script.sha, *tail).addErrback(unknown)

    def _call(self, arguments: Sequence[Argument], timeout: float) -> Deferred[Reply]:
        data = encode_command(arguments)
        connection = self._connection
        if connection is not None and connection.open and not self._stopped:
            answer = self._send(connection, data)
        else:
            answer = self._connected().addCallback(self._send, data)
        return answer.addTimeout(timeout, self.clock, onTimeoutCancel=self._timed_out)

    def disconnect(self) -> Deferred[None]:
        """Close the connection (a connection being made is given up); later calls fail with
        :class:`RedisUnavailable`."""
        self._stopped = True
        if self._connecting is not None:
            self._connecting.cancel()
        connection, self._connection = self._connection, None
        if connection is None or not connection.open:
            return succeed(None)
        assert connection.transport is not None
        connection.transport.loseConnection()
        return connection.closed

    def _send(self, connection: _Connection, data: bytes) -> Deferred[Reply]:
        if not connection.open:
            raise RedisUnavailable("the Redis connection was lost")
        [call] = connection.send(data)
        return call.answer

    def _timed_out(self, result: object, timeout: float) -> None:
        # Before the caller goes on (and may call again): a silent connection goes now, not
        # at the watchdog's turn, so that the next call is not written on it.
        if self._connection is not None:
            self._connection.drop_if_silent()
        raise RedisUnavailable(f"Redis did not answer within {self.timeout:g} s")

    def _connected(self) -> Deferred[_Connection]:
        if self._stopped:
            return fail(RedisUnavailable("the Redis client is closed"))
        if self._connection is not None and self._connection.open:
            return succeed(self._connection)
        waiter: Deferred[_Connection] = Deferred(lambda d: self._forget(d))
        if self._waiting is None:
            self._waiting = [waiter]
            self._connect()
        else:
            self._waiting.append(waiter)
        return waiter

    def _forget(self, waiter: Deferred[_Connection]) -> None:
        if self._waiting is not None and waiter in self._waiting:
            self._waiting.remove(waiter)

    def _connect(self) -> None:
        factory = ProtocolFactory.forProtocol(lambda: _Connection(self.clock, self.timeout))
        factory.noisy = False
        connecting: Deferred[Any] = self.endpoint.connect(factory)
        self._connecting = connecting  # until _ready or _not_ready: disconnect() cancels it
        connecting.addCallback(self._introduce)
        connecting.addTimeout(self.timeout, self.clock)
        connecting.addCallbacks(self._ready, self._not_ready)

    def _introduce(self, connection: _Connection) -> Deferred[_Connection]:
        """Log in and select the database, before any call; fires with the connection."""
        config = self.config
        commands: list[bytes] = []
        if config.password is not None:
            user = [config.username] if config.username else []
            commands.append(encode_command(["AUTH", *user, config.password]))
        if config.db:
            commands.append(encode_command(["SELECT", config.db]))
        if not commands:
            return succeed(connection)
        calls = connection.send(b"".join(commands), len(commands))

        def refused(failure: Failure) -> Failure:
            connection.drop()
            if isinstance(failure.value, FirstError):
                return failure.value.subFailure
            return failure

        answers = gatherResults([call.answer for call in calls], consumeErrors=True)
        return answers.addCallbacks(lambda _: connection, refused)

    def _ready(self, connection: _Connection) -> None:
        waiting, self._waiting, self._connecting = self._waiting or [], None, None
        if self._stopped:
            connection.drop()
            self._fail(waiting, RedisUnavailable("the Redis client is closed"))
            return
        self._connection = connection
        if self._out:
            self._out = False
            log.info("Redis answers again")
        for waiter in waiting:
            if not waiter.called:  # a waiter's callback may cancel another
                waiter.callback(connection)

    def _not_ready(self, failure: Failure) -> None:
        waiting, self._waiting, self._connecting = self._waiting or [], None, None
        if isinstance(failure.value, RedisError):
            reason = f"Redis refused the login or the database: {failure.value}"
        else:
            reason = f"cannot reach Redis: {failure.getErrorMessage()}"
        if not self._out:
            self._out = True
            log.warn("{reason}", reason=reason)
        self._fail(waiting, RedisUnavailable(reason))

    @staticmethod
    def _fail(waiting: list[Deferred[_Connection]], error: RedisUnavailable) -> None:
        for waiter in waiting:
            if not waiter.called:
                waiter.errback(RedisUnavailable(*error.args))


def redis_wire(config: RedisConfig, reactor: Any, *, timeout: float) -> RedisWire:
    """A :class:`RedisWire` to *config*'s host and port, on *reactor* (``IReactorTCP`` and
    ``IReactorTime``)."""
    endpoint = HostnameEndpoint(reactor, config.host, config.port, timeout=timeout)
    return RedisWire(config, endpoint, reactor, timeout)
