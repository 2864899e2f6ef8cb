"""The monolith's client of the chat service: dialog calls spread over the chat instances.

:class:`ChatClient` implements :class:`~snet.server.gateway.ChatGateway`: each call asks the
:class:`~snet.server.roundrobin.RoundRobin` for the next instance and sends the request
(docs/chat-api.md) to it, with the caller's identity, request id and, for sends, idempotency
key. Every attempt's outcome goes to the balancer's passive health (``snet.server.ejection``),
which ejects instances that keep failing. What happens when an attempt goes wrong:

- **Not reached** (connection refused, connect timeout, no route, DNS, and with Connect an
  instance whose certificate is not the chat service's: ``identity``, the TLS handshake
  fails before any request byte is sent): the request never left, so it goes to the next
  instance at once, sends included. Such skips are free: they
  count neither as attempts (``max_attempts``) nor against the retry budget, since no chat
  process did any work (a refusing instance is also ejected at once, so they stay rare);
  each instance is still tried at most once per call, and the deadline bounds them. An
  ``identity`` failure ejects the instance at once too, and is logged with the SPIFFE id it
  presented; ``no_identity`` (this process has no certificate yet) is not held against the
  instance.
- **Reached but failed** (no full answer within the attempt's timeout, the connection lost
  mid-request, a 5xx, a body that is not JSON): retried on another instance. That is safe
  for every call this client makes: lists and unread reads change nothing a repeat would
  change twice, and a send carries the *same* ``Idempotency-Key`` on every attempt, so the
  chat service stores it once and answers a replay with the stored message (same status and
  body). Retries are bounded three ways (:class:`~snet.retry.RetryLimits`): at most
  ``max_attempts`` attempts that reached an instance, a :class:`~snet.retry.RetryBudget`
  shared by all calls (retries at most ``ratio`` of recent calls, plus a small reserve per
  second), and the call's deadline.
- **Deadline.** A call has ``deadline`` seconds end to end: no attempt starts after it, and
  each attempt's timeout is the smaller of ``timeout`` and the time left. An attempt that
  times out is cancelled (its connection is dropped, not left waiting). An attempt cut
  short by the deadline rather than by ``timeout`` is not held against the instance.
- When retries stop, the last :class:`ChatInstanceFailed` is raised (a 503 with
  ``Retry-After`` from the public API; it keeps the instance's status and body for logs);
  ``ChatUnavailable`` if no instance could be reached; ``NoChatInstance`` if none is listed.

Answers below 500 are passed on as :class:`~snet.server.gateway.ChatReply` (a 4xx body is the
chat service's JSON error, which the public API can relay); ``ChatReply.instance`` names the
instance that finally served (``X-Snet-Chat-Instance``).
"""

from __future__ import annotations

import json
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any

import treq.client
from attrs import frozen
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.error import (
    ConnectError,
    ConnectionDone,
    ConnectionLost,
    ConnectionRefusedError,
    DNSLookupError,
    TCPTimedOutError,
)
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.http_headers import Headers
from twisted.web.iweb import IPolicyForHTTPS, IResponse

from snet.connect import NoConnectIdentity, PeerIdentityError, identity_failure
from snet.httpcall import (
    WRAPPED,
    BodyTooLarge,
    TimedOut,
    cancelled,
    describe,
    read_body,
    while_connecting,
    within,
)
from snet.retry import RetryBudget, RetryLimits
from snet.server.chatwire import DEFAULT_MAX_BODY, ChatAnswer, ChatCall, ChatWire
from snet.server.discovery import ChatEndpoint
from snet.server.gateway import ChatGateway, ChatReply, ChatUnavailable
from snet.server.roundrobin import RoundRobin
from snet.server.sendbatch import BatchedSend, NotSent, ParsedAnswer, SendBatcher, Told

__all__ = [
    "MAX_BODY",
    "ChatCallMetrics",
    "ChatClient",
    "ChatInstanceFailed",
    "chat_http_client",
]

log = Logger()

MAX_BODY = DEFAULT_MAX_BODY
"""The largest answer body read from a chat instance, in bytes (a full page of 500 messages
of 4096 characters is well under it)."""

# The connection was there, then was lost before the whole answer came.
_LOST = (ConnectionLost, ConnectionDone, *WRAPPED)
# Failure reasons that say the request never got to the instance.
_NOT_REACHED = frozenset(
    {"refused", "connect_timeout", "connect_error", "identity", "no_identity", "not_sent"}
)


_NOT_REACHABLE = (
    "chat instance {instance} not reachable ({reason}: {error}) for {method} {path},"
    " request {request_id}"
)
_NOT_SENT = (
    "{method} {path} not sent to chat instance {instance}: it waited behind a call to it"
    " that did not end in time, request {request_id}"
)


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


_MAX_CACHED_INSTANCES = 1024
"""Instances whose per-instance pieces (metric children, base URL) are kept; past that many
(instances that came and went) the caches start again."""


# --- HTTP plumbing ----------------------------------------------------------------------------


def chat_http_client(
    reactor: Any,
    *,
    connect_timeout: float = 1.0,
    max_per_host: int = 16,
    tls: IPolicyForHTTPS | None = None,
) -> ChatWire:
    """The HTTP client the monolith calls the chat instances with
    (:class:`~snet.server.chatwire.ChatWire`).

    Connections are kept alive (at most *max_per_host* idle connections per instance) and a
    connection attempt gives up after *connect_timeout* seconds, so that an instance that
    cannot be reached is skipped quickly. *reactor* provides ``IReactorTCP`` and
    ``IReactorTime`` (the reactor). Close the client's connections with ``close()`` on
    shutdown. *tls* is the Connect policy (:class:`~snet.connect.ConnectPolicyForHTTPS`):
    instances are then called over TLS, their identity checked.
    """
    return ChatWire(reactor, connect_timeout=connect_timeout, max_idle=max_per_host, tls=tls)


@frozen
class _Request:
    method: str
    path: str
    call: ChatCall
    request_id: str
    send: BatchedSend | None = None
    """A send, as it may go in a batch (``snet.server.sendbatch``)."""

    @property
    def retry_safe(self) -> bool:
        """Whether the request may be sent again after it reached an instance: a read, or a
        write with an idempotency key (the chat service stores it once)."""
        return self.call.retry_safe


def _request(
    method: str,
    path: str,
    headers: tuple[tuple[bytes, bytes], ...],
    data: bytes | None,
    request_id: str,
    item: dict[str, Any] | None = None,
) -> _Request:
    retry_safe = method == "GET" or any(name == b"Idempotency-Key" for name, _ in headers)
    call = ChatCall(method.encode("ascii"), path.encode("ascii"), headers, data, retry_safe)
    send = None if item is None else BatchedSend(call, item)
    return _Request(method, path, call, request_id, send)


class _TreqExchange:
    """Chat calls through a treq client (an injected ``StubTreq`` in the unit tests), with
    ``http://`` or, with *tls*, ``https://`` URLs."""

    def __init__(self, http: treq.client.HTTPClient, tls: bool) -> None:
        self._http = http
        self._tls = tls
        self._bases: dict[ChatEndpoint, str] = {}
        """Each instance's ``scheme://host:port``, made once."""

    def _base(self, endpoint: ChatEndpoint) -> str:
        base = self._bases.get(endpoint)
        if base is None:
            if len(self._bases) >= _MAX_CACHED_INSTANCES:
                self._bases.clear()
            base = self._bases[endpoint] = endpoint.https_url if self._tls else endpoint.url
        return base

    def exchange(self, endpoint: ChatEndpoint, call: ChatCall) -> Deferred[ChatAnswer]:
        return Deferred.fromCoroutine(self._exchange(endpoint, call))

    async def _exchange(self, endpoint: ChatEndpoint, call: ChatCall) -> ChatAnswer:
        headers = Headers()
        for name, value in call.headers:
            headers.addRawHeader(name, value)
        response: IResponse = await self._http.request(
            call.method.decode("ascii"),
            self._base(endpoint) + call.target.decode("ascii"),
            headers=headers,
            data=call.body,
            unbuffered=True,
            allow_redirects=False,
        )
        body = await read_body(response, MAX_BODY)
        return ChatAnswer(response.code, body)


# --- metrics ----------------------------------------------------------------------------------


class ChatCallMetrics:
    """What the chat client counts (the names are in :class:`ChatClient`'s docstring).

    Exported in *registry*; without one the metrics are kept but exported nowhere, so that
    the client counts the same way whether or not anyone reads them. *budget* is the retry
    budget whose available retries the gauge reads.
    """

    def __init__(self, *, budget: RetryBudget, registry: CollectorRegistry | None = None) -> None:
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
        self._retries = Counter(
            "snet_chat_retries",
            "Attempts of a dialog call after its first, by why the one before failed",
            ["reason"],
            registry=registry,
        )
        self._denied = Counter(
            "snet_chat_retries_denied",
            "Dialog calls that failed although a retry was wanted, by what stopped it",
            ["cause"],
            registry=registry,
        )
        Gauge(
            "snet_chat_retry_budget_available",
            "Retries of dialog calls the retry budget allows now",
            registry=registry,
        ).set_function(budget.available)
        self._per_instance: dict[str, tuple[Any, Any]] = {}
        """Each instance's children of the attempt counter and the answer histogram, looked
        up once (``labels()`` takes a lock and builds a key on every call)."""

    def _children(self, instance: str) -> tuple[Any, Any]:
        children = self._per_instance.get(instance)
        if children is None:
            if len(self._per_instance) >= _MAX_CACHED_INSTANCES:
                self._per_instance.clear()
            children = self._per_instance[instance] = (
                self._requests.labels(instance=instance),
                self._seconds.labels(instance=instance),
            )
        return children

    def attempted(self, instance: str) -> None:
        """An attempt was sent to *instance*."""
        self._children(instance)[0].inc()

    def failed(self, instance: str, reason: str) -> None:
        """An attempt on *instance* failed for *reason*."""
        self._failures.labels(instance=instance, reason=reason).inc()

    def answered(self, instance: str, seconds: float) -> None:
        """*instance* answered an attempt after *seconds*."""
        self._children(instance)[1].observe(max(0.0, seconds))

    def retried(self, reason: str) -> None:
        """A call goes on to another instance after an attempt that failed for *reason*."""
        self._retries.labels(reason=reason).inc()

    def denied(self, cause: str) -> None:
        """A call failed although a retry was wanted: *cause* stopped it."""
        self._denied.labels(cause=cause).inc()


class _BatchCollector(Collector):
    def __init__(self, batcher: SendBatcher) -> None:
        self._batcher = batcher

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "snet_chat_send_batch_calls",
            "Batch calls of sends made to chat instances",
            self._batcher.batch_calls,
        )
        yield CounterMetricFamily(
            "snet_chat_sends_in_batch_calls",
            "Sends that went in those batch calls",
            self._batcher.batched_sends,
        )


# --- the client -------------------------------------------------------------------------------


class ChatClient:
    """The chat service behind a round-robin balancer (see the module docstring).

    *timeout* bounds each attempt on one instance, from connecting to the last byte of the
    answer: 2 s by default, which is hundreds of times what a chat call takes, yet finds a
    stopped (SIGSTOPped, swapped out, wedged) instance quickly enough to retry elsewhere
    within the call's *deadline* (10 s by default). *max_attempts* bounds the attempts of one
    call that reached an instance; *budget* (by default a :class:`~snet.retry.RetryBudget` on
    *clock*) bounds the retries of all calls together.

    *http* is the :class:`~snet.server.chatwire.ChatWire` of :func:`chat_http_client`, or a
    treq client (``StubTreq`` in tests). With *tls*, instances are called over TLS: a
    ``ChatWire`` then carries the Connect policy (``chat_http_client(...,
    tls=ConnectPolicyForHTTPS(...))``), a treq client is given ``https://`` URLs.

    *connect_timeout* is used only when *http* is not given: the client then makes its own
    with :func:`chat_http_client` (and *clock* must be the reactor), which ``close()``
    closes; an injected *http* belongs to the caller. With a *registry*, exports
    ``snet_chat_requests_total{instance}`` (attempts), ``snet_chat_request_failures_total
    {instance,reason}`` (reason: refused, connect_timeout, connect_error, identity,
    no_identity, not_sent, timeout, lost, server_error, bad_response),
    ``snet_chat_request_seconds{instance}`` (answered attempts),
    ``snet_chat_retries_total{reason}`` (attempts after the first of a call, by the reason
    the one before failed), ``snet_chat_retries_denied_total{cause}`` (calls that failed
    with a retry wanted but not allowed: attempts, budget, deadline, no_instance) and
    ``snet_chat_retry_budget_available`` (retries the budget allows now).

    With *batch_sends* (the default), the sends to an instance that come while a send call
    to it is out go together in one batch call when it ends (``snet.server.sendbatch``).
    Each is still an attempt of its own (a retry goes by itself), retried, counted and judged
    as above, except that a batch's failures count once against the instance's passive
    health, and that a send never sent (``not_sent``: its attempt's time ran out while it
    waited, which takes an attempt shorter than the batcher's 20 ms) goes to the next
    instance as one not reached. With a *registry*, ``snet_chat_send_batch_calls_total`` and
    ``snet_chat_sends_in_batch_calls_total`` count them.
    """

    def __init__(
        self,
        *,
        balancer: RoundRobin,
        http: ChatWire | treq.client.HTTPClient | None = None,
        clock: IReactorTime,
        timeout: float = 2.0,
        deadline: float = 10.0,
        max_attempts: int = 3,
        budget: RetryBudget | None = None,
        connect_timeout: float = 1.0,
        registry: CollectorRegistry | None = None,
        tls: bool = False,
        batch_sends: bool = True,
    ) -> None:
        self._retries = RetryLimits(
            clock=clock, max_attempts=max_attempts, deadline=deadline, budget=budget
        )
        self._balancer = balancer
        self._own_http: ChatWire | None = None
        if http is None:
            http = self._own_http = chat_http_client(clock, connect_timeout=connect_timeout)
        self._wire: ChatWire | _TreqExchange
        if isinstance(http, ChatWire):
            if http.tls != tls:
                raise ValueError(
                    "tls=True needs http=chat_http_client(..., tls=<the Connect policy>)"
                    if tls
                    else "http calls over TLS (it has a policy): pass tls=True"
                )
            self._wire = http
        else:
            self._wire = _TreqExchange(http, tls)
        self._sends = SendBatcher(self._wire, clock=clock) if batch_sends else None
        if registry is not None and self._sends is not None:
            registry.register(_BatchCollector(self._sends))
        self._clock = clock
        self._timeout = timeout
        self.budget = self._retries.budget
        self._metrics = ChatCallMetrics(budget=self.budget, registry=registry)

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
        headers += (
            (b"Idempotency-Key", idempotency_key.encode("utf-8")),
            (b"Content-Type", b"application/json"),
        )
        data = json.dumps({"text": text}, ensure_ascii=False).encode("utf-8")
        path = f"/v1/dialogs/{int(peer_id)}/messages"
        item = {
            "user_id": int(user_id),
            "peer_id": int(peer_id),
            "idempotency_key": idempotency_key,
            "text": text,
            "request_id": request_id,
        }
        return self._call(_request("POST", path, headers, data, request_id, item))

    def list(
        self, *, request_id: str, user_id: int, peer_id: int, after_id: int | None, limit: int
    ) -> Deferred[ChatReply]:
        """GET /v1/dialogs/{peer_id}/messages?after_id=&limit= as *user_id*."""
        query = f"limit={int(limit)}"
        if after_id is not None:
            query += f"&after_id={int(after_id)}"
        path = f"/v1/dialogs/{int(peer_id)}/messages?{query}"
        headers = self._headers(request_id, user_id)
        return self._call(_request("GET", path, headers, None, request_id))

    def unread(self, *, request_id: str, user_id: int) -> Deferred[ChatReply]:
        """GET /v1/unread as *user_id*."""
        headers = self._headers(request_id, user_id)
        return self._call(_request("GET", "/v1/unread", headers, None, request_id))

    # The work.

    @staticmethod
    def _headers(request_id: str, user_id: int) -> tuple[tuple[bytes, bytes], ...]:
        return (
            (b"X-Snet-User-Id", str(int(user_id)).encode("ascii")),
            (b"X-Request-ID", request_id.encode("utf-8")),
            (b"Accept", b"application/json"),
        )

    def _call(self, request: _Request) -> Deferred[ChatReply]:
        coroutine: Coroutine[Deferred[Any], Any, ChatReply] = self._call_in_turn(request)
        return Deferred.fromCoroutine(coroutine)

    async def _call_in_turn(self, request: _Request) -> ChatReply:
        first = self._balancer.next()  # raises NoChatInstance
        retries = self._retries.begin()
        endpoint = first
        tried: list[str] = []
        unreached: list[str] = []
        failure: ChatInstanceFailed | None = None
        while True:
            tried.append(endpoint.instance_id)
            try:
                reply = await self._attempt(
                    endpoint, request, retries.time_left(), retry=len(tried) > 1
                )
            except _NotReached as skipped:
                reason, reached = skipped.reason, False
                unreached.append(f"{endpoint.instance_id} ({reason})")
                if reason != "identity":  # _attempt_failed said more
                    log.warn(
                        _NOT_SENT if reason == "not_sent" else _NOT_REACHABLE,
                        instance=endpoint.instance_id,
                        reason=reason,
                        error=describe(skipped.error),
                        method=request.method,
                        path=request.path,
                        request_id=request.request_id,
                    )
            except ChatInstanceFailed as failed:
                reason, reached = failed.reason, True
                failure = failed
            else:
                self._rotated(first, endpoint)
                return reply
            stop = retries.stop(reached=reached, repeatable=request.retry_safe)
            following = None
            if stop is None:
                if (following := self._balancer.after(endpoint, tried)) is None:
                    stop = "no_instance"
                elif not retries.take(reached=reached):
                    stop = "budget"
            if stop is not None or following is None:
                self._rotated(first, endpoint)
                raise self._given_up(request, stop or "no_instance", tried, unreached, failure)
            self._metrics.retried(reason)
            log.info(
                "retrying {method} {path} on chat instance {next_instance} after {reason} on"
                " {instance}, request {request_id}",
                method=request.method,
                path=request.path,
                next_instance=following.instance_id,
                reason=reason,
                instance=endpoint.instance_id,
                request_id=request.request_id,
            )
            endpoint = following

    def _rotated(self, first: ChatEndpoint, last: ChatEndpoint) -> None:
        """The call that began on *first* ended on *last*: the rotation goes on after it."""
        if last is not first:
            self._balancer.skipped_to(first, last)

    def _given_up(
        self,
        request: _Request,
        cause: str,
        tried: Sequence[str],
        unreached: Sequence[str],
        failure: ChatInstanceFailed | None,
    ) -> ChatUnavailable:
        """The error a call ends with when no further attempt is made, logged and counted."""
        if cause != "unsafe":
            self._metrics.denied(cause)
        if failure is None:
            log.warn(
                "no chat instance reachable for {method} {path} ({cause}): {tried},"
                " request {request_id}",
                method=request.method,
                path=request.path,
                cause=cause,
                tried=", ".join(unreached),
                request_id=request.request_id,
            )
            return ChatUnavailable(
                f"no chat instance could be reached (tried {', '.join(unreached)})"
            )
        log.warn(
            "giving up {method} {path} after trying {tried} ({cause}): {error},"
            " request {request_id}",
            method=request.method,
            path=request.path,
            tried=", ".join(tried),
            cause=cause,
            error=str(failure),
            request_id=request.request_id,
        )
        return failure

    async def _attempt(
        self, endpoint: ChatEndpoint, request: _Request, left: float, *, retry: bool = False
    ) -> ChatReply:
        """One attempt on *endpoint*, given at most *left* seconds (the call's deadline); a
        send's *retry* goes by itself, never in a batch."""
        instance = endpoint.instance_id
        self._metrics.attempted(instance)
        started = self._clock.seconds()
        timeout = min(self._timeout, left)
        told = Told()
        if request.send is not None and self._sends is not None:
            call: Deferred[Any] = self._sends.exchange(endpoint, request.send, told, alone=retry)
        else:
            call = self._wire.exchange(endpoint, request.call)
        exchange = within(call, timeout, self._clock)
        try:
            answer = await exchange
        except TimedOut as timed_out:
            error = timed_out.cause
            if isinstance(error, NotSent):
                # It waited behind a call to the instance that did not end in time: never
                # sent, so the next instance at once; that call's own timeout tells on it.
                self._metrics.failed(instance, "not_sent")
                raise _NotReached("not_sent", error) from error
            reason = "connect_timeout" if while_connecting(error) else "timeout"
            self._metrics.failed(instance, reason)
            # Cut short by the call's deadline, not by its own timeout: not the instance's fault.
            if timeout >= self._timeout and told.first():
                self._balancer.failed(endpoint, reason)
            raise self._attempt_failed(endpoint, request, reason, error, str(timed_out)) from error
        except Exception as error:
            why = self._reason(error)
            if why is None:
                if cancelled(error):
                    raise CancelledError() from error
                raise
            self._metrics.failed(instance, why)
            # Not without a certificate of this process's own, nor twice for one batch.
            if why != "no_identity" and told.first():
                self._balancer.failed(endpoint, why)
            raise self._attempt_failed(endpoint, request, why, error, why) from error
        self._metrics.answered(instance, self._clock.seconds() - started)
        try:
            reply = self._reply(endpoint, request, answer)
        except ChatInstanceFailed as failed:
            if told.first():
                self._balancer.failed(endpoint, failed.reason)
            raise
        self._balancer.succeeded(endpoint)
        return reply

    def _attempt_failed(
        self,
        endpoint: ChatEndpoint,
        request: _Request,
        reason: str,
        error: BaseException,
        detail: str,
    ) -> Exception:
        """What an attempt that failed for *reason* with *error* ends with (logged)."""
        if reason == "identity":
            self._log_identity(endpoint, request, error)
        if reason in _NOT_REACHED:
            return _NotReached(reason, error)
        self._log_failure(endpoint, request, reason, describe(error))
        instance = endpoint.instance_id
        return ChatInstanceFailed(
            f"chat instance {instance} failed: {detail}", instance=instance, reason=reason
        )

    @staticmethod
    def _reason(error: BaseException) -> str | None:
        """Why an attempt failed (other than by its timeout), or None when the error is not
        about the instance (a bug, or the caller cancelled the call)."""
        if cancelled(error):
            return None
        wrong_identity = identity_failure(error)
        if isinstance(wrong_identity, NoConnectIdentity):
            return "no_identity"
        if wrong_identity is not None:
            return "identity"
        if isinstance(error, ConnectionRefusedError):
            return "refused"
        if isinstance(error, (ConnectTimeoutError, TCPTimedOutError)):
            return "connect_timeout"
        if isinstance(error, (ConnectError, DNSLookupError)):
            return "connect_error"
        if isinstance(error, _LOST):
            return "lost"
        if isinstance(error, BodyTooLarge):
            return "bad_response"
        return None

    def _reply(
        self, endpoint: ChatEndpoint, request: _Request, answer: ChatAnswer | ParsedAnswer
    ) -> ChatReply:
        instance = endpoint.instance_id
        if isinstance(answer, ParsedAnswer):  # out of a batch's answer, decoded already
            body, decoded = answer.document, answer.decoded
        else:
            try:
                body = json.loads(answer.body.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError):
                body = None
                decoded = False
            else:
                decoded = True
        if answer.status >= 500:
            self._metrics.failed(instance, "server_error")
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
            self._metrics.failed(instance, "bad_response")
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

    @staticmethod
    def _log_identity(endpoint: ChatEndpoint, request: _Request, error: BaseException) -> None:
        wrong = identity_failure(error)
        log.warn(
            "chat instance {instance} is not the chat service: it presented {found} where"
            " {expected} was expected; ejected, {method} {path} not sent to it, request"
            " {request_id}",
            instance=endpoint.instance_id,
            found=(wrong.found if isinstance(wrong, PeerIdentityError) else None)
            or "no valid certificate",
            expected=wrong.expected if isinstance(wrong, PeerIdentityError) else None,
            method=request.method,
            path=request.path,
            request_id=request.request_id,
        )

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
