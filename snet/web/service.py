"""What both services' Klein apps are built on: ``ServiceApp`` (in-flight tracking, metrics,
version, clock and ``resource()``), ``ObservedResource`` (the wrapper every request goes
through: its id, in-flight count, metrics and one log line), ``GET /health`` and
``GET /metrics``, and ``uncancellable`` for work that must outlive its request.
"""

from __future__ import annotations

from collections.abc import Callable
from inspect import iscoroutine
from typing import Any, ClassVar, TypeVar, cast
from weakref import WeakKeyDictionary

from attrs import define, field
from klein import Klein, KleinRenderable
from klein.interfaces import IKleinRequest
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.server import NOT_DONE_YET
from werkzeug.exceptions import BadHost, HTTPException
from werkzeug.routing import Rule
from zope.interface import implementer

from snet.jsonlog import LevelFilteredLogger
from snet.web.direct import DirectRoute, DirectRoutes
from snet.web.draining import InFlight
from snet.web.errors import BadRequest, ErrorCode, NotFound, error_body, error_response
from snet.web.metrics import HTTPMetrics
from snet.web.requests import json_response, notify_finish, request_id, set_header

T = TypeVar("T")

log = LevelFilteredLogger(namespace="snet.web")
"""Below ``SNET_LOG_LEVEL`` (default info) events are dropped before they are formatted: the
probes' debug lines cost nothing unless asked for."""

UNMATCHED_ROUTE = "<unmatched>"


_ran: WeakKeyDictionary[IRequest, Rule] = WeakKeyDictionary()
"""The route each request ran (``RoutedKlein``), while the request lives."""


class RoutedKlein(Klein):
    """A Klein app that remembers, for ``klein_route``, the route each request ran: Klein
    matched it once already, and matching it again at the request's end cost the monolith,
    with its many routes, about 3 % of its CPU."""

    def execute_endpoint(
        self, endpoint: str, request: IRequest, *args: Any, **kwargs: Any
    ) -> KleinRenderable:
        rules = list(self.url_map.iter_rules(endpoint))
        if len(rules) == 1:  # else (one handler under several routes) klein_route matches
            _ran[request] = rules[0]
        return super().execute_endpoint(endpoint, request, *args, **kwargs)


def klein_route(request: IRequest) -> str:
    """The route template Klein matched for *request*, or ``<unmatched>``; for an app mounted
    under a path of another (the monolith's pages under ``/web``), that path and its route."""
    mapper = getattr(IKleinRequest(request), "mapper", None)
    if mapper is None:
        return UNMATCHED_ROUTE
    rule = _ran.get(request)
    if rule is None or rule.map is not mapper.map:  # none, or an outer app's (a mount)
        try:
            rule, _args = mapper.match(return_rule=True)
        except HTTPException:
            return UNMATCHED_ROUTE
    mounted_at = str(getattr(mapper, "script_name", "") or "").rstrip("/")
    return mounted_at + str(rule.rule)


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
    direct: DirectRoutes = field(factory=DirectRoutes.none)
    """Routes run here without Klein (snet.web.direct)."""
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
        direct = self.direct.match(request.method, request.path)
        handled: Deferred[None] | None = None
        ended: list[bool] = [False]

        def finished(result: object) -> None:
            ended[0] = True
            if isinstance(result, Failure) and handled is not None:
                handled.cancel()  # the client went away: as Klein does
            route = direct[0].template if direct is not None else self.route_of(request)
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
        if direct is None:
            # What Klein refuses before it routes, answered as any bad input is.
            undecodable = _not_utf8(request)
            if undecodable is not None:  # Klein: a plain-text 400 and a logged traceback
                return _bad_request(request, f"the {undecodable} is not UTF-8")
            try:
                return self.wrapped.render(request)  # type: ignore[no-untyped-call]
            except BadHost:
                # Klein binds werkzeug's map to the Host header's name, IDNA-encoded: a name
                # with an empty or overlong label cannot be (Klein's answer was a bare 500).
                return _bad_request(request, "the Host header is not a host name")
        handled = self._run_direct(request, direct[0], direct[1], lambda: ended[0])
        return NOT_DONE_YET

    def _run_direct(
        self,
        request: IRequest,
        route: DirectRoute,
        arguments: dict[str, str],
        gone: Callable[[], bool],
    ) -> Deferred[None]:
        """Call *route*'s handler as Klein would, and write its answer, or its failure's as
        the app's error handler gives it, unless the request has ended (*gone*: its client
        went away)."""
        try:
            result = route.handler(request, **arguments)
        except Exception:
            answer: Deferred[Any] = defer.fail()
        else:
            if iscoroutine(result):
                answer = Deferred.fromCoroutine(result)
            elif isinstance(result, Deferred):
                answer = result
            else:
                answer = defer.succeed(result)

        def failed(failure: Failure) -> Any:
            if gone():
                if not failure.check(defer.CancelledError):  # type: ignore[no-untyped-call]
                    log.failure(
                        "[{request_id}] failed after its client went away",
                        failure,
                        request_id=request_id(request),
                    )
                return None
            return self.direct.errors(request, failure)

        def write(body: object) -> None:
            if gone():
                return
            if isinstance(body, str):
                body = body.encode("utf-8")
            if not isinstance(body, bytes | None):
                raise TypeError(
                    f"a direct route answers bytes, str or None, not {type(body).__name__}"
                )
            if body:
                request.write(body)  # type: ignore[no-untyped-call]
            request.finish()  # type: ignore[no-untyped-call]

        def unwritten(failure: Failure) -> None:
            if gone():
                log.failure(
                    "[{request_id}] could not answer", failure, request_id=request_id(request)
                )
            else:
                request.processingFailed(failure)  # type: ignore[attr-defined]

        return answer.addErrback(failed).addCallback(write).addErrback(unwritten)


def _bad_request(request: IRequest, message: str) -> bytes:
    failure = Failure(BadRequest(message))  # type: ignore[no-untyped-call]
    return error_response(request, failure)


def _not_utf8(request: IRequest) -> str | None:
    """Which part of *request* Klein decodes as UTF-8 (the Host header's name, the path with
    its escapes decoded) is not UTF-8, if one is."""
    try:
        request.getRequestHostname().decode("utf-8")  # type: ignore[no-untyped-call]
    except UnicodeDecodeError:
        return "Host header"
    try:
        b"/".join(request.postpath).decode("utf-8")
    except UnicodeDecodeError:
        return "path"
    return None


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


HEALTH_TIMEOUT = 1.0
"""Seconds /health waits for MySQL's answer to ``SELECT 1``."""


class ServiceApp:
    """What the two services' Klein apps share: the in-flight tracker, the metrics, the
    version, the clock, and ``resource()``, the app wrapped so that every request gets an id,
    is counted in flight, measured and logged. A subclass has its own ``app = RoutedKlein()``."""

    app: RoutedKlein
    direct_endpoints: ClassVar[frozenset[str]] = frozenset()
    """The endpoints (handler names) that ``ObservedResource`` runs without Klein for an
    exact match of their route (snet.web.direct): the hot ones."""

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

    def resource(self, *, direct: bool = True) -> IResource:
        """The app as a resource that a Site serves; with *direct* false Klein runs every
        route, the ``direct_endpoints`` too (the unit tests run them both ways)."""
        routes = DirectRoutes.none()
        if direct and self.direct_endpoints:
            routes = DirectRoutes.of(self.app, self.direct_endpoints)
        return ObservedResource(
            self.app.resource(),
            in_flight=self.in_flight,
            metrics=self.metrics,
            clock=self.clock,
            direct=routes,
        )

    def admin_resource(self, fleet: IResource | None = None) -> IResource:
        """The operator's routes (``/metrics``, ``/health``, and the *fleet* view at
        ``/fleet/`` when given) as a resource for the admin listener, which is bound to
        127.0.0.1 unless the operator says otherwise."""
        return ObservedResource(
            AdminAPI(self, fleet).app.resource(),
            in_flight=InFlight(),
            metrics=self.metrics,
            clock=self.clock,
        )

    async def health(self, request: IRequest) -> bytes:
        """``GET /health`` (each service's own, on its public and admin listeners)."""
        raise NotImplementedError


class AdminAPI:
    """The admin listener's routes: what operators and their tools read, never clients."""

    app = RoutedKlein()

    def __init__(self, service: ServiceApp, fleet: IResource | None = None) -> None:
        self.service = service
        self.fleet = fleet

    @app.route("/metrics", methods=["GET"])
    def metrics_text(self, request: IRequest) -> bytes:
        return metrics_response(request, self.service.metrics)

    @app.route("/health", methods=["GET"])
    async def health(self, request: IRequest) -> bytes:
        return await self.service.health(request)

    @app.route("/fleet/", branch=True)
    def fleet_view(self, request: IRequest) -> IResource:
        if self.fleet is None:
            raise NotFound("this service has no fleet view")
        return self.fleet


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
