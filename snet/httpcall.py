"""A bounded, timed HTTP call with treq: the plumbing every HTTP client of snet shares.

The Consul client (:mod:`snet.consul`) and the monolith's chat client
(:mod:`snet.server.chat_client`) share the timeout, body and failure helpers, and the Consul
client the pooled treq client:

- **The client.** :func:`pooled_http_client` makes a treq client over a persistent connection
  pool of its own whose connection attempts give up after a timeout; its ``close()`` closes
  the pool (call it on shutdown, or tests see a dirty reactor). Its ``request`` is treq's,
  with the plain case taken straight to Twisted's agent (:meth:`PooledHTTPClient.request`):
  the Consul client's calls skip the machinery they never use. (The monolith's chat calls,
  made many times a second, have a client of their own: :mod:`snet.server.chatwire`.)
- **The body.** :func:`read_body` reads a response body, up to a size limit when given one
  (:class:`BodyTooLarge` past it, and the connection is dropped); cancelling it drops the
  connection too.
- **The timeout.** :func:`within` bounds a call's Deferred by a timeout on an injected clock:
  when the time is up the call is cancelled (its connection dropped, not left waiting) and
  fails with :class:`TimedOut`, which keeps what the cancelled call failed with. Any other
  outcome, a cancellation by the caller included, passes through unchanged.
- **The failures.** An HTTP exchange that fails wraps its reasons (``ResponseFailed`` and its
  kin, :data:`WRAPPED`); :func:`cancelled` and :func:`while_connecting` look inside them, and
  :func:`describe` names a failure, its wrapped reasons included, for a log line.

What a failure *means* (an outage, an instance to skip or to retry elsewhere) is each
client's business, not this module's.
"""

from __future__ import annotations

from typing import Any, TypeVar

import treq.client
from treq.response import _Response
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IPolicyForHTTPS, IResponse
from zope.interface import implementer

__all__ = [
    "WRAPPED",
    "BodyTooLarge",
    "BytesProducer",
    "PooledHTTPClient",
    "TimedOut",
    "cancelled",
    "describe",
    "pooled_http_client",
    "read_body",
    "while_connecting",
    "within",
]

_T = TypeVar("_T")

WRAPPED = (ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed)
"""Failures of an HTTP exchange that carry the underlying reasons as a list of Failures."""


# --- the client -------------------------------------------------------------------------------


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written whole as soon as the request is sent (treq's
    default producer for bytes hands them to a cooperator task, a reactor turn later)."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.body)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


_PLAIN_OPTIONS = frozenset({"headers", "data", "unbuffered", "allow_redirects"})


def _plain_url(url: object) -> bool:
    return isinstance(url, str) and url.isascii() and url.isprintable() and " " not in url


class PooledHTTPClient(treq.client.HTTPClient):
    """A treq client over its own persistent connection pool; ``close()`` closes the pool."""

    def __init__(self, agent: Any, pool: HTTPConnectionPool | None) -> None:
        super().__init__(agent)
        self.pool = pool
        self.agent = agent

    def request(self, method: str, url: Any, **kwargs: Any) -> Deferred[Any]:
        """treq's ``request``; the plain case goes straight to the agent.

        Plain: an ASCII ``str`` URL (already encoded: no IRI to turn into a URI), ``headers``
        as ``Headers`` or None, ``data`` as bytes or None, ``unbuffered=True`` and
        ``allow_redirects=False``, and nothing else. It answers what treq answers (treq's
        response over Twisted's) without treq's per-call URL parsing, cookie jar, gzip
        agent, and cooperator-driven body producer; anything else is treq's own path.
        """
        headers, data = kwargs.get("headers"), kwargs.get("data")
        if (
            kwargs.keys() <= _PLAIN_OPTIONS
            and kwargs.get("unbuffered") is True
            and kwargs.get("allow_redirects") is False
            and (headers is None or isinstance(headers, Headers))
            and (data is None or isinstance(data, bytes))
            and _plain_url(url)
        ):
            return self._direct(method, url, headers, data)
        d: Deferred[Any] = super().request(method, url, **kwargs)
        return d

    def _direct(
        self, method: str, url: str, headers: Headers | None, data: bytes | None
    ) -> Deferred[Any]:
        d: Deferred[IResponse] = self.agent.request(
            method.encode("ascii").upper(),
            url.encode("ascii"),
            headers,
            BytesProducer(data) if data is not None else None,
        )
        return d.addCallback(_Response, self._cookiejar)

    def close(self) -> Deferred[None]:
        """Close the pool's idle connections; fires when they are closed."""
        if self.pool is None:
            return succeed(None)
        closed: Deferred[None] = self.pool.closeCachedConnections()  # type: ignore[no-untyped-call]
        return closed


def pooled_http_client(
    reactor: Any,
    *,
    connect_timeout: float,
    max_per_host: int | None = None,
    tls: IPolicyForHTTPS | None = None,
) -> PooledHTTPClient:
    """A treq client that keeps its connections alive and bounds connecting.

    The pool is persistent (at most *max_per_host* idle connections per host; Twisted's
    default of 2 when not given) and retries a request once on a fresh connection when a
    pooled one turns out to be closed; a connection attempt gives up after *connect_timeout*
    seconds. *reactor* provides ``IReactorTCP`` and ``IReactorTime``. *tls* is the policy for
    ``https://`` URLs (Twisted's default, web PKI with host names, when not given).
    """
    pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
    if max_per_host is not None:
        pool.maxPersistentPerHost = max_per_host
    pool.retryAutomatically = True
    agent = Agent(  # type: ignore[no-untyped-call]
        reactor,
        contextFactory=tls or BrowserLikePolicyForHTTPS(),  # type: ignore[no-untyped-call]
        connectTimeout=connect_timeout,
        pool=pool,
    )
    return PooledHTTPClient(agent, pool)


# --- the body ---------------------------------------------------------------------------------


class BodyTooLarge(Exception):
    """A response body was longer than the limit it was read with."""


class _BodyReader(Protocol):
    """Collects a response body, up to *limit* bytes if given; cancelling it drops the
    connection."""

    def __init__(self, limit: int | None) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[bytes]) -> None:
        self._drop()

    def _drop(self) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._limit is not None and self._size > self._limit:
            self.done.errback(BodyTooLarge(f"the answer is over {self._limit} bytes"))
            self._drop()
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


def read_body(response: IResponse, limit: int | None = None) -> Deferred[bytes]:
    """The whole body of *response*; fails with :class:`BodyTooLarge` past *limit* bytes.

    A body cut short by a lost connection fails with the reason (``ResponseFailed``);
    cancelling the Deferred drops the connection.
    """
    if response.length == 0:
        return succeed(b"")
    reader = _BodyReader(limit)
    response.deliverBody(reader)  # type: ignore[no-untyped-call]
    return reader.done


# --- the timeout ------------------------------------------------------------------------------


class TimedOut(Exception):
    """A call got no full answer within its timeout and was cancelled.

    ``timeout`` is the timeout in seconds; ``cause`` what the cancelled call failed with (a
    ``CancelledError``, or an HTTP failure that wraps one: :func:`while_connecting` tells
    whether it was still connecting).
    """

    def __init__(self, timeout: float, cause: BaseException) -> None:
        super().__init__(f"no answer within {timeout:g}s")
        self.timeout = timeout
        self.cause = cause


def _timed_out(result: _T | Failure, timeout: float) -> _T:
    if isinstance(result, Failure):
        cause = result.value if result.value is not None else CancelledError()
        raise TimedOut(timeout, cause) from cause
    return result  # it answered as it was being cancelled: the answer stands


def within(call: Deferred[_T], timeout: float, clock: IReactorTime) -> Deferred[_T]:
    """Bound *call* by *timeout* seconds on *clock*; returns *call*.

    When the time is up, *call* is cancelled and fails with :class:`TimedOut`; the timer is
    cancelled as soon as *call* has a result, so none is left behind. Callbacks added before
    this one run within the timeout (add the body reading first so that it counts).
    """
    bounded: Deferred[_T] = call.addTimeout(timeout, clock, onTimeoutCancel=_timed_out)
    return bounded


# --- the failures -----------------------------------------------------------------------------


def _found(error: BaseException, kinds: tuple[type[BaseException], ...]) -> bool:
    """Whether *error*, or a reason it wraps however deep, is one of *kinds*."""
    if isinstance(error, kinds):
        return True
    if isinstance(error, WRAPPED):
        return any(r.value is not None and _found(r.value, kinds) for r in error.reasons)
    return False


def cancelled(error: BaseException) -> bool:
    """Whether *error* says that the request was cancelled, however deep the agent wrapped it."""
    return _found(error, (CancelledError, ConnectingCancelledError))


def while_connecting(error: BaseException) -> bool:
    """Whether *error* says that the request was cancelled before it had a connection."""
    return _found(error, (ConnectingCancelledError,))


def describe(error: BaseException) -> str:
    """``Type: message`` for a log line; a wrapped HTTP failure names its reasons."""
    if isinstance(error, WRAPPED):
        reasons = ", ".join(r.getErrorMessage() for r in error.reasons)
        return f"{type(error).__name__}({reasons})"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
