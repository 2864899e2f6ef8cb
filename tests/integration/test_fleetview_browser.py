"""The operator's fleet view in a real browser, over a real fleet: three chat instances
registered with a real Consul agent, the monolith's discovery, balancer and chat client in
this process (as ``twistd snet-server`` wires them), and the view served on a local port.

The page shows three instances sharing the traffic, then two after one is stopped. Selenium
blocks, so its calls run in a thread while the reactor serves the page.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from prometheus_client import CollectorRegistry
from test_pages_browser import Browser
from test_pages_browser import pytestmark as browser_marks
from twisted.internet import reactor, threads
from twisted.web.server import Site

from snet.config import ConsulConfig
from snet.consul import TreqConsul
from snet.retry import exponential_backoff
from snet.server.chat_client import ChatClient, chat_http_client
from snet.server.discovery import HealthyInstances
from snet.server.ejection import PassiveHealth
from snet.server.fleetview import FleetHistory, FleetView
from snet.server.roundrobin import RoundRobin
from snet.testing.fleet import ChatFleet
from snet.testing.servers import ConsulAgent, MariaDB, Redis
from snet.testing.waiting import sleep

pytestmark = [*browser_marks, pytest.mark.timeout(180)]


class Monolith:
    """What the monolith builds for dialogs, plus the fleet view on a local port."""

    def __init__(self, consul_url: str, service: str) -> None:
        self.registry = CollectorRegistry()
        self.consul = TreqConsul(ConsulConfig.from_url(consul_url))
        self.instances = HealthyInstances(
            consul=self.consul,
            service_name=service,
            clock=reactor,  # type: ignore[arg-type]
            refresh_interval=1.0,
            wait=5.0,
            retry_delay=exponential_backoff(initial=0.05, maximum=0.3),
            registry=self.registry,
        )
        self.health = PassiveHealth(clock=reactor, registry=self.registry)  # type: ignore[arg-type]
        self.balancer = RoundRobin(self.instances, health=self.health)
        self.http = chat_http_client(reactor, connect_timeout=0.5)
        self.chat = ChatClient(
            balancer=self.balancer,
            http=self.http,
            clock=reactor,  # type: ignore[arg-type]
            timeout=2.0,
            registry=self.registry,
        )
        self.history = FleetHistory(registry=self.registry, clock=reactor, interval=1.0)  # type: ignore[arg-type]
        view = FleetView(
            instances=self.instances,
            balancer=self.balancer,
            health=self.health,
            history=self.history,
            clock=reactor,  # type: ignore[arg-type]
            consul_ui=consul_url + "/ui/",
            refresh_seconds=2,
        )
        self.port = reactor.listenTCP(0, Site(view.resource()), interface="127.0.0.1")  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self.port.getHost().port}/"
        self.instances.startService()
        self.history.startService()

    async def calls(self, count: int) -> None:
        for n in range(count):
            reply = await self.chat.unread(request_id=f"fleet-{n}", user_id=1)
            assert reply.status == 200

    async def listed(self, count: int, timeout: float = 20.0) -> None:
        waited = 0.0
        while len(self.instances.instances) != count:
            assert waited < timeout, f"Consul never listed {count} instances"
            await sleep(0.1)
            waited += 0.1

    async def close(self) -> None:
        await self.history.stopService()
        await self.instances.stopService()
        await self.port.stopListening()
        await self.http.close()
        await self.consul.close()


@pytest_twisted.async_yield_fixture
async def stack(
    consul_agent: ConsulAgent, mariadb: MariaDB, redis_server: Redis
) -> AsyncIterator[tuple[ChatFleet, Monolith, Browser]]:
    fleet: ChatFleet = await threads.deferToThread(
        lambda: ChatFleet(
            consul_url=consul_agent.url,
            mysql_url=mariadb.create_database("fleetview_chat"),
            redis_url=redis_server.url.replace("/0", "/14"),
            count=3,
            plaintext=True,  # the view is the same over Connect; this keeps the client simple
        )
    )
    monolith: Monolith | None = None
    browser: Browser | None = None
    try:
        await threads.deferToThread(fleet.wait_all_passing)
        monolith = Monolith(consul_agent.url, fleet.service)
        browser = await threads.deferToThread(Browser, monolith.url, "operator", 1200, 900)
        yield fleet, monolith, browser
    finally:
        if browser is not None:
            await threads.deferToThread(browser.close)
        if monolith is not None:
            await monolith.close()
        await threads.deferToThread(fleet.stop)


# Read in one script run: the page replaces its table every refresh, so elements found one
# call earlier may be gone by the next (a stale element).
READ_TABLE = """
const text = (cell) => cell.innerText.trim();
return {
  head: Array.from(document.querySelectorAll("thead th"), text),
  rows: Array.from(document.querySelectorAll("tbody tr"),
                   (tr) => Array.from(tr.querySelectorAll("th, td"), text)),
};
"""


def rows(browser: Browser) -> dict[str, dict[str, str]]:
    """The fleet table as the browser shows it: instance -> column -> text."""
    driver: Any = browser.driver
    read = driver.execute_script(READ_TABLE)
    return {cells[0]: dict(zip(read["head"], cells, strict=True)) for cells in read["rows"]}


@pytest_twisted.ensureDeferred
async def test_the_operator_sees_three_instances_share_the_load_then_two(
    stack: tuple[ChatFleet, Monolith, Browser],
) -> None:
    fleet, monolith, browser = stack
    await monolith.listed(3)
    await monolith.calls(30)
    await sleep(1.2)  # one more sample of the counters
    await threads.deferToThread(browser.driver.get, monolith.url)
    shown = await threads.deferToThread(rows, browser)
    assert set(shown) == fleet.ids()
    assert [shown[i]["Calls (1 min)"] for i in sorted(shown)] == ["10", "10", "10"]
    assert all(row["Consul"] == "passing" for row in shown.values())
    assert all(row["Rotation"] == "in rotation" for row in shown.values())
    assert all(row["Share (1 min)"] == "33%" for row in shown.values())
    await threads.deferToThread(browser.screenshot, "fleet")

    stopped = fleet.instance_id(2)
    await threads.deferToThread(fleet.instances[2].stop)
    await monolith.listed(2)
    await monolith.calls(20)
    await sleep(2.5)  # the page reloads itself every 2 s
    shown = await threads.deferToThread(rows, browser)
    assert shown[stopped]["Consul"] == "not listed"
    assert shown[stopped]["Calls (all)"] == "10"
    for index in (0, 1):
        row = shown[fleet.instance_id(index)]
        assert row["Consul"] == "passing" and row["Calls (all)"] == "20", row
    await threads.deferToThread(browser.screenshot, "fleet-after-stop")
