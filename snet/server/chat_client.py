"""The monolith's client of the chat service: dialog calls spread over the chat instances.

:class:`ChatClient` implements :class:`~snet.server.gateway.ChatGateway`: each call asks the
:class:`~snet.server.balancer.RoundRobin` for the instances in rotation order and sends the
request (docs/chat-api.md) to the first one, with the caller's identity, request id and, for
sends, idempotency key. What happens when it goes wrong:

- The instance could not be reached at all (connection refused, connect timeout, no route,
  DNS): the request never left, so it goes to the next instance at once, sends included, and
  the rotation moves on to the instance that took it (``RoundRobin.skipped_to``), so that the
  calls go round the instances that answer.
- The request reached the instance but failed (no full answer within ``timeout``, the
  connection lost, a 5xx answer, a body that is not JSON): :class:`ChatInstanceFailed`, a
  :class:`~snet.server.gateway.ChatUnavailable`. Not retried in this version, even for reads:
  a later change retries sends with the same idempotency key.
- A 503 is treated as every other 5xx (it is not passed through as a reply): the public API
  answers 503 with ``Retry-After`` for all of them, and the exception keeps the instance's
  status and body for logs.
- Every instance unreachable: ``ChatUnavailable``; none listed: ``NoChatInstance``.

Answers below 500 are passed on as :class:`~snet.server.gateway.ChatReply` (a 4xx body is the
chat service's JSON error, which the public API can relay).
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from typing import Any

import treq.client
from attrs import frozen
from prometheus_client import CollectorRegistry, Counter, Histogram
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
    TCPTimedOutError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from snet.server.balancer import RoundRobin
from snet.server.discovery import ChatEndpoint
from snet.server.gateway import ChatGateway, ChatReply, ChatUnavailable

__all__ = [
    "MAX_BODY",
    "ChatClient",
    "ChatInstanceFailed",
    "PooledHTTPClient",
    "chat_http_client",
]

log = Logger()

MAX_BODY = 16 * 1024 * 1024
"""The largest answer body read from a chat instance, in bytes (a full page of 500 messages
of 4096 characters is well under it)."""

# Failures of an HTTP exchange that carry the underlying reasons as a list of Failures.
_WRAPPED = (ResponseFailed, ResponseNeverReceived, RequestTransmissionFailed)
# The connection was there, then was lost before the whole answer came.
_LOST = (ConnectionLost, ConnectionDone, *_WRAPPED)


class ChatInstanceFailed(ChatUnavailable):
    """A chat instance got the request but gave no usable answer.

    ``reason`` is ``timeout``, ``lost``, ``server_error`` (a 5xx; ``status`` and ``body`` say
    which) or ``bad_response``.
    """

    def __init__(
        self,
        message: str,
        *,
        instance: str,
        reason: str,
        status: int | None = None,
        body: Any = None,
    ) -> None:
        super().__init__(message)
        self.instance = instance
        self.reason = reason
        self.status = status
        self.body = body


class _NotReached(Exception):
    """The instance could not be reached: the request never got there."""

    def __init__(self, reason: str, error: BaseException) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


class _TooLarge(Exception):
    pass


# --- HTTP plumbing ----------------------------------------------------------------------------


class PooledHTTPClient(treq.client.HTTPClient):
    """A treq client over its own persistent connection pool; ``close()`` closes the pool."""

    def __init__(self, agent: Agent, pool: HTTPConnectionPool) -> None:
        super().__init__(agent)
        self.pool = pool

    def close(self) -> Deferred[None]:
        """Close the pool's idle connections; fires when they are closed."""
        closed: Deferred[None] = self.pool.closeCachedConnections()  # type: ignore[no-untyped-call]
        return closed


def chat_http_client(
    reactor: Any, *, connect_timeout: float = 1.0, max_per_host: int = 16
) -> PooledHTTPClient:
    """The treq client the monolith calls the chat instances with.

    Connections are kept alive (a persistent pool, at most *max_per_host* idle connections per
    instance) and a connection attempt gives up after *connect_timeout* seconds, so that an
    instance that cannot be reached is skipped quickly. *reactor* provides ``IReactorTCP`` and
    ``IReactorTime`` (the reactor). Close the client's pool with ``close()`` on shutdown.
    """
    pool = HTTPConnectionPool(reactor, persistent=True)  # type: ignore[no-untyped-call]
    pool.maxPersistentPerHost = max_per_host
    pool.retryAutomatically = True
    agent = Agent(reactor, connectTimeout=connect_timeout, pool=pool)  # type: ignore[no-untyped-call]
    return PooledHTTPClient(agent, pool)


class _BodyReader(Protocol):
    """Collects a response body up to a limit; cancelling it drops the connection."""

    def __init__(self, limit: int) -> None:
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = limit
        self.done: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _: Deferred[bytes]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self.done.errback(_TooLarge(f"the answer is over {self._limit} bytes"))
            if self.transport is not None:
                self.transport.stopProducing()  # type: ignore[attr-defined]
            return
        self._chunks.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if isinstance(reason.value, (ResponseDone, PotentialDataLoss)):
            self.done.callback(b"".join(self._chunks))
        else:
            self.done.errback(reason)


def _read_body(response: IResponse, limit: int) -> Deferred[bytes]:
    if response.length == 0:
        return succeed(b"")
    reader = _BodyReader(limit)
    response.deliverBody(reader)  # type: ignore[no-untyped-call]
    return reader.done


def _while_connecting(error: BaseException) -> bool:
    """Whether *error* says that the request was cancelled before it had a connection."""
    if isinstance(error, ConnectingCancelledError):
        return True
    if isinstance(error, _WRAPPED):
        return any(r.value is not None and _while_connecting(r.value) for r in error.reasons)
    return False


def _cancelled(error: BaseException) -> bool:
    if isinstance(error, (CancelledError, ConnectingCancelledError)):
        return True
    if isinstance(error, _WRAPPED):
        return any(r.value is not None and _cancelled(r.value) for r in error.reasons)
    return False


def _describe(error: BaseException) -> str:
    if isinstance(error, _WRAPPED):
        reasons = ", ".join(r.getErrorMessage() for r in error.reasons)
        return f"{type(error).__name__}({reasons})"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


@frozen
class _Request:
    method: str
    path: str
    headers: Headers
    data: bytes | None
    request_id: str


@frozen
class _Answer:
    status: int
    body: bytes


# --- the client -------------------------------------------------------------------------------


class ChatClient:
    """The chat service behind a round-robin balancer (see the module docstring).

    *timeout* bounds each attempt on one instance, from connecting to the last byte of the
    answer. *connect_timeout* is used only when *http* is not given: the client then makes
    its own with :func:`chat_http_client` (and *clock* must be the reactor), which ``close()``
    closes; an injected *http* belongs to the caller. With a *registry*, exports
    ``snet_chat_requests_total{instance}`` (attempts), ``snet_chat_request_failures_total
    {instance,reason}`` (reason: refused, connect_timeout, connect_error, timeout, lost,
    server_error, bad_response) and ``snet_chat_request_seconds{instance}`` (answered
    attempts).
    """

    def __init__(
        self,
        *,
        balancer: RoundRobin,
        http: treq.client.HTTPClient | None = None,
        clock: IReactorTime,
        timeout: float = 5.0,
        connect_timeout: float = 1.0,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._balancer = balancer
        self._own_http: PooledHTTPClient | None = None
        if http is None:
            http = self._own_http = chat_http_client(clock, connect_timeout=connect_timeout)
        self._http = http
        self._clock = clock
        self._timeout = timeout
        self._requests: Counter | None = None
        self._failures: Counter | None = None
        self._seconds: Histogram | None = None
        if registry is not None:
            self._requests = Counter(
                "snet_chat_requests",
                "Requests sent to chat instances (each instance tried counts)",
                ["instance"],
                registry=registry,
            )
            self._failures = Counter(
                "snet_chat_request_failures",
                "Requests to chat instances that failed, by reason",
                ["instance", "reason"],
                registry=registry,
            )
            self._seconds = Histogram(
                "snet_chat_request_seconds",
                "Time for a chat instance to answer a request",
                ["instance"],
                registry=registry,
            )

    def close(self) -> Deferred[None]:
        """Close the connection pool if this client made it (else the caller owns *http*)."""
        if self._own_http is None:
            return succeed(None)
        return self._own_http.close()

    # ChatGateway.

    def send(
        self, *, request_id: str, user_id: int, peer_id: int, text: str, idempotency_key: str
    ) -> Deferred[ChatReply]:
        """POST /v1/dialogs/{peer_id}/messages as *user_id*."""
        headers = self._headers(request_id, user_id)
        headers.setRawHeaders(b"Idempotency-Key", [idempotency_key.encode("utf-8")])
        headers.setRawHeaders(b"Content-Type", [b"application/json"])
        data = json.dumps({"text": text}, ensure_ascii=False).encode("utf-8")
        path = f"/v1/dialogs/{int(peer_id)}/messages"
        return self._call(_Request("POST", path, headers, data, request_id))

    def list(
        self, *, request_id: str, user_id: int, peer_id: int, after_id: int | None, limit: int
    ) -> Deferred[ChatReply]:
        """GET /v1/dialogs/{peer_id}/messages?after_id=&limit= as *user_id*."""
        query = f"limit={int(limit)}"
        if after_id is not None:
            query += f"&after_id={int(after_id)}"
        path = f"/v1/dialogs/{int(peer_id)}/messages?{query}"
        return self._call(
            _Request("GET", path, self._headers(request_id, user_id), None, request_id)
        )

    def unread(self, *, request_id: str, user_id: int) -> Deferred[ChatReply]:
        """GET /v1/unread as *user_id*."""
        headers = self._headers(request_id, user_id)
        return self._call(_Request("GET", "/v1/unread", headers, None, request_id))

    # The work.

    @staticmethod
    def _headers(request_id: str, user_id: int) -> Headers:
        return Headers(
            {
                b"X-Snet-User-Id": [str(int(user_id)).encode("ascii")],
                b"X-Request-ID": [request_id.encode("utf-8")],
                b"Accept": [b"application/json"],
            }
        )

    def _call(self, request: _Request) -> Deferred[ChatReply]:
        coroutine: Coroutine[Deferred[Any], Any, ChatReply] = self._try_in_turn(request)
        return Deferred.fromCoroutine(coroutine)

    async def _try_in_turn(self, request: _Request) -> ChatReply:
        candidates = self._balancer.candidates()  # raises NoChatInstance
        unreached: list[str] = []
        for endpoint in candidates:
            try:
                reply = await self._attempt(endpoint, request)
            except ChatInstanceFailed:
                if endpoint is not candidates[0]:
                    self._balancer.skipped_to(candidates[0], endpoint)
                raise
            except _NotReached as skipped:
                unreached.append(f"{endpoint.instance_id} ({skipped.reason})")
                log.warn(
                    "chat instance {instance} not reachable ({reason}: {error}) for {method}"
                    " {path}; trying the next one, request {request_id}",
                    instance=endpoint.instance_id,
                    reason=skipped.reason,
                    error=_describe(skipped.error),
                    method=request.method,
                    path=request.path,
                    request_id=request.request_id,
                )
            else:
                if endpoint is not candidates[0]:
                    self._balancer.skipped_to(candidates[0], endpoint)
                return reply
        log.warn(
            "no chat instance reachable for {method} {path}: {tried}, request {request_id}",
            method=request.method,
            path=request.path,
            tried=", ".join(unreached),
            request_id=request.request_id,
        )
        raise ChatUnavailable(f"no chat instance could be reached (tried {', '.join(unreached)})")

    async def _exchange(self, endpoint: ChatEndpoint, request: _Request) -> _Answer:
        response: IResponse = await self._http.request(
            request.method,
            endpoint.url + request.path,
            headers=request.headers,
            data=request.data,
            unbuffered=True,
            allow_redirects=False,
        )
        body = await _read_body(response, MAX_BODY)
        return _Answer(response.code, body)

    async def _attempt(self, endpoint: ChatEndpoint, request: _Request) -> ChatReply:
        instance = endpoint.instance_id
        if self._requests is not None:
            self._requests.labels(instance=instance).inc()
        started = self._clock.seconds()
        timed_out = False
        exchange = Deferred.fromCoroutine(self._exchange(endpoint, request))

        def give_up() -> None:
            nonlocal timed_out
            timed_out = True
            exchange.cancel()

        timer: IDelayedCall = self._clock.callLater(self._timeout, give_up)
        try:
            answer = await exchange
        except Exception as error:
            reason = self._reason(error, timed_out)
            if reason is None:
                if _cancelled(error):
                    raise CancelledError() from error
                raise
            self._count_failure(instance, reason)
            if reason in ("refused", "connect_timeout", "connect_error"):
                raise _NotReached(reason, error) from error
            self._log_failure(endpoint, request, reason, _describe(error))
            detail = f"no answer within {self._timeout:g}s" if reason == "timeout" else reason
            raise ChatInstanceFailed(
                f"chat instance {instance} failed: {detail}", instance=instance, reason=reason
            ) from error
        finally:
            if timer.active():
                timer.cancel()
        if self._seconds is not None:
            self._seconds.labels(instance=instance).observe(
                max(0.0, self._clock.seconds() - started)
            )
        return self._reply(endpoint, request, answer)

    @staticmethod
    def _reason(error: BaseException, timed_out: bool) -> str | None:
        """Why an attempt failed, or None when the error is not about the instance (a bug, or
        the caller cancelled the call)."""
        if timed_out:
            return "connect_timeout" if _while_connecting(error) else "timeout"
        if _cancelled(error):
            return None
        if isinstance(error, ConnectionRefusedError):
            return "refused"
        if isinstance(error, (ConnectTimeoutError, TCPTimedOutError)):
            return "connect_timeout"
        if isinstance(error, (ConnectError, DNSLookupError)):
            return "connect_error"
        if isinstance(error, _LOST):
            return "lost"
        if isinstance(error, _TooLarge):
            return "bad_response"
        return None

    def _reply(self, endpoint: ChatEndpoint, request: _Request, answer: _Answer) -> ChatReply:
        instance = endpoint.instance_id
        try:
            body = json.loads(answer.body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            body = None
            decoded = False
        else:
            decoded = True
        if answer.status >= 500:
            self._count_failure(instance, "server_error")
            message = body.get("message") if isinstance(body, dict) else None
            self._log_failure(endpoint, request, "server_error", f"{answer.status} {message}")
            raise ChatInstanceFailed(
                f"chat instance {instance} answered {answer.status}",
                instance=instance,
                reason="server_error",
                status=answer.status,
                body=body,
            )
        if not decoded:
            self._count_failure(instance, "bad_response")
            self._log_failure(
                endpoint, request, "bad_response", f"{answer.status} with a body that is not JSON"
            )
            raise ChatInstanceFailed(
                f"chat instance {instance} answered {answer.status} without JSON",
                instance=instance,
                reason="bad_response",
                status=answer.status,
            )
        return ChatReply(answer.status, body, instance)

    def _count_failure(self, instance: str, reason: str) -> None:
        if self._failures is not None:
            self._failures.labels(instance=instance, reason=reason).inc()

    def _log_failure(
        self, endpoint: ChatEndpoint, request: _Request, reason: str, error: str
    ) -> None:
        log.warn(
            "chat instance {instance} failed {method} {path} ({reason}: {error}),"
            " request {request_id}",
            instance=endpoint.instance_id,
            method=request.method,
            path=request.path,
            reason=reason,
            error=error,
            request_id=request.request_id,
        )


def _is_a_chat_gateway(client: ChatClient) -> ChatGateway:
    """Never called: mypy checks here that ChatClient has ChatGateway's methods."""
    return client
