"""HTTP plumbing shared by snet's Klein apps: request ids, JSON errors, JSON bodies, draining
and metrics.

An app built on it looks like this::

    class SomeAPI:
        app = Klein()

        @app.handle_errors(Exception)
        def _error(self, request: IRequest, failure: Failure) -> bytes:
            return error_response(request, failure)

        def resource(self) -> IResource:
            return ObservedResource(self.app.resource(), in_flight=..., metrics=..., clock=...)

``ObservedResource`` runs around every request, matched or not: it gives the request its id,
counts it in flight (for draining), and at its end records its metrics and logs it once.
Handlers raise ``ApiError`` subclasses for client and availability errors; everything else
becomes a logged 500 whose body never carries a traceback.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Mapping
from enum import IntEnum
from typing import Any, TypeVar, cast
from weakref import WeakKeyDictionary

import pymysql
import txredisapi
from attrs import define, field
from klein import Klein
from klein.interfaces import IKleinRequest
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from twisted.enterprise import adbapi
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import Site
from werkzeug.exceptions import HTTPException
from zope.interface import implementer

T = TypeVar("T")

log = Logger(namespace="snet.web")

# --- request ids and other client-given tokens ---------------------------------------------

TOKEN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
"""What a client-given request id or idempotency key may look like."""

REQUEST_ID_HEADER = b"X-Request-ID"

_request_ids: WeakKeyDictionary[IRequest, str] = WeakKeyDictionary()


def is_token(text: str) -> bool:
    """Whether *text* is 1 to 128 characters of ``[A-Za-z0-9._:-]``."""
    return TOKEN.fullmatch(text) is not None


def set_header(request: IRequest, name: bytes, value: bytes) -> None:
    """Set response header *name* (IRequest's methods carry no annotations)."""
    request.setHeader(name, value)  # type: ignore[no-untyped-call]


def set_status(request: IRequest, status: int) -> None:
    """Set the response status code."""
    request.setResponseCode(status)  # type: ignore[no-untyped-call]


def notify_finish(request: IRequest) -> Deferred[None]:
    """``request.notifyFinish()``: fires when the response is done, errbacks if the client
    went away first."""
    d: Deferred[None] = request.notifyFinish()  # type: ignore[attr-defined]
    return d


def header_text(request: IRequest, name: bytes) -> str | None:
    """The first value of header *name* as text, or None if absent or not ASCII (then "")."""
    raw: bytes | None = request.getHeader(name)  # type: ignore[no-untyped-call]
    if raw is None:
        return None
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return ""


def request_id(request: IRequest) -> str:
    """The id of *request*: the client's ``X-Request-ID`` if sane, else a new uuid4 hex.

    The first call decides it, remembers it on the request and sets it as a response header;
    later calls return the same id.
    """
    known = _request_ids.get(request)
    if known is not None:
        return known
    given = header_text(request, REQUEST_ID_HEADER)
    rid = given if given is not None and is_token(given) else uuid.uuid4().hex
    _request_ids[request] = rid
    set_header(request, REQUEST_ID_HEADER, rid.encode("ascii"))
    return rid


# --- errors ---------------------------------------------------------------------------------


class ErrorCode(IntEnum):
    """The ``code`` of JSON error bodies (an integer, as the public API has it): the HTTP
    status times 100, plus a number for the particular problem. One list for every app, so
    that codes never collide and the monolith can pass them on."""

    BAD_REQUEST = 40000
    INVALID_JSON = 40001
    BODY_TOO_LARGE = 40002
    UNSUPPORTED_CONTENT_TYPE = 40003
    INVALID_PARAMETER = 40004
    MISSING_HEADER = 40005
    INVALID_TEXT = 40006
    SELF_DIALOG = 40007
    INVALID_FIELD = 40008
    WRONG_PASSWORD = 40009
    NO_SUCH_USER = 40010
    SELF_FRIENDSHIP = 40011
    NO_SUCH_POST = 40012
    NOT_AUTHOR = 40013
    UNAUTHORIZED = 40100
    NOT_FOUND = 40400
    USER_NOT_FOUND = 40401
    METHOD_NOT_ALLOWED = 40500
    CONFLICT = 40900
    IDEMPOTENCY_KEY_REUSED = 40901
    INTERNAL = 50000
    UNAVAILABLE = 50300
    DRAINING = 50301
    MYSQL_UNAVAILABLE = 50302
    UNREAD_UNAVAILABLE = 50303
    NO_CHAT_INSTANCE = 50304
    CHAT_UNAVAILABLE = 50305


class ApiError(Exception):
    """An error the client is told about: an HTTP status, a message and a numeric code, plus
    any response *headers* it needs (such as ``WWW-Authenticate``)."""

    status: int = 500
    default_code: int = ErrorCode.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        retry_after: int | None = None,
        headers: Mapping[bytes, bytes] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = int(code if code is not None else self.default_code)
        self.retry_after = retry_after
        self.headers: dict[bytes, bytes] = dict(headers or {})


class BadRequest(ApiError):
    """The request is malformed or invalid (400); nothing was changed."""

    status = 400
    default_code = ErrorCode.BAD_REQUEST


class Unauthorized(ApiError):
    """No valid credentials (401): ``WWW-Authenticate: Bearer`` says which kind are wanted.

    With *invalid_token* (a token was given but is unknown or expired) the header carries
    ``error="invalid_token"``, as RFC 6750 has it.
    """

    status = 401
    default_code = ErrorCode.UNAUTHORIZED

    def __init__(self, message: str, *, code: int | None = None, invalid_token: bool = False):
        challenge = b'Bearer error="invalid_token"' if invalid_token else b"Bearer"
        super().__init__(message, code=code, headers={b"WWW-Authenticate": challenge})


class NotFound(ApiError):
    """There is no such thing (404)."""

    status = 404
    default_code = ErrorCode.NOT_FOUND


class Conflict(ApiError):
    """The request conflicts with what is stored (409)."""

    status = 409
    default_code = ErrorCode.CONFLICT


class Unavailable(ApiError):
    """A back end (MySQL, Redis) cannot be reached now (503); retry after ``retry_after`` s."""

    status = 503
    default_code = ErrorCode.UNAVAILABLE

    def __init__(self, message: str, *, code: int | None = None, retry_after: int = 1) -> None:
        super().__init__(message, code=code, retry_after=retry_after)


MYSQL_UNAVAILABLE_CODES = frozenset(
    {
        1040,  # too many connections
        1053,  # server shutdown in progress
        1205,  # lock wait timeout
        1213,  # deadlock, transaction rolled back
        1290,  # --read-only (a fail-over in progress)
        1927,  # connection killed
        4031,  # MySQL 8: disconnected by the server (idle)
    }
)
"""Server-side MySQL error numbers that mean "try again shortly"; all 2xxx (client) are too."""

CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    pymysql.err.InterfaceError,
    adbapi.ConnectionLost,
    error.ConnectionRefusedError,
    error.ConnectionLost,
    error.ConnectionDone,
    error.TimeoutError,
    defer.TimeoutError,
    TimeoutError,
    txredisapi.ConnectionError,
)
"""Exceptions that mean a back end is unreachable or too slow: answered 503."""


def is_unavailable(exc: BaseException) -> bool:
    """Whether *exc* says a back end cannot be reached now (rather than a bug)."""
    if isinstance(exc, pymysql.err.OperationalError):
        number = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
        return 2000 <= number < 3000 or number in MYSQL_UNAVAILABLE_CODES
    return isinstance(exc, CONNECTION_ERRORS)


def json_bytes(body: object) -> bytes:
    """*body* as compact UTF-8 JSON."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def json_response(request: IRequest, body: object, status: int = 200) -> bytes:
    """Set *status* and the JSON content type on *request* and return *body* encoded."""
    data = json_bytes(body)
    set_status(request, status)
    set_header(request, b"Content-Type", b"application/json")
    set_header(request, b"Content-Length", str(len(data)).encode("ascii"))
    return data


def error_body(request: IRequest, message: str, code: int) -> dict[str, object]:
    """The JSON body of every error answer (the public API's 5xx shape, used for 4xx too)."""
    return {"message": message, "request_id": request_id(request), "code": code}


def error_response(request: IRequest, failure: Failure) -> bytes:
    """Turn *failure* into a JSON error answer on *request*: the one place errors are mapped.

    ``ApiError`` keeps its status; routing errors (unknown path, wrong method) keep theirs;
    back-end connection errors become 503 with ``Retry-After: 1``; anything else is logged
    with its traceback and request id and answered 500 without any detail.
    """
    exc = failure.value
    assert exc is not None
    rid = request_id(request)
    if isinstance(exc, ApiError):
        api_error = exc
    elif isinstance(exc, HTTPException):
        response = exc.get_response({})
        for name, value in response.headers.items():
            if name.lower() in ("allow", "location"):
                set_header(request, name.encode("ascii"), value.encode("latin-1"))
        status = exc.code or 500
        api_error = ApiError(exc.description or exc.name, code=status * 100)
        api_error.status = status
    elif is_unavailable(exc):
        log.warn(
            "[{request_id}] back end unavailable: {error}",
            error=f"{type(exc).__name__}: {exc}",
            request_id=rid,
        )
        api_error = Unavailable("a back end is unavailable; retry shortly")
    else:
        log.failure("unhandled error answering {request_id}", failure, request_id=rid)
        api_error = ApiError("internal error")
    for header, header_value in api_error.headers.items():
        set_header(request, header, header_value)
    if api_error.retry_after is not None:
        set_header(request, b"Retry-After", str(api_error.retry_after).encode("ascii"))
    return json_response(
        request, error_body(request, api_error.message, api_error.code), api_error.status
    )


# --- request bodies and parameters ----------------------------------------------------------

MAX_JSON_BODY = 64 * 1024
"""The largest JSON body read_json_object accepts, in bytes."""


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def read_json_object(request: IRequest, *, limit: int = MAX_JSON_BODY) -> dict[str, Any]:
    """The request body as a JSON object.

    :raises BadRequest: if the content type is not JSON, the body is over *limit* bytes, is
        not UTF-8 JSON (``NaN`` and ``Infinity`` included), or is not an object.
    """
    content_type = (header_text(request, b"Content-Type") or "").split(";")[0].strip().lower()
    if content_type != "application/json":
        raise BadRequest(
            "the body must be JSON (Content-Type: application/json)",
            code=ErrorCode.UNSUPPORTED_CONTENT_TYPE,
        )
    content = request.content
    if content is None:
        raise BadRequest("the body must be a JSON object", code=ErrorCode.INVALID_JSON)
    content.seek(0)
    raw = content.read(limit + 1)
    if len(raw) > limit:
        raise BadRequest(f"the body is over {limit} bytes", code=ErrorCode.BODY_TOO_LARGE)
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest("the body is not valid JSON", code=ErrorCode.INVALID_JSON) from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", code=ErrorCode.INVALID_JSON)
    return body


ID = re.compile(r"[1-9][0-9]{0,18}")
MAX_ID = 2**63 - 1


def validate_text(value: object, max_length: int) -> str:
    """A ``text`` field (a message, a post): a string with something besides white space, at
    most *max_length* characters, encodable as UTF-8 (no lone surrogates). Kept as given."""
    if value is None:
        raise BadRequest("text is required", code=ErrorCode.INVALID_TEXT)
    if not isinstance(value, str):
        raise BadRequest("text must be a string", code=ErrorCode.INVALID_TEXT)
    if not value.strip():
        raise BadRequest("text must not be empty", code=ErrorCode.INVALID_TEXT)
    if len(value) > max_length:
        raise BadRequest(
            f"text must be at most {max_length} characters", code=ErrorCode.INVALID_TEXT
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("text must be valid Unicode", code=ErrorCode.INVALID_TEXT) from None
    return value


def parse_id(text: str | None, name: str) -> int:
    """A positive id below 2**63 written as plain decimal digits (no sign, zero, space).

    :raises BadRequest: naming *name* otherwise.
    """
    if text is None or ID.fullmatch(text) is None or int(text) > MAX_ID:
        raise BadRequest(
            f"{name} must be a positive integer below 2**63 in decimal digits",
            code=ErrorCode.INVALID_PARAMETER,
        )
    return int(text)


def query_arg(request: IRequest, name: str) -> str | None:
    """The first value of query argument *name* as text, or None if absent."""
    args: dict[bytes, list[bytes]] = request.args or {}
    values = args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        return ""


# --- draining -------------------------------------------------------------------------------


@define
class InFlight:
    """The requests being answered now, so that a stopping service can wait for them.

    ``begin(request)`` counts a request until it finishes (or its client goes away). After
    ``start_draining()`` every response says ``Connection: close`` and the connection is
    closed after it, so keep-alive clients move to another instance.
    """

    _requests: set[IRequest] = field(factory=set, init=False)
    _waiters: list[Deferred[int]] = field(factory=list, init=False)
    draining: bool = field(default=False, init=False)

    @property
    def count(self) -> int:
        """How many requests are in flight."""
        return len(self._requests)

    def begin(self, request: IRequest) -> None:
        """Count *request* until it finishes."""
        self._requests.add(request)
        if self.draining:
            _close_after(request)
        notify_finish(request).addBoth(self._end, request)

    def _end(self, result: object, request: IRequest) -> None:
        self._requests.discard(request)
        if not self._requests:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(0)

    def start_draining(self) -> None:
        """From now on, close every connection after its response."""
        self.draining = True
        for request in self._requests:
            _close_after(request)

    def drained(self, timeout: float, clock: IReactorTime) -> Deferred[int]:
        """Fire with 0 once no request is in flight, or after *timeout* seconds with the
        number still in flight (and log it)."""
        if not self._requests:
            return defer.succeed(0)
        waiter: Deferred[int] = Deferred()
        self._waiters.append(waiter)
        delayed: IDelayedCall | None = None

        def give_up() -> None:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                left = self.count
                log.warn(
                    "drain timed out after {timeout}s with {in_flight} requests in flight",
                    timeout=timeout,
                    in_flight=left,
                )
                waiter.callback(left)

        def cancel_timer(result: int) -> int:
            if delayed is not None and delayed.active():
                delayed.cancel()
            return result

        delayed = clock.callLater(timeout, give_up)
        waiter.addCallback(cancel_timer)
        return waiter


def _close_after(request: IRequest) -> None:
    """Say ``Connection: close`` on *request*'s response and close the connection after it."""
    if getattr(request, "startedWriting", False):
        return
    set_header(request, b"Connection", b"close")
    channel = getattr(request, "channel", None)
    if channel is not None and hasattr(channel, "persistent"):
        channel.persistent = False


# --- metrics --------------------------------------------------------------------------------

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


@define
class HTTPMetrics:
    """Prometheus metrics of one HTTP app, in a registry of its own.

    ``snet_http_requests_total{method,route,status}``, ``snet_http_request_seconds{route}``
    and ``snet_http_requests_in_flight``. Routes are route templates (``/v1/dialogs/<peer_id>
    /messages``), never raw paths, and unknown methods count as ``OTHER``, so that clients
    cannot blow up the number of series.
    """

    registry: CollectorRegistry = field(factory=CollectorRegistry)
    requests: Counter = field(init=False)
    seconds: Histogram = field(init=False)
    in_flight: Gauge = field(init=False)

    def __attrs_post_init__(self) -> None:
        self.requests = Counter(
            "snet_http_requests",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.seconds = Histogram(
            "snet_http_request_seconds",
            "Time to answer an HTTP request, by route template",
            ["route"],
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "snet_http_requests_in_flight",
            "HTTP requests being answered now",
            registry=self.registry,
        )

    def track(self, in_flight: InFlight) -> None:
        """Report *in_flight*'s count as the in-flight gauge."""
        self.in_flight.set_function(lambda: in_flight.count)

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        method = method.upper()
        if method not in KNOWN_METHODS:
            method = "OTHER"
        self.requests.labels(method=method, route=route, status=str(status)).inc()
        self.seconds.labels(route=route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# --- the wrapper every request goes through -------------------------------------------------

UNMATCHED_ROUTE = "<unmatched>"


def klein_route(request: IRequest) -> str:
    """The route template Klein matched for *request*, or ``<unmatched>``."""
    mapper = getattr(IKleinRequest(request), "mapper", None)
    if mapper is None:
        return UNMATCHED_ROUTE
    try:
        rule, _args = mapper.match(return_rule=True)
    except HTTPException:
        return UNMATCHED_ROUTE
    return str(rule.rule)


QUIET_ROUTES = frozenset({"/health", "/metrics"})
"""Routes whose successful requests are logged at debug level."""


@implementer(IResource)
@define
class ObservedResource:
    """Wraps an app's resource (a leaf, such as Klein's) so that every request gets its id,
    is counted in flight, and is measured and logged once when it ends."""

    wrapped: IResource
    in_flight: InFlight
    metrics: HTTPMetrics
    clock: IReactorTime
    route_of: Callable[[IRequest], str] = klein_route
    isLeaf: bool = field(default=True, init=False)

    def getChildWithDefault(self, name: bytes, request: IRequest) -> IResource:
        child: IResource = self.wrapped.getChildWithDefault(  # type: ignore[no-untyped-call]
            name, request
        )
        return child

    def putChild(self, path: bytes, child: IResource) -> None:
        raise NotImplementedError("ObservedResource has no children of its own")

    def render(self, request: IRequest) -> Any:
        rid = request_id(request)
        self.in_flight.begin(request)
        started = self.clock.seconds()
        method = request.method.decode("ascii", "replace")

        def finished(result: object) -> None:
            route = self.route_of(request)
            status = int(getattr(request, "code", 0) or 0)
            elapsed = max(0.0, self.clock.seconds() - started)
            self.metrics.observe(method, route, status, elapsed)
            ms = round(elapsed * 1000, 1)
            # Probes (Consul's health check every second, Prometheus scrapes) are logged at
            # debug level only, so that they do not drown the requests that matter.
            emit = log.debug if route in QUIET_ROUTES and status < 400 else log.info
            if isinstance(result, Failure):
                log.info(
                    "[{request_id}] {method} {route} client went away after {ms} ms",
                    method=method,
                    route=route,
                    status=status,
                    ms=ms,
                    request_id=rid,
                )
            else:
                emit(
                    "[{request_id}] {method} {route} {status} in {ms} ms",
                    method=method,
                    route=route,
                    status=status,
                    ms=ms,
                    request_id=rid,
                )

        notify_finish(request).addBoth(finished)
        return self.wrapped.render(request)  # type: ignore[no-untyped-call]


def uncancellable(d: Deferred[T]) -> Deferred[T]:
    """A Deferred with *d*'s result that can be cancelled without cancelling *d*.

    For work that must run to its end (a write and its compensation) even when the client
    that asked for it goes away and Klein cancels the handler.
    """
    outer: Deferred[T] = Deferred()

    def relay(result: T | Failure) -> None:
        if not outer.called:
            if isinstance(result, Failure):
                outer.errback(result)
            else:
                outer.callback(result)
        elif isinstance(result, Failure) and not result.check(  # type: ignore[no-untyped-call]
            defer.CancelledError
        ):
            log.failure("work finished after its request was cancelled", result)

    d.addBoth(relay)
    return outer


class QuietSite(Site):
    """A Site without Twisted's access log: ``ObservedResource`` logs every request once,
    with its request id, so a second line per request would only be noise."""

    noisy = False

    def log(self, request: Any) -> None:
        pass


HEALTH_TIMEOUT = 1.0
"""Seconds /health waits for MySQL's answer to ``SELECT 1``."""


class ServiceApp:
    """What the two services' Klein apps share: the in-flight tracker, the metrics, the
    version, the clock, and ``resource()``, the app wrapped so that every request gets an id,
    is counted in flight, measured and logged. A subclass has its own ``app = Klein()``."""

    app: Klein

    def __init__(
        self,
        *,
        in_flight: InFlight,
        metrics: HTTPMetrics,
        version: str,
        clock: IReactorTime | None = None,
        health_timeout: float = HEALTH_TIMEOUT,
    ) -> None:
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        self.in_flight = in_flight
        self.metrics = metrics
        self.version = version
        self.clock = clock
        self.health_timeout = health_timeout
        metrics.track(in_flight)

    def resource(self) -> IResource:
        """The app as a resource that a Site serves."""
        return ObservedResource(
            self.app.resource(), in_flight=self.in_flight, metrics=self.metrics, clock=self.clock
        )


async def health_response(
    request: IRequest,
    *,
    in_flight: InFlight,
    ping: Callable[[], Deferred[Any]],
    timeout: float,
    clock: IReactorTime,
    version: str,
) -> bytes:
    """``GET /health`` of either service: 200 only when the process can serve.

    503 (with Retry-After) while draining, or when MySQL does not answer ``ping()`` within
    *timeout* seconds; Consul's HTTP check and compose's healthcheck read this.
    """
    if in_flight.draining:
        return _unhealthy(
            request, version, "draining: this instance is stopping", ErrorCode.DRAINING
        )
    answer = ping()
    answer.addTimeout(timeout, clock)
    try:
        await answer
    except Exception as e:
        return _unhealthy(
            request,
            version,
            f"MySQL does not answer ({type(e).__name__})",
            ErrorCode.MYSQL_UNAVAILABLE,
        )
    return json_response(request, {"status": "ok", "version": version})


def _unhealthy(request: IRequest, version: str, message: str, code: int) -> bytes:
    set_header(request, b"Retry-After", b"1")
    body: dict[str, Any] = {"status": "unavailable", "version": version}
    body.update(error_body(request, message, code))
    return json_response(request, body, 503)


def metrics_response(request: IRequest, metrics: HTTPMetrics) -> bytes:
    """``GET /metrics`` of either service: the Prometheus text of *metrics*' registry."""
    body, content_type = metrics.render()
    set_header(request, b"Content-Type", content_type.encode("ascii"))
    return body
