"""The operator's view of the chat fleet, as the monolith sees it: one HTML page (refreshed
every few seconds, no script) and the same facts as JSON.

For every chat instance: whether Consul lists it as passing, whether it is in rotation or
ejected (until when, how many ejections in a row), its calls and failures over the last
minute and since the start, its share of the traffic, and a small chart of its calls over
the last minutes, so that "evenly loaded" is something one sees. For the fleet: Consul's
reachability, the staleness of the list and its last index, retries, denied retries and the
retry budget, and a link to the Consul UI.

The counts come from the monolith's Prometheus registry (``snet_chat_requests_total``,
``snet_chat_request_failures_total``, ``snet_chat_retries_total``,
``snet_chat_retries_denied_total``, ``snet_chat_retry_budget_available``: see
``snet.server.chat_client``), sampled every ``interval`` seconds by ``FleetHistory``; the
list, rotation and ejections from ``HealthyInstances``, ``RoundRobin`` and ``PassiveHealth``.
Nothing here changes what it shows. Meant for the admin listener (127.0.0.1 by default).
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

from attrs import frozen
from prometheus_client import CollectorRegistry
from twisted.application.internet import TimerService
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from twisted.web.template import Tag, tags

from snet.server.discovery import InstanceSource
from snet.server.ejection import PassiveHealth
from snet.server.page_views import render_html
from snet.server.roundrobin import RoundRobin
from snet.web.errors import error_response
from snet.web.requests import json_response, set_header
from snet.web.service import RoutedKlein

SAMPLE_INTERVAL = 5.0
"""Seconds between two samples of the counters."""
HISTORY_SECONDS = 600.0
"""How far back the chart goes."""
REFRESH_SECONDS = 5
"""How often the page reloads itself."""


@frozen
class Counts:
    """Calls sent to one instance and the ones that failed."""

    calls: float = 0.0
    failures: float = 0.0

    def minus(self, earlier: Counts) -> Counts:
        return Counts(
            max(0.0, self.calls - earlier.calls), max(0.0, self.failures - earlier.failures)
        )


@frozen
class Sample:
    """The counters at one moment."""

    at: float
    instances: Mapping[str, Counts]
    retries: float = 0.0
    denied: float = 0.0


def read_counters(registry: CollectorRegistry, at: float) -> Sample:
    """The chat client's counters in *registry* now (zeros for what is not there)."""
    calls: dict[str, float] = {}
    failures: dict[str, float] = {}
    retries = denied = 0.0
    for metric in registry.collect():
        for sample in metric.samples:
            instance = sample.labels.get("instance", "")
            if sample.name == "snet_chat_requests_total":
                calls[instance] = calls.get(instance, 0.0) + sample.value
            elif sample.name == "snet_chat_request_failures_total":
                failures[instance] = failures.get(instance, 0.0) + sample.value
            elif sample.name == "snet_chat_retries_total":
                retries += sample.value
            elif sample.name == "snet_chat_retries_denied_total":
                denied += sample.value
    names = set(calls) | set(failures)
    counts = {name: Counts(calls.get(name, 0.0), failures.get(name, 0.0)) for name in names}
    return Sample(at=at, instances=counts, retries=retries, denied=denied)


def gauge(registry: CollectorRegistry, name: str) -> float | None:
    value = registry.get_sample_value(name)
    return None if value is None else float(value)


class FleetHistory(TimerService):
    """Samples the counters every *interval* seconds and keeps *history* seconds of them: a
    service (start it with the monolith's other workers)."""

    def __init__(
        self,
        *,
        registry: CollectorRegistry,
        clock: IReactorTime,
        interval: float = SAMPLE_INTERVAL,
        history: float = HISTORY_SECONDS,
    ) -> None:
        super().__init__(interval, self.sample)  # type: ignore[no-untyped-call]
        self.clock = clock  # TimerService's, for its LoopingCall
        self._clock = clock
        self.registry = registry
        self.interval = interval
        self.samples: deque[Sample] = deque(maxlen=math.ceil(history / interval) + 1)
        self.first: Sample | None = None

    def sample(self) -> Sample:
        """Take a sample now and keep it."""
        sample = read_counters(self.registry, self._clock.seconds())
        if self.first is None:
            self.first = Sample(at=sample.at, instances={})
        self.samples.append(sample)
        return sample

    def now(self) -> Sample:
        """The counters now (not kept)."""
        return read_counters(self.registry, self._clock.seconds())

    def ago(self, seconds: float) -> Sample:
        """The oldest kept sample no older than *seconds* (zeros before the first)."""
        cutoff = self._clock.seconds() - seconds
        for sample in self.samples:
            if sample.at >= cutoff - self.interval / 2:
                return sample
        return self.first or Sample(at=self._clock.seconds(), instances={})

    def series(self, instance: str) -> list[float]:
        """Calls sent to *instance* in each interval between kept samples, oldest first."""
        samples = list(self.samples)
        empty = Counts()
        return [
            later.instances.get(instance, empty).minus(earlier.instances.get(instance, empty)).calls
            for earlier, later in itertools.pairwise(samples)
        ]


@frozen
class InstanceView:
    """One row of the fleet table."""

    instance_id: str
    address: str
    in_consul: bool
    in_rotation: bool
    ejected_for: float | None
    ejections: int
    minute: Counts
    total: Counts
    share_minute: float | None
    share_total: float | None
    series: list[float]

    def to_json(self) -> dict[str, Any]:
        return {
            "instance": self.instance_id,
            "address": self.address,
            "consul": "passing" if self.in_consul else "not listed",
            "in_rotation": self.in_rotation,
            "ejected_for_seconds": self.ejected_for,
            "ejections": self.ejections,
            "calls_last_minute": self.minute.calls,
            "failures_last_minute": self.minute.failures,
            "calls_total": self.total.calls,
            "failures_total": self.total.failures,
            "share_last_minute": self.share_minute,
            "share_total": self.share_total,
            "calls_per_interval": self.series,
        }


@frozen
class FleetSnapshot:
    """What the page shows."""

    instances: list[InstanceView]
    consul_reachable: bool | None
    staleness: float | None
    consul_index: int | None
    panic: bool
    retries_minute: float
    retries_total: float
    denied_minute: float
    denied_total: float
    retry_budget: float | None
    interval: float

    def to_json(self) -> dict[str, Any]:
        return {
            "instances": [instance.to_json() for instance in self.instances],
            "consul_reachable": self.consul_reachable,
            "staleness_seconds": self.staleness,
            "consul_index": self.consul_index,
            "panic": self.panic,
            "retries_last_minute": self.retries_minute,
            "retries_total": self.retries_total,
            "retries_denied_last_minute": self.denied_minute,
            "retries_denied_total": self.denied_total,
            "retry_budget_available": self.retry_budget,
            "sample_interval_seconds": self.interval,
        }


def _shares(values: Mapping[str, float]) -> dict[str, float | None]:
    total = sum(values.values())
    return {key: (value / total if total else None) for key, value in values.items()}


def _number(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


class FleetView:
    """The fleet page (``GET /``) and its JSON (``GET /fleet.json``); ``resource()`` is what
    the admin listener serves, at its root or under a path such as ``/fleet/``.

    :param instances: the monolith's instance list (``HealthyInstances``; ``consul_reachable``,
        ``staleness()`` and ``consul_index`` are shown when it has them).
    :param balancer: the monolith's ``RoundRobin`` (its rotation and panic mode).
    :param health: the balancer's ``PassiveHealth`` (ejections), if any.
    :param history: the ``FleetHistory`` sampling the monolith's metrics registry.
    :param consul_ui: the Consul UI's address, linked from the page.
    """

    app = RoutedKlein()

    def __init__(
        self,
        *,
        instances: InstanceSource,
        balancer: RoundRobin,
        health: PassiveHealth | None,
        history: FleetHistory,
        clock: IReactorTime,
        consul_ui: str | None = None,
        refresh_seconds: int = REFRESH_SECONDS,
    ) -> None:
        self.instances = instances
        self.balancer = balancer
        self.health = health
        self.history = history
        self.clock = clock
        self.consul_ui = consul_ui
        self.refresh_seconds = refresh_seconds

    def resource(self) -> IResource:
        resource: IResource = self.app.resource()
        return resource

    def snapshot(self) -> FleetSnapshot:
        """The fleet now."""
        now = self.history.now()
        minute_ago = self.history.ago(60.0)
        listed = {e.instance_id: e for e in self.instances.instances}
        rotation = {e.instance_id for e in self.balancer.rotation()}
        ids = sorted(set(listed) | set(now.instances))
        minute = {
            i: now.instances.get(i, Counts()).minus(minute_ago.instances.get(i, Counts()))
            for i in ids
        }
        total = {i: now.instances.get(i, Counts()) for i in ids}
        share_minute = _shares({i: c.calls for i, c in minute.items()})
        share_total = _shares({i: c.calls for i, c in total.items()})
        rows = []
        for i in ids:
            until = self.health.ejected_until(i) if self.health is not None else None
            endpoint = listed.get(i)
            rows.append(
                InstanceView(
                    instance_id=i,
                    address=f"{endpoint.host}:{endpoint.port}" if endpoint else "",
                    in_consul=endpoint is not None,
                    in_rotation=i in rotation,
                    ejected_for=None if until is None else max(0.0, until - now.at),
                    ejections=self.health.ejection_count(i) if self.health is not None else 0,
                    minute=minute[i],
                    total=total[i],
                    share_minute=share_minute[i],
                    share_total=share_total[i],
                    series=self.history.series(i),
                )
            )
        staleness = getattr(self.instances, "staleness", None)
        reachable = getattr(self.instances, "consul_reachable", None)
        index = getattr(self.instances, "consul_index", None)
        return FleetSnapshot(
            instances=rows,
            consul_reachable=reachable if isinstance(reachable, bool) else None,
            staleness=_number(staleness()) if callable(staleness) else None,
            consul_index=index if isinstance(index, int) else None,
            panic=self.balancer.panic,
            retries_minute=max(0.0, now.retries - minute_ago.retries),
            retries_total=now.retries,
            denied_minute=max(0.0, now.denied - minute_ago.denied),
            denied_total=now.denied,
            retry_budget=gauge(self.history.registry, "snet_chat_retry_budget_available"),
            interval=self.history.interval,
        )

    @app.handle_errors(Exception)
    def _error(self, request: IRequest, failure: Failure) -> bytes:
        return error_response(request, failure)

    @app.route("/", methods=["GET"])
    def page(self, request: IRequest) -> bytes:
        body = fleet_page(self.snapshot(), self.consul_ui, self.refresh_seconds)
        set_header(request, b"Content-Type", b"text/html; charset=utf-8")
        set_header(request, b"Cache-Control", b"no-store")
        return body

    @app.route("/fleet.json", methods=["GET"])
    def as_json(self, request: IRequest) -> bytes:
        return json_response(request, self.snapshot().to_json())


# --- the page -------------------------------------------------------------------------------

STYLE = """
:root { font-family: system-ui, sans-serif; color: #1d2430; background: #f3f5f8; }
body { margin: 0 auto; max-width: 72rem; padding: 1rem; }
h1 { font-size: 1.5rem; margin: 0 0 .5rem; }
a { color: #1a56b0; }
.facts { display: flex; flex-wrap: wrap; gap: .5rem 1.5rem; padding: 0; list-style: none; }
.facts li { background: #fff; border: 1px solid #d5dae2; border-radius: .4rem;
  padding: .4rem .7rem; }
table { border-collapse: collapse; width: 100%; background: #fff; margin: 1rem 0; }
th, td { border-bottom: 1px solid #d5dae2; padding: .45rem .6rem; text-align: left;
  vertical-align: middle; }
th { background: #e9edf3; font-size: .9rem; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
td span.ok, td span.bad { white-space: nowrap; }
.ok { color: #1f6f43; font-weight: 600; }
.bad { color: #a4262c; font-weight: 600; }
.bar { display: inline-block; height: .8rem; background: #1a56b0; vertical-align: middle; }
.muted { color: #4f5968; font-size: .9rem; }
svg { display: block; }
"""

COLOURS = ("#1a56b0", "#c4201f", "#1f6f43", "#8a5a00", "#6b3fa0", "#00777a", "#b3366b")


def _pct(share: float | None) -> str:
    return "—" if share is None else f"{share * 100:.0f}%"


def _count(value: float) -> str:
    return f"{value:.0f}"


def _status(row: InstanceView) -> Tag:
    if row.ejected_for is not None:
        return tags.span(
            f"ejected for {row.ejected_for:.1f} s (ejection {row.ejections})", class_="bad"
        )
    if row.in_rotation:
        return tags.span("in rotation", class_="ok")
    return tags.span("out of rotation", class_="bad")


MAX_BARS = 30
"""Time buckets the chart shows at most (older samples are summed into wider buckets)."""


def _buckets(series: list[float], length: int, per_bucket: int) -> list[float]:
    """*series* right-aligned to *length* intervals, summed *per_bucket* intervals at a time."""
    padded = [0.0] * (length - len(series)) + series
    return [sum(padded[n : n + per_bucket]) for n in range(0, length, per_bucket)]


def _span(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def chart(rows: Iterable[InstanceView], interval: float) -> Tag:
    """Calls to each instance per time bucket over the kept history, as grouped bars (SVG):
    even load shows as bars of one height in every group."""
    rows = list(rows)
    width, height, pad = 720, 160, 20
    longest = max((len(r.series) for r in rows), default=0)
    per_bucket = max(1, math.ceil(longest / MAX_BARS))
    buckets = {r.instance_id: _buckets(r.series, longest, per_bucket) for r in rows}
    count = max((len(b) for b in buckets.values()), default=0)
    peak = max((max(b, default=0.0) for b in buckets.values()), default=0.0) or 1.0
    seconds = per_bucket * interval
    svg = Tag("svg")(
        viewBox=f"0 0 {width} {height + pad}",
        width="100%",
        role="img",
        **{"aria-label": f"Calls to each chat instance per {seconds:.0f} s"},
    )
    group = width / max(count, MAX_BARS)
    start = width - count * group  # the newest bucket at the right end
    bar = max(1.0, (group - 4) / max(1, len(rows)))
    legend = tags.p(class_="muted")
    for index, row in enumerate(rows):
        colour = COLOURS[index % len(COLOURS)]
        for n, value in enumerate(buckets[row.instance_id]):
            tall = value / peak * (height - 20)
            svg(
                Tag("rect")(
                    x=f"{start + n * group + 2 + index * bar:.1f}",
                    y=f"{height - tall:.1f}",
                    width=f"{bar:.1f}",
                    height=f"{tall:.1f}",
                    fill=colour,
                )(Tag("title")(f"{row.instance_id}: {value:.0f} calls"))
            )
        legend(tags.span("■ ", style=f"color: {colour}"), row.instance_id, "  ")
    svg(Tag("line")(x1="0", y1=str(height), x2=str(width), y2=str(height), stroke="#8a94a3"))
    svg(Tag("text")(f"peak {peak:.0f}", x="4", y="12", fill="#4f5968", **{"font-size": "12"}))
    svg(
        Tag("text")(
            f"calls per {seconds:.0f} s, over the last {_span(longest * interval)}",
            x="4",
            y=str(height + 15),
            fill="#4f5968",
            **{"font-size": "12"},
        )
    )
    return tags.div(svg, legend)


def fleet_page(snapshot: FleetSnapshot, consul_ui: str | None, refresh: int) -> bytes:
    """The fleet page as UTF-8 HTML."""
    consul = (
        "unknown"
        if snapshot.consul_reachable is None
        else ("reachable" if snapshot.consul_reachable else "UNREACHABLE: serving the last list")
    )
    facts = tags.ul(class_="facts")(
        tags.li("Consul: ", tags.strong(consul)),
        tags.li(
            "List read ",
            tags.strong("—" if snapshot.staleness is None else f"{snapshot.staleness:.1f} s ago"),
        ),
        tags.li(
            "Consul index: ",
            tags.strong("—" if snapshot.consul_index is None else str(snapshot.consul_index)),
        ),
        tags.li(
            "Passing: ",
            tags.strong(str(sum(1 for r in snapshot.instances if r.in_consul))),
            ", in rotation: ",
            tags.strong(str(sum(1 for r in snapshot.instances if r.in_rotation))),
            tags.strong(" (panic: sending to all)", class_="bad") if snapshot.panic else "",
        ),
        tags.li(
            "Retries: ",
            tags.strong(_count(snapshot.retries_minute)),
            f" last minute, {_count(snapshot.retries_total)} in all; denied ",
            tags.strong(_count(snapshot.denied_minute)),
            f" last minute, {_count(snapshot.denied_total)} in all",
        ),
        tags.li(
            "Retry budget: ",
            tags.strong("—" if snapshot.retry_budget is None else f"{snapshot.retry_budget:.0f}"),
            " retries available",
        ),
    )
    head = tags.tr(
        *(
            tags.th(name, scope="col")
            for name in (
                "Instance",
                "Address",
                "Consul",
                "Rotation",
                "Calls (1 min)",
                "Failures (1 min)",
                "Calls (all)",
                "Failures (all)",
                "Share (1 min)",
                "Share (all)",
            )
        )
    )
    body = []
    for row in snapshot.instances:
        share = row.share_minute or 0.0
        body.append(
            tags.tr(
                tags.th(row.instance_id, scope="row"),
                tags.td(row.address or "—"),
                tags.td(
                    tags.span("passing", class_="ok")
                    if row.in_consul
                    else tags.span("not listed", class_="bad")
                ),
                tags.td(_status(row)),
                tags.td(_count(row.minute.calls), class_="n"),
                tags.td(_count(row.minute.failures), class_="n"),
                tags.td(_count(row.total.calls), class_="n"),
                tags.td(_count(row.total.failures), class_="n"),
                tags.td(
                    tags.span(class_="bar", style=f"width: {share * 6:.2f}rem"),
                    " ",
                    _pct(row.share_minute),
                    class_="n",
                ),
                tags.td(_pct(row.share_total), class_="n"),
            )
        )
    links: list[Any] = [tags.a("JSON", href="fleet.json")]
    if consul_ui:
        links += [" · ", tags.a("Consul UI", href=consul_ui)]
    document = tags.html(lang="en")(
        tags.head(
            tags.meta(charset="utf-8"),
            tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
            tags.meta(**{"http-equiv": "refresh", "content": str(refresh)}),
            tags.title("Chat fleet · snet"),
            tags.style(STYLE),
        ),
        tags.body(
            tags.h1("Chat fleet"),
            tags.p(
                f"Dialog calls as this monolith spreads them; refreshed every {refresh} s. ",
                *links,
                class_="muted",
            ),
            facts,
            tags.table(tags.thead(head), tags.tbody(*body))
            if body
            else tags.p("No chat instance is known.", class_="bad"),
            tags.h2("Calls per instance"),
            chart(snapshot.instances, snapshot.interval),
        ),
    )
    return render_html(document)
