"""The monolith's HTTP/1.1 client for its calls to chat instances, and nothing else.

Twisted's ``Agent``, its connection pool and ``HTTP11ClientProtocol`` are general: a
request is parsed from a URL, its headers merged, its body produced, its answer passed
through a parser, a ``Response`` and a body protocol, each a state machine of its own.
The chat calls need none of that generality, and the monolith makes one for every dialog
call it forwards; :class:`ChatWire` makes them with the least machinery that keeps the
same behaviour:

- **The request** is one write: the request line and headers built from pieces made once
  per instance (``Host`` and the protocol version) and the call's own headers, then the body.
  No pipelining: a connection carries one exchange at a time.
- **The answer** is read by :class:`_Connection`: the status line and the three headers that
  frame the body (``Content-Length``, ``Transfer-Encoding: chunked``, ``Connection``), then
  the body, delimited by its length, by chunks, or by the end of the connection (HTTP/1.0 or
  neither header). Interim 1xx answers are skipped. A body over *max_body* bytes fails with
  :class:`~snet.httpcall.BodyTooLarge` and drops the connection.
- **The pool** keeps up to *max_idle* idle connections per instance (host and port), most
  recently used first; one closed by the server while idle leaves the pool when the close is
  seen, and an idle connection unused for *idle_timeout* seconds (30 s: less than the chat
  service's 60 s) is closed by a sweep, so an instance that went away keeps none for long.
  An answer with ``Connection: close``, in HTTP/1.0, or followed by bytes nobody asked for
  leaves its connection closed, not pooled. ``close()`` closes the idle connections.
- **Failures** are those of ``twisted.web.client``, so that the callers' classification
  (``snet.server.chat_client``) is the same as with ``Agent``: connecting fails as
  ``HostnameEndpoint`` fails (``ConnectionRefusedError``, ``TimeoutError``,
  ``ConnectingCancelledError`` when cancelled while connecting, ...), a TLS handshake that
  rejects the instance's identity fails with the policy's error; once connected, a
  connection lost before any byte of the answer fails with ``ResponseNeverReceived`` and
  one lost mid-answer with ``ResponseFailed``, both wrapping the reason (a malformed answer:
  :class:`MalformedAnswer`). Cancelling a call (a timeout) aborts its connection, wrapped the
  same way around ``CancelledError``; the connection is never pooled again.
- **A stale pooled connection.** When a connection that already served an answer is lost
  before any byte of the next answer came (the server closed it while idle: keep-alive
  timeout, restart), a call that is safe to repeat (``retry_safe``: a read, or a write with
  an idempotency key) is made once more on a fresh connection, as Twisted's pool does with
  ``retryAutomatically`` for bodiless idempotent requests. Otherwise the call fails as above;
  if the new connection fails as well, the call fails with ``ResponseNeverReceived`` wrapping
  both reasons (a refused or cancelled new connection included: the request went out on the
  stale one and may have landed, so the call is not "never reached").

With a TLS policy (:class:`~snet.connect.ConnectPolicyForHTTPS`), each new connection is
made with ``wrapClientTLS(policy.creatorForNetloc(host, port), ...)``, as ``Agent`` makes
them: the policy checks the instance's SPIFFE identity during the handshake, before the
request, written already but held by the TLS layer, leaves the process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed, ResponseNeverReceived
from twisted.web.iweb import IPolicyForHTTPS

from snet.httpcall import BodyTooLarge
from snet.server.discovery import ChatEndpoint

__all__ = [
    "DEFAULT_MAX_BODY",
    "ChatAnswer",
    "ChatCall",
    "ChatWire",
    "MalformedAnswer",
]

DEFAULT_MAX_BODY = 16 * 1024 * 1024
"""The largest answer body read by default, in bytes."""

MAX_HEAD = 64 * 1024
"""The longest status line and headers of an answer, in bytes (a chunk-size line or the
trailers of a chunked body are bounded by it too)."""

_MAX_INSTANCES = 1024
"""Instances whose pieces are kept; past that many, those without idle connections go."""


@frozen
class ChatCall:
    """One request: *method* and *target* (path and query, ASCII), the call's own
    *headers* (``Host`` and ``Content-Length`` are added), *body*, and whether the request
    may be sent again after it may have reached the instance (*retry_safe*)."""

    method: bytes
    target: bytes
    headers: Sequence[tuple[bytes, bytes]]
    body: bytes | None
    retry_safe: bool


@frozen
class ChatAnswer:
    """An answer: its status code and its whole body."""

    status: int
    body: bytes


class MalformedAnswer(Exception):
    """The answer is not HTTP/1.x as this client reads it (wrapped in ``ResponseFailed``
    or ``ResponseNeverReceived``, as Twisted's parser errors are)."""


def _header_value(value: bytes) -> bytes:
    """*value* with any line break turned into a space (as Twisted's ``Headers`` does), so
    that no value can end the header block or add a header."""
    if b"\r" in value or b"\n" in value:
        return b" ".join(value.splitlines())
    return value


def _wrapped(error: BaseException, *, answered: bool) -> Exception:
    """*error* as ``twisted.web.client`` reports it: ``ResponseFailed`` once a byte of the
    answer came, ``ResponseNeverReceived`` before."""
    reasons = [Failure(error)]  # type: ignore[no-untyped-call]
    if answered:
        return ResponseFailed(reasons)  # type: ignore[no-untyped-call]
    return ResponseNeverReceived(reasons)  # type: ignore[no-untyped-call]


# --- one connection ---------------------------------------------------------------------------

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _TRAILERS, _UNTIL_CLOSE, _DONE = range(7)


class _Connection(Protocol):
    """One keep-alive connection to an instance; carries one :class:`_Exchange` at a time."""

    def __init__(self, wire: ChatWire, instance: _Instance) -> None:
        self.wire = wire
        self.instance = instance
        self.exchange: _Exchange | None = None
        self.served = 0
        """Answers this connection has carried (a connection that carried one is reused)."""
        self.idle_since = 0.0
        self.lost = False
        self.on_lost: Deferred[None] | None = None
        self._reset()

    def _reset(self) -> None:
        self.received = False
        self._state = _HEAD
        self._buffer = b""
        self._chunks: list[bytes] = []
        self._size = 0
        self._left = 0
        self._status = 0
        self._reusable = False

    # The exchange.

    def start(self, exchange: _Exchange) -> None:
        self.exchange = exchange
        self._reset()
        self.transport.write(exchange.data)  # type: ignore[union-attr]

    def abandon(self) -> None:
        """Drop the connection under the exchange (cancelled, or failed): never pooled again."""
        self.exchange = None
        self.lost = True
        self.transport.abortConnection()  # type: ignore[union-attr]

    # The answer.

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            # Bytes while idle: the server is out of step; this connection is not reused.
            if not self.lost:
                self.lost = True
                self.instance.forget(self)
                self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.received = True
        try:
            done = self._read(data)
        except BodyTooLarge as too_large:
            self.abandon()
            exchange.failed(too_large)
            return
        except MalformedAnswer as malformed:
            self.abandon()
            exchange.failed(_wrapped(malformed, answered=self._state != _HEAD))
            return
        if done:
            self.exchange = None
            self.served += 1
            answer = ChatAnswer(self._status, b"".join(self._chunks))
            self._chunks = []
            exchange.answered(self, answer, self._reusable and not self._buffer)

    def _read(self, data: bytes) -> bool:
        """Take *data* in; whether the answer is complete."""
        if self._state == _LENGTH and not self._buffer:
            return self._body(data)
        self._buffer = self._buffer + data if self._buffer else data
        while True:
            state = self._state
            if state == _HEAD:
                if not self._head():
                    return False
            elif state == _LENGTH:
                data, self._buffer = self._buffer, b""
                return self._body(data)
            elif state == _UNTIL_CLOSE:
                data, self._buffer = self._buffer, b""
                self._take(data)
                return False
            elif state == _CHUNK_SIZE:
                if not self._chunk_size():
                    return False
            elif state == _CHUNK_DATA:
                if not self._chunk_data():
                    return False
            elif state == _TRAILERS:
                if not self._trailers():
                    return False
            else:
                return True

    def _line(self) -> bytes | None:
        """The next CRLF-terminated line of the buffer, taken off it; None if incomplete."""
        end = self._buffer.find(b"\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                raise MalformedAnswer("a line of the answer is too long")
            return None
        line = self._buffer[:end]
        self._buffer = self._buffer[end + 2 :]
        return line

    def _head(self) -> bool:
        buffer = self._buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD:
                raise MalformedAnswer(f"the answer's head is over {MAX_HEAD} bytes")
            return False
        lines = buffer[:end].split(b"\r\n")
        self._buffer = buffer[end + 4 :]
        version, _, rest = lines[0].partition(b" ")
        code = rest[:3]
        if (
            version not in (b"HTTP/1.1", b"HTTP/1.0")
            or len(code) != 3
            or not code.isdigit()
            or rest[3:4] not in (b"", b" ")
        ):
            raise MalformedAnswer(f"not an HTTP/1.x status line: {lines[0][:100]!r}")
        status = int(code)
        length: bytes | None = None
        chunked = False
        close = version != b"HTTP/1.1"
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name[-1:] in (b" ", b"\t") or line[:1] in (b" ", b"\t"):
                raise MalformedAnswer(f"not a header line: {line[:100]!r}")
            name = name.lower()
            if name == b"content-length":
                value = value.strip()
                if not value.isdigit() or (length is not None and value != length):
                    raise MalformedAnswer(f"a bad Content-Length: {value[:100]!r}")
                length = value
            elif name == b"transfer-encoding":
                if value.strip().lower() != b"chunked" or chunked:
                    raise MalformedAnswer(f"a Transfer-Encoding not read: {value[:100]!r}")
                chunked = True
            elif name == b"connection":
                close = close or b"close" in [t.strip() for t in value.lower().split(b",")]
        if 100 <= status < 200:
            if status == 101:
                raise MalformedAnswer("101 Switching Protocols was not asked for")
            return True  # an interim answer: the real one follows
        if chunked and length is not None:
            raise MalformedAnswer("both Content-Length and chunked")
        self._status = status
        if status in (204, 304):
            length = b"0"
        if chunked:
            self._state = _CHUNK_SIZE
            self._reusable = not close
        elif length is not None:
            self._left = int(length)
            if self._left > self.wire.max_body:
                raise BodyTooLarge(f"the answer is over {self.wire.max_body} bytes")
            self._state = _LENGTH if self._left else _DONE
            self._reusable = not close
        else:
            self._state = _UNTIL_CLOSE
            self._reusable = False
        return True

    def _take(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self.wire.max_body:
            raise BodyTooLarge(f"the answer is over {self.wire.max_body} bytes")
        self._chunks.append(data)

    def _body(self, data: bytes) -> bool:
        left = self._left
        if len(data) < left:
            self._chunks.append(data)
            self._left = left - len(data)
            return False
        self._chunks.append(data[:left])
        self._buffer = data[left:]
        self._left = 0
        self._state = _DONE
        return True

    def _chunk_size(self) -> bool:
        line = self._line()
        if line is None:
            return False
        size = line.partition(b";")[0].strip()
        if not size or size.translate(None, b"0123456789abcdefABCDEF"):
            raise MalformedAnswer(f"a bad chunk size: {line[:100]!r}")
        self._left = int(size, 16)
        if self._size + self._left > self.wire.max_body:
            raise BodyTooLarge(f"the answer is over {self.wire.max_body} bytes")
        self._state = _CHUNK_DATA if self._left else _TRAILERS
        return True

    def _chunk_data(self) -> bool:
        left = self._left
        if len(self._buffer) < left + 2:
            return False
        if self._buffer[left : left + 2] != b"\r\n":
            raise MalformedAnswer("a chunk is not followed by CRLF")
        self._take(self._buffer[:left])
        self._buffer = self._buffer[left + 2 :]
        self._state = _CHUNK_SIZE
        return True

    def _trailers(self) -> bool:
        while True:
            line = self._line()
            if line is None:
                return False
            if not line:
                self._state = _DONE
                return True

    # The end.

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        exchange, self.exchange = self.exchange, None
        if self.on_lost is not None:
            self.on_lost.callback(None)
        if exchange is None:
            self.instance.forget(self)
        elif self._state == _UNTIL_CLOSE:
            exchange.answered(self, ChatAnswer(self._status, b"".join(self._chunks)), False)
        else:
            exchange.lost(self, reason)


# --- one call ---------------------------------------------------------------------------------


class _Exchange:
    """One call: a pooled or a new connection, the request written, the answer awaited."""

    def __init__(self, wire: ChatWire, instance: _Instance, call: ChatCall, data: bytes) -> None:
        self.wire = wire
        self.instance = instance
        self.data = data
        self.retry_safe = call.retry_safe
        self.stale: Failure | None = None
        """Why the pooled connection was lost under the request, once it is made again."""
        self.connecting: Deferred[Any] | None = None
        self.connection: _Connection | None = None
        self.result: Deferred[ChatAnswer] = Deferred(self._cancel)

    def start(self) -> None:
        connection = self.instance.take()
        if connection is None:
            self._connect()
        else:
            self._on(connection)

    def _connect(self) -> None:
        connecting = self.connecting = self.wire.connect(self.instance)
        connecting.addCallbacks(self._connected, self._not_connected)

    def _connected(self, connection: _Connection) -> None:
        self.connecting = None
        self._on(connection)

    def _not_connected(self, failure: Failure) -> None:
        self.connecting = None
        if self.stale is None:
            self.result.errback(failure)
            return
        # The request went out on the stale connection and may have landed: whatever the new
        # one does, the call is not "never reached", nor cancelled "while connecting".
        if isinstance(failure.value, ConnectingCancelledError):
            failure = Failure(CancelledError())  # type: ignore[no-untyped-call]
        self.result.errback(ResponseNeverReceived([self.stale, failure]))  # type: ignore[no-untyped-call]

    def _on(self, connection: _Connection) -> None:
        self.connection = connection
        connection.start(self)

    def answered(self, connection: _Connection, answer: ChatAnswer, reusable: bool) -> None:
        self.connection = None
        if reusable:
            self.instance.put(connection)
        elif not connection.lost:
            connection.lost = True
            connection.transport.loseConnection()  # type: ignore[union-attr]
        self.result.callback(answer)

    def lost(self, connection: _Connection, reason: Failure) -> None:
        self.connection = None
        if not connection.received and connection.served and self.retry_safe and not self.stale:
            self.stale = reason  # a stale pooled connection: once more, on a new one
            self._connect()
            return
        reasons = [reason] if self.stale is None else [self.stale, reason]
        if connection.received:
            self.result.errback(ResponseFailed(reasons))  # type: ignore[no-untyped-call]
        else:
            self.result.errback(ResponseNeverReceived(reasons))  # type: ignore[no-untyped-call]

    def failed(self, error: Exception) -> None:
        self.connection = None
        self.result.errback(error)

    def _cancel(self, _: Deferred[ChatAnswer]) -> None:
        if self.connecting is not None:
            self.connecting.cancel()  # fails the call with ConnectingCancelledError
            return
        connection, self.connection = self.connection, None
        if connection is not None:
            received = connection.received
            connection.abandon()
            self.result.errback(_wrapped(CancelledError(), answered=received))


# --- the pool ---------------------------------------------------------------------------------


class _Instance:
    """An instance's pieces, made once, and its idle connections (most recent last)."""

    def __init__(self, wire: ChatWire, endpoint: ChatEndpoint) -> None:
        self.wire = wire
        self.endpoint = endpoint
        host = f"[{endpoint.host}]" if ":" in endpoint.host else endpoint.host
        self.after_target = b" HTTP/1.1\r\nHost: %s:%d\r\n" % (
            host.encode("ascii", "replace"),
            endpoint.port,
        )
        self.tcp = HostnameEndpoint(
            wire.reactor, endpoint.host, endpoint.port, timeout=wire.connect_timeout
        )
        self.idle: list[_Connection] = []
        self.retired = False

    def take(self) -> _Connection | None:
        idle = self.idle
        while idle:
            connection = idle.pop()
            if not connection.lost:
                return connection
        return None

    def put(self, connection: _Connection) -> None:
        if self.retired or self.wire.closed or len(self.idle) >= self.wire.max_idle:
            connection.lost = True
            connection.transport.loseConnection()  # type: ignore[union-attr]
            return
        connection.idle_since = self.wire.reactor.seconds()
        self.idle.append(connection)
        self.wire.sweep_later()

    def forget(self, connection: _Connection) -> None:
        if connection in self.idle:
            self.idle.remove(connection)


class _ConnectionFactory(Factory):
    noisy = False  # no "Starting/Stopping factory" line for every connection

    def __init__(self, wire: ChatWire, instance: _Instance) -> None:
        self.wire = wire
        self.instance = instance

    def buildProtocol(self, addr: object) -> _Connection:
        return _Connection(self.wire, self.instance)


class ChatWire:
    """HTTP/1.1 calls to chat instances over kept-alive connections (see the module
    docstring).

    *reactor* provides ``IReactorTCP`` and ``IReactorTime``. A connection attempt gives up
    after *connect_timeout* seconds; at most *max_idle* idle connections are kept per
    instance, none idle for more than *idle_timeout* seconds. With *tls* (the Connect
    policy), instances are called over TLS. ``close()`` closes the idle connections.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        connect_timeout: float,
        max_idle: int = 16,
        idle_timeout: float = 30.0,
        max_body: int = DEFAULT_MAX_BODY,
        tls: IPolicyForHTTPS | None = None,
    ) -> None:
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.max_body = max_body
        self.policy = tls
        self.closed = False
        self._instances: dict[ChatEndpoint, _Instance] = {}
        self._sweep: IDelayedCall | None = None

    @property
    def tls(self) -> bool:
        """Whether instances are called over TLS."""
        return self.policy is not None

    def exchange(self, endpoint: ChatEndpoint, call: ChatCall) -> Deferred[ChatAnswer]:
        """Send *call* to *endpoint*; fires with the whole answer (see the module docstring
        for how it fails). Cancelling it aborts the call's connection."""
        instance = self._instances.get(endpoint)
        if instance is None:
            instance = self._instance(endpoint)
        head = [call.method, b" ", call.target, instance.after_target]
        for name, value in call.headers:
            head += (name, b": ", _header_value(value), b"\r\n")
        if call.body is not None:
            head += (b"Content-Length: %d\r\n\r\n" % len(call.body), call.body)
        else:
            head.append(b"\r\n")
        exchange = _Exchange(self, instance, call, b"".join(head))
        exchange.start()
        return exchange.result

    def idle(self, endpoint: ChatEndpoint) -> int:
        """How many idle connections to *endpoint* are kept now."""
        instance = self._instances.get(endpoint)
        return 0 if instance is None else sum(not c.lost for c in instance.idle)

    def _instance(self, endpoint: ChatEndpoint) -> _Instance:
        if len(self._instances) >= _MAX_INSTANCES:
            for key, old in list(self._instances.items()):
                if not old.idle:
                    old.retired = True
                    del self._instances[key]
        instance = self._instances[endpoint] = _Instance(self, endpoint)
        return instance

    def connect(self, instance: _Instance) -> Deferred[_Connection]:
        """A new connection to *instance* (TLS with the policy's identity check if any)."""
        endpoint: IStreamClientEndpoint = instance.tcp
        if self.policy is not None:
            host = instance.endpoint.host
            creator = self.policy.creatorForNetloc(
                host.encode("ascii", "replace"), instance.endpoint.port
            )
            endpoint = wrapClientTLS(creator, endpoint)
        connecting: Deferred[Any] = endpoint.connect(_ConnectionFactory(self, instance))
        return connecting

    # Idle connections.

    def sweep_later(self) -> None:
        """Make sure a sweep of idle connections is due."""
        if self._sweep is None and not self.closed:
            self._sweep = self.reactor.callLater(self.idle_timeout, self._swept)

    def _swept(self) -> None:
        self._sweep = None
        now = self.reactor.seconds()
        oldest: float | None = None
        for instance in self._instances.values():
            keep = []
            for connection in instance.idle:
                if now - connection.idle_since >= self.idle_timeout:
                    connection.lost = True
                    connection.transport.loseConnection()  # type: ignore[union-attr]
                else:
                    keep.append(connection)
                    if oldest is None or connection.idle_since < oldest:
                        oldest = connection.idle_since
            instance.idle = keep
        if oldest is not None:
            self._sweep = self.reactor.callLater(
                max(0.0, oldest + self.idle_timeout - now), self._swept
            )

    def close(self) -> Deferred[None]:
        """Close the idle connections; fires when they are closed. Calls still in flight
        finish, and their connections are closed then."""
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        closing: list[Deferred[None]] = []
        for instance in self._instances.values():
            for connection in instance.idle:
                if connection.lost:
                    continue
                connection.on_lost = Deferred()
                closing.append(connection.on_lost)
                connection.lost = True
                connection.transport.loseConnection()  # type: ignore[union-attr]
            instance.idle = []
        if not closing:
            return succeed(None)
        return DeferredList(closing).addCallback(lambda _: None)
