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
  :class:`RedisUnavailable` when the connection cannot be made, is lost before the call's
  answer came, or Redis has not answered within *timeout* seconds. A late answer to a call
  that timed out is read and dropped, so that the answers after it still find their calls;
  but when nothing at all came on the connection since the call was written, the connection
  is dropped and the next call makes a new one (a peer that went away without a word).

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
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
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


def parse_reply(buffer: bytes, start: int = 0) -> tuple[Reply, int] | None:
    """The reply that begins at *start* of *buffer* and the index after it, or None if the
    buffer does not hold all of it yet. An error reply is returned as a :class:`RedisError`.

    :raises MalformedReply: if the bytes are not a RESP2 reply.
    """
    end = buffer.find(b"\r\n", start)
    if end < 0:
        return None
    kind, line, after = buffer[start : start + 1], buffer[start + 1 : end], end + 2
    try:
        if kind == b":":
            return int(line), after
        if kind == b"+":
            return line.decode(), after
        if kind == b"-":
            return RedisError(line.decode(errors="replace")), after
        if kind == b"$":
            length = int(line)
            if length < 0:
                return None if length != -1 else (None, after)
            if len(buffer) < after + length + 2:
                return None
            return buffer[after : after + length], after + length + 2
        if kind == b"*":
            count = int(line)
            if count < 0:
                return (None, after) if count == -1 else None
            items: list[Reply] = []
            for _ in range(count):
                parsed = parse_reply(buffer, after)
                if parsed is None:
                    return None
                item, after = parsed
                items.append(item)
            return items, after
    except ValueError as e:
        raise MalformedReply(f"not a RESP2 reply: {buffer[start:end][:60]!r}") from e
    raise MalformedReply(f"not a RESP2 reply: {buffer[start:end][:60]!r}")


class _Call:
    """One command written on *connection* and waiting for its answer."""

    __slots__ = ("answer", "connection", "written_at")

    def __init__(self, connection: _Connection, written_at: float) -> None:
        self.connection = connection
        self.written_at = written_at
        self.answer: Deferred[Reply] = Deferred(self._given_up)

    def _given_up(self, _: Deferred[Reply]) -> None:
        """The caller stopped waiting (a timeout): the call stays in line for its answer, which
        will be dropped; but if Redis said nothing on the connection since the call was
        written, the connection is dropped, and the next call makes a new one."""
        connection = self.connection
        if connection.open and connection.heard_at < self.written_at:
            log.warn("Redis has not answered a call: making a new connection")
            connection.drop()


class _Connection(Protocol):
    """One connection to Redis: calls in the order they were written, answers in that order."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.calls: deque[_Call] = deque()
        self.buffer = b""
        self.heard_at = float("-inf")
        self.open = False
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.open = True

    def send(self, data: bytes, count: int = 1) -> list[_Call]:
        """Write *count* commands encoded in *data*; their calls, in order."""
        now = self.clock.seconds()
        calls = [_Call(self, now) for _ in range(count)]
        self.calls.extend(calls)
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

    def drop(self) -> None:
        """Abort the connection; no call is written on it from now on."""
        self.open = False
        assert self.transport is not None
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.open = False
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
    _stopped: bool = field(default=False, init=False)
    _out: bool = field(default=False, init=False)

    def call(self, *arguments: Argument) -> Deferred[Reply]:
        """Run one command (``call("ZCARD", key)``); fires with its answer."""
        data = encode_command(arguments)
        connection = self._connection
        if connection is not None and connection.open and not self._stopped:
            answer = self._send(connection, data)
        else:
            answer = self._connected().addCallback(self._send, data)
        return answer.addTimeout(self.timeout, self.clock, onTimeoutCancel=self._timed_out)

    def eval(
        self, script: Script, keys: Sequence[Argument], arguments: Sequence[Argument]
    ) -> Deferred[Reply]:
        """Run *script* on *keys* with *arguments*: ``EVALSHA``, or ``EVAL`` if Redis does not
        know the script yet."""
        tail = (len(keys), *keys, *arguments)

        def unknown(failure: Failure) -> Deferred[Reply]:
            if not (
                isinstance(failure.value, RedisError) and str(failure.value).startswith("NOSCRIPT")
            ):
                return fail(failure)
            return self.call("EVAL", script.source, *tail)

        return self.call("EVALSHA", script.sha, *tail).addErrback(unknown)

    def disconnect(self) -> Deferred[None]:
        """Close the connection; later calls fail with :class:`RedisUnavailable`."""
        self._stopped = True
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
        raise RedisUnavailable(f"Redis did not answer within {timeout:g} s")

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
        factory = ProtocolFactory.forProtocol(lambda: _Connection(self.clock))
        factory.noisy = False
        connecting: Deferred[Any] = self.endpoint.connect(factory)
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
        waiting, self._waiting = self._waiting or [], None
        if self._stopped:
            assert connection.transport is not None
            connection.transport.loseConnection()
            for waiter in waiting:
                waiter.errback(RedisUnavailable("the Redis client is closed"))
            return
        self._connection = connection
        if self._out:
            self._out = False
            log.info("Redis answers again")
        for waiter in waiting:
            waiter.callback(connection)

    def _not_ready(self, failure: Failure) -> None:
        waiting, self._waiting = self._waiting or [], None
        error = failure.value
        if not isinstance(error, RedisError):  # a refused login is not Redis being away
            error = RedisUnavailable(f"cannot reach Redis: {failure.getErrorMessage()}")
        if not self._out:
            self._out = True
            log.warn("Redis cannot be reached: {error}", error=str(error))
        for waiter in waiting:
            waiter.errback(error)


def redis_wire(config: RedisConfig, reactor: Any, *, timeout: float) -> RedisWire:
    """A :class:`RedisWire` to *config*'s host and port, on *reactor* (``IReactorTCP`` and
    ``IReactorTime``)."""
    endpoint = HostnameEndpoint(reactor, config.host, config.port, timeout=timeout)
    return RedisWire(config, endpoint, reactor, timeout)
