"""``HTTPMetrics``: the Prometheus metrics of one HTTP app (requests by method, route template
and status; their durations; the requests in flight), in a registry of its own."""

from __future__ import annotations

from attrs import define, field
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from snet.web.draining import InFlight

KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

MAX_CACHED_SERIES = 1000
"""Children kept at most: the methods a client sends are its own choice."""


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
    _series: dict[tuple[str, str, int], tuple[Counter, Histogram]] = field(init=False, factory=dict)
    """The children of each (method as sent, route, status) seen: ``labels()`` costs more
    than the count."""

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
        series = self._series.get((method, route, status))
        if series is None:
            known = method.upper()
            if known not in KNOWN_METHODS:
                known = "OTHER"
            series = (
                self.requests.labels(method=known, route=route, status=str(status)),
                self.seconds.labels(route=route),
            )
            if len(self._series) < MAX_CACHED_SERIES:
                self._series[method, route, status] = series
        count, duration = series
        count.inc()
        duration.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The metrics in Prometheus' text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
