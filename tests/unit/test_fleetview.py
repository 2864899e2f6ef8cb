"""The operator's fleet view (snet.server.fleetview): what it shows of the instance list, the
rotation, ejections and the chat client's counters, on a Clock and in memory."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet.task import Clock

from snet.retry import RetryBudget
from snet.server.chat_client import ChatCallMetrics
from snet.server.discovery import ChatEndpoint
from snet.server.ejection import PassiveHealth
from snet.server.fleetview import FleetHistory, FleetView
from snet.server.roundrobin import RoundRobin
from snet.testing import result_of


class Listed:
    """An instance list set by hand, with what HealthyInstances adds for the view."""

    def __init__(self, *ids: str) -> None:
        self.instances: tuple[ChatEndpoint, ...] = ()
        self.consul_reachable = True
        self.set(*ids)

    def set(self, *ids: str) -> None:
        self.instances = tuple(
            ChatEndpoint(i, "127.0.0.1", 9000 + n) for n, i in enumerate(ids, start=1)
        )

    def staleness(self) -> float:
        return 0.25

    def subscribe(
        self, callback: Callable[[tuple[ChatEndpoint, ...]], object]
    ) -> Callable[[], None]:
        return lambda: None


class Fleet:
    def __init__(self, *ids: str) -> None:
        self.clock = Clock()
        self.registry = CollectorRegistry()
        self.metrics = ChatCallMetrics(budget=RetryBudget(clock=self.clock), registry=self.registry)
        self.listed = Listed(*ids)
        self.health = PassiveHealth(clock=self.clock, consecutive_failures=1)
        self.balancer = RoundRobin(self.listed, health=self.health)  # type: ignore[arg-type]
        self.history = FleetHistory(registry=self.registry, clock=self.clock, interval=5.0)
        self.view = FleetView(
            instances=self.listed,  # type: ignore[arg-type]
            balancer=self.balancer,
            health=self.health,
            history=self.history,
            clock=self.clock,
            consul_ui="http://127.0.0.1:8500/ui/",
        )
        self.history.startService()

    def calls(self, instance: str, count: int, failures: int = 0) -> None:
        for _ in range(count):
            self.metrics.attempted(instance)
        for _ in range(failures):
            self.metrics.failed(instance, "timeout")

    def advance(self, seconds: float) -> None:
        for _ in range(int(seconds / 5)):
            self.clock.advance(5)

    def get(self, path: str) -> tuple[int, str]:
        response = result_of(StubTreq(self.view.resource()).get("http://admin.test" + path))
        return response.code, result_of(response.content()).decode()


@pytest.fixture
def fleet() -> Fleet:
    return Fleet("chat-a", "chat-b", "chat-c")


def test_the_view_shows_every_instance_its_calls_and_its_share(fleet: Fleet) -> None:
    fleet.calls("chat-a", 10)
    fleet.calls("chat-b", 10)
    fleet.calls("chat-c", 10, failures=1)
    fleet.advance(30)
    status, body = fleet.get("/fleet.json")
    assert status == 200
    snapshot = json.loads(body)
    rows = {row["instance"]: row for row in snapshot["instances"]}
    assert set(rows) == {"chat-a", "chat-b", "chat-c"}
    assert [rows[i]["calls_last_minute"] for i in sorted(rows)] == [10, 10, 10]
    assert rows["chat-c"]["failures_total"] == 1
    assert all(abs(row["share_last_minute"] - 1 / 3) < 1e-9 for row in rows.values())
    assert all(row["consul"] == "passing" and row["in_rotation"] for row in rows.values())
    assert snapshot["consul_reachable"] is True and snapshot["staleness_seconds"] == 0.25


def test_the_last_minute_forgets_older_calls_and_the_chart_keeps_them(fleet: Fleet) -> None:
    fleet.calls("chat-a", 6)
    fleet.advance(120)
    fleet.calls("chat-b", 2)
    fleet.advance(10)
    rows = {r["instance"]: r for r in json.loads(fleet.get("/fleet.json")[1])["instances"]}
    assert rows["chat-a"]["calls_last_minute"] == 0 and rows["chat-a"]["calls_total"] == 6
    assert rows["chat-b"]["calls_last_minute"] == 2
    assert sum(rows["chat-a"]["calls_per_interval"]) == 6
    assert sum(rows["chat-b"]["calls_per_interval"]) == 2


def test_an_ejected_instance_shows_until_when_and_a_gone_one_as_not_listed(fleet: Fleet) -> None:
    fleet.calls("chat-b", 4)
    fleet.health.failed("chat-a", "refused")
    fleet.listed.set("chat-a", "chat-c")
    rows = {r["instance"]: r for r in json.loads(fleet.get("/fleet.json")[1])["instances"]}
    assert rows["chat-a"]["in_rotation"] is False and rows["chat-a"]["ejected_for_seconds"] > 0
    assert rows["chat-b"]["consul"] == "not listed" and rows["chat-b"]["calls_total"] == 4
    status, page = fleet.get("/")
    assert status == 200 and "ejected for" in page and "not listed" in page
    assert 'href="http://127.0.0.1:8500/ui/"' in page and 'http-equiv="refresh"' in page


def test_the_page_escapes_instance_names() -> None:
    fleet = Fleet("<b>chat</b>")
    fleet.calls("<b>chat</b>", 1)
    fleet.advance(10)
    status, page = fleet.get("/")
    assert status == 200 and "&lt;b&gt;chat&lt;/b&gt;" in page and "<b>chat</b>" not in page


def test_the_page_says_so_when_no_instance_is_known() -> None:
    status, page = Fleet().get("/")
    assert status == 200 and "No chat instance is known." in page
