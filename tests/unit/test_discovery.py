"""HealthyInstances against a fake Consul agent in memory, on a Clock; StaticInstances."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, capturedLogs, formatEvent
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from snet.config import ConfigError, ConsulConfig
from snet.consul import TreqConsul
from snet.server.discovery import (
    ChatEndpoint,
    HealthyInstances,
    StaticInstances,
    endpoint_from_url,
    endpoints_from_health,
)
from snet.testing import result_of

SERVICE = "snet-chat"
PATH = f"/v1/health/service/{SERVICE}"


def entry(
    service_id: str,
    port: int = 8080,
    address: str = "10.0.0.1",
    node: str = "node-1",
    checks: Sequence[str] = ("passing", "passing"),
) -> dict[str, Any]:
    """One element of a /v1/health/service answer."""
    return {
        "Node": {"Node": node, "Address": "192.168.0.1"},
        "Service": {"ID": service_id, "Service": SERVICE, "Address": address, "Port": port},
        "Checks": [{"CheckID": f"c{i}", "Status": s} for i, s in enumerate(checks)],
    }


class FakeConsul(Resource):
    """/v1/health/service/<name> with blocking queries, as a Consul agent answers them.

    A query with ``index`` at or above the current index is held until ``change()`` (or
    ``release()``, which answers held queries as a ``wait`` that ran out would). ``wakes``
    False makes changes leave held queries alone (a broken blocking connection);
    ``hold_reads`` holds non-blocking reads too, answering them later with the list as it
    was when they came in; ``error`` answers every query with that (status, body).
    """

    isLeaf = True

    def __init__(self, clock: Clock) -> None:
        super().__init__()
        self.clock = clock
        self.index = 10
        self.entries: list[dict[str, Any]] = []
        self.requests: list[tuple[float, dict[str, str]]] = []
        self.held: list[tuple[Request, int, list[dict[str, Any]]]] = []
        self.wakes = True
        self.hold_reads = False
        self.always_new_index = False
        self.error: tuple[int, bytes] | None = None
        self.index_header: str | None = None
        self.stub: StubTreq | None = None

    def render(self, request: Request) -> bytes | int:
        assert request.path is not None
        assert request.path.decode() == PATH, request.path
        args = {k.decode(): v[0].decode() for k, v in (request.args or {}).items()}
        self.requests.append((self.clock.seconds(), args))
        if self.error is not None:
            request.setResponseCode(self.error[0])
            return self.error[1]
        if self.always_new_index:
            self.index += 1
        blocking = "index" in args and int(args["index"]) >= self.index
        if blocking or self.hold_reads:
            self.held.append((request, self.index, list(self.entries)))
            return NOT_DONE_YET
        return self._answer(request, self.index, self.entries)

    def _answer(self, request: Request, index: int, entries: list[dict[str, Any]]) -> bytes:
        request.setHeader("X-Consul-Index", self.index_header or str(index))
        request.setHeader("Content-Type", "application/json")
        passing = [e for e in entries if all(c["Status"] == "passing" for c in e.get("Checks", []))]
        return json.dumps(passing).encode()

    def flush(self) -> None:
        assert self.stub is not None
        self.stub.flush()

    def change(self, entries: list[dict[str, Any]], index: int | None = None) -> None:
        """Set the list (and the index: one up by default) and wake blocked queries."""
        self.entries = entries
        self.index = self.index + 1 if index is None else index
        if self.wakes:
            self.release(blocking_only=True)

    def release(self, *, blocking_only: bool = False) -> None:
        """Answer the held queries: blocking ones with the current list, reads as they were."""
        held, self.held = self.held, []
        for request, index, entries in held:
            is_blocking = "index" in {k.decode() for k in (request.args or {})}
            if is_blocking:
                request.write(self._answer(request, self.index, self.entries))
                request.finish()
            elif blocking_only:
                self.held.append((request, index, entries))
            else:
                request.write(self._answer(request, index, entries))
                request.finish()
        self.flush()

    def drop(self) -> None:
        """Drop the connections of held queries, as a dying agent does."""
        held, self.held = self.held, []
        for request, _, _ in held:
            request.loseConnection()
        self.flush()

    def blocking_requests(self) -> list[dict[str, str]]:
        return [args for _, args in self.requests if "index" in args]


class SwitchableTreq:
    """StubTreq in front of the fake agent; ``down`` refuses every new connection."""

    def __init__(self, agent: FakeConsul) -> None:
        self.stub = StubTreq(agent)
        agent.stub = self.stub
        self.down = False

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        if self.down:
            return fail(ConnectionRefusedError("agent is down"))
        d: Deferred[Any] = self.stub.request(method, url, **kwargs)
        return d


class Harness:
    def __init__(self, **kwargs: Any) -> None:
        self.clock = Clock()
        self.agent = FakeConsul(self.clock)
        self.http = SwitchableTreq(self.agent)
        self.consul = TreqConsul(
            ConsulConfig.from_url("http://127.0.0.1:8500"),
            reactor=self.clock,
            http=self.http,  # type: ignore[arg-type]
            timeout=3.0,
        )
        self.registry = CollectorRegistry()
        self.delays_asked: list[int] = []

        def policy(attempt: int) -> float:
            self.delays_asked.append(attempt)
            return float(attempt)

        options: dict[str, Any] = {
            "refresh_interval": 5.0,
            "wait": 30.0,
            "retry_delay": policy,
            "min_interval": 0.05,
            "registry": self.registry,
        }
        options.update(kwargs)
        self.instances = HealthyInstances(
            consul=self.consul, service_name=SERVICE, clock=self.clock, **options
        )
        self.seen: list[tuple[ChatEndpoint, ...]] = []
        self.instances.subscribe(self.seen.append)

    def start(self) -> None:
        self.instances.startService()
        self.clock.advance(0)

    def ids(self) -> list[str]:
        return [e.instance_id for e in self.instances.instances]

    def metric(self, name: str) -> float | None:
        value: float | None = self.registry.get_sample_value(name)
        return value


@pytest.fixture
def h() -> Harness:
    return Harness()


@pytest.fixture
def logs() -> Iterator[Sequence[LogEvent]]:
    with capturedLogs() as events:
        yield events


def messages(events: Sequence[LogEvent], level: LogLevel | None = None) -> list[str]:
    return [
        str(formatEvent(e))
        for e in events
        if e.get("log_namespace") in {"snet.server.discovery", "snet.blocking_query"}
        and (level is None or e.get("log_level") == level)
    ]


# --- following the list -----------------------------------------------------------------------


def test_the_first_read_does_not_block_and_the_next_one_waits_on_its_index(h: Harness) -> None:
    h.agent.entries = [entry("chat-b"), entry("chat-a", port=8081)]
    h.start()
    assert h.ids() == ["chat-a", "chat-b"]
    assert h.agent.requests[0][1] == {"passing": "1"}
    h.clock.advance(0.05)
    assert h.agent.requests[1][1] == {"passing": "1", "index": "10", "wait": "30s"}
    assert len(h.agent.held) == 1


def test_consul_index_is_the_index_of_the_last_answer_applied(h: Harness) -> None:
    assert h.instances.consul_index is None
    h.agent.entries = [entry("chat-a")]
    h.start()
    assert h.instances.consul_index == 10
    h.clock.advance(0.05)
    h.agent.change([entry("chat-a"), entry("chat-b")])
    assert h.instances.consul_index == 11


def test_a_change_reaches_the_list_as_soon_as_consul_answers(h: Harness) -> None:
    """No clock advance: the held blocking query answers and the list follows at once."""
    h.agent.entries = [entry("chat-a")]
    h.start()
    h.clock.advance(0.05)
    h.agent.change([entry("chat-a"), entry("chat-c", address="10.0.0.3", port=9000)])
    assert h.ids() == ["chat-a", "chat-c"]
    assert h.instances.instances[1].url == "http://10.0.0.3:9000"
    assert [len(s) for s in h.seen] == [1, 2]


def test_the_list_is_sorted_by_instance_id_and_kept_as_the_same_object(h: Harness) -> None:
    h.agent.entries = [entry("c"), entry("a"), entry("b")]
    h.start()
    first = h.instances.instances
    assert h.ids() == ["a", "b", "c"]
    h.clock.advance(0.05)
    h.agent.change([entry("b"), entry("c"), entry("a")])
    assert h.instances.instances is first
    assert len(h.seen) == 1


def test_a_wake_up_is_re_read_never_assumed(h: Harness) -> None:
    """A new instance that is still critical wakes the query but does not join the list."""
    h.agent.entries = [entry("chat-a")]
    h.start()
    h.clock.advance(0.05)
    h.agent.change([entry("chat-a"), entry("chat-new", checks=("critical",))])
    assert h.ids() == ["chat-a"]
    assert h.agent.held == []
    h.clock.advance(0.05)
    assert h.agent.blocking_requests()[-1]["index"] == "11"
    h.agent.change([entry("chat-a"), entry("chat-new")])
    assert h.ids() == ["chat-a", "chat-new"]


def test_an_empty_answer_keeps_the_last_list_until_instances_are_listed_again(
    h: Harness, logs: Sequence[LogEvent]
) -> None:
    """A restarted agent answers "none passing" until the instances register again: the
    last list stays in use (logged once) and the next non-empty answer replaces it."""
    h.agent.entries = [entry("chat-a"), entry("chat-b")]
    h.start()
    h.clock.advance(0.05)
    h.agent.change([])
    h.clock.advance(0.05)
    h.agent.change([])
    assert [e.instance_id for e in h.instances.instances] == ["chat-a", "chat-b"]
    kept = [e for e in logs if "keeping the last" in e.get("log_format", "")]
    assert len(kept) == 1
    h.clock.advance(0.05)
    h.agent.change([entry("chat-b")])
    assert [e.instance_id for e in h.instances.instances] == ["chat-b"]
    assert h.seen[-1] == h.instances.instances


def test_a_list_that_was_never_filled_stays_empty(h: Harness) -> None:
    h.agent.entries = []
    h.start()
    h.clock.advance(0.05)
    assert h.instances.instances == ()


def test_an_index_that_goes_backwards_starts_again_with_a_read_that_does_not_block(
    h: Harness, logs: Sequence[LogEvent]
) -> None:
    h.agent.entries = [entry("chat-a")]
    h.start()
    h.clock.advance(0.05)
    h.agent.change([entry("chat-z")], index=4)  # the agent restarted: its index is new
    assert h.ids() == ["chat-z"]
    h.clock.advance(0.05)
    assert h.agent.requests[-1][1] == {"passing": "1"}
    h.clock.advance(0.05)
    assert h.agent.requests[-1][1]["index"] == "4"
    assert any("went backwards (10 -> 4)" in m for m in messages(logs))


def test_an_index_of_zero_is_never_waited_on(h: Harness) -> None:
    """Consul's rule: after each answer the index is at least 1."""
    h.agent.index = 0
    h.agent.entries = [entry("chat-a")]
    h.start()
    h.clock.advance(0.05)
    assert h.agent.blocking_requests() == [{"passing": "1", "index": "1", "wait": "30s"}]


def test_blocking_calls_that_return_at_once_are_rate_limited(h: Harness) -> None:
    """An index that changes on every call cannot make the loop spin: calls start at least
    min_interval (50 ms) apart."""
    h.agent.always_new_index = True
    h.agent.entries = [entry("chat-a")]
    h.start()
    for _ in range(100):
        h.clock.advance(0.01)
    times = [t for t, _ in h.agent.requests]
    assert 20 <= len(times) <= 21  # t = 0, 0.05, ..., 1.0 (up to float rounding)
    assert all(b - a >= 0.05 - 1e-9 for a, b in itertools.pairwise(times))


def test_a_blocking_call_after_a_long_wait_starts_at_once(h: Harness) -> None:
    """The limit is between starts: a query that was held for seconds is followed at once."""
    h.agent.entries = [entry("chat-a")]
    h.start()
    h.clock.advance(0.05)
    h.clock.advance(10)
    h.agent.release()  # the wait ran out: same index
    count = len(h.agent.requests)
    h.clock.advance(0)
    assert len(h.agent.requests) == count + 1
    assert h.agent.requests[-1][1]["index"] == "10"


def test_the_periodic_refresh_catches_what_a_stuck_blocking_query_misses(h: Harness) -> None:
    h.agent.entries = [entry("chat-a")]
    h.agent.wakes = False
    h.start()
    h.clock.advance(0.05)
    h.agent.change([entry("chat-a"), entry("chat-b")])
    assert h.ids() == ["chat-a"]
    h.clock.advance(4.9)
    assert h.ids() == ["chat-a"]
    h.clock.advance(0.1)
    assert h.ids() == ["chat-a", "chat-b"]
    assert h.agent.requests[-1][1] == {"passing": "1"}


def test_an_older_answer_that_arrives_late_does_not_overwrite_a_newer_one(h: Harness) -> None:
    """A periodic read held by the agent while the loop applied a newer list is dropped."""
    h.agent.entries = [entry("chat-a")]
    h.start()
    h.clock.advance(0.05)
    h.agent.hold_reads = True
    h.clock.advance(4.95)  # the periodic read comes in and is held, seeing [chat-a]
    h.agent.hold_reads = False
    h.agent.change([entry("chat-a"), entry("chat-b")])  # the loop applies index 11
    assert h.ids() == ["chat-a", "chat-b"]
    h.agent.release()  # the read answers at last, with index 10
    assert h.ids() == ["chat-a", "chat-b"]
    assert h.instances.consul_reachable


def test_a_periodic_read_that_sees_the_index_go_backwards_applies_and_restarts_the_loop(
    h: Harness,
) -> None:
    """An agent restart that the held blocking query never saw: the read trusts the lower
    index (nothing was applied while it ran), and the loop starts again from a fresh read."""
    h.agent.entries = [entry("chat-a")]
    h.agent.wakes = False
    h.start()
    h.clock.advance(0.05)
    h.agent.change([entry("chat-r")], index=3)
    h.clock.advance(4.95)  # t=5: the refresh, then at once a fresh read of the loop
    assert h.ids() == ["chat-r"]
    assert [args for _, args in h.agent.requests[-2:]] == [{"passing": "1"}] * 2
    h.clock.advance(0.05)
    assert h.agent.requests[-1][1]["index"] == "3"


# --- outages ----------------------------------------------------------------------------------


def test_an_outage_keeps_the_last_list_and_is_logged_once(
    h: Harness, logs: Sequence[LogEvent]
) -> None:
    h.agent.entries = [entry("chat-a"), entry("chat-b")]
    h.start()
    h.clock.advance(0.05)
    h.http.down = True
    h.agent.drop()
    for _ in range(30):
        h.clock.advance(1.0)
    assert h.ids() == ["chat-a", "chat-b"]
    assert not h.instances.consul_reachable
    assert h.delays_asked[:3] == [1, 2, 3]
    warnings = messages(logs, LogLevel.warn)
    assert len(warnings) == 1
    assert warnings[0].startswith(
        "cannot read snet-chat from consul, keeping 2 instances: ConsulUnavailable"
    )
    assert h.seen == [h.instances.instances]


def test_recovery_is_logged_once_and_the_loop_reads_afresh(
    h: Harness, logs: Sequence[LogEvent]
) -> None:
    h.agent.entries = [entry("chat-a")]
    h.start()
    h.clock.advance(0.05)
    h.http.down = True
    h.agent.drop()
    h.clock.advance(1.0)  # the loop's retry fails again; next in 2 s
    h.http.down = False
    h.agent.entries = [entry("chat-a"), entry("chat-b")]
    h.agent.index = 50
    h.clock.advance(2.0)
    assert h.instances.consul_reachable
    assert h.ids() == ["chat-a", "chat-b"]
    assert h.agent.requests[-1][1] == {"passing": "1"}  # no waiting on an old index
    h.clock.advance(0.05)
    assert h.agent.requests[-1][1]["index"] == "50"
    infos = [m for m in messages(logs, LogLevel.info) if "reachable again" in m]
    assert infos == ["consul reachable again, reading snet-chat"]
    for _ in range(20):
        h.clock.advance(1.0)
    assert [m for m in messages(logs) if "reachable" in m or "cannot read" in m] == [
        messages(logs, LogLevel.warn)[0],
        "consul reachable again, reading snet-chat",
    ]


def test_each_outage_is_logged_once_again(h: Harness, logs: Sequence[LogEvent]) -> None:
    h.agent.entries = [entry("chat-a")]
    h.start()
    for _ in range(2):
        h.clock.advance(0.05)
        h.http.down = True
        h.agent.drop()
        h.clock.advance(3.0)
        h.http.down = False
        h.clock.advance(3.0)
    assert len([m for m in messages(logs) if "cannot read" in m]) == 2
    assert len([m for m in messages(logs) if "reachable again" in m]) == 2


def test_an_error_answer_from_consul_keeps_the_list_too(
    h: Harness, logs: Sequence[LogEvent]
) -> None:
    """A 500 (no cluster leader, say) is an outage: the list stays, one warning."""
    h.agent.entries = [entry("chat-a")]
    h.start()
    h.clock.advance(0.05)
    h.agent.error = (500, b"No cluster leader")
    h.agent.release()
    for _ in range(10):
        h.clock.advance(1.0)
    assert h.ids() == ["chat-a"]
    warnings = messages(logs, LogLevel.warn)
    assert len(warnings) == 1 and "No cluster leader" in warnings[0]


def test_an_invalid_index_header_counts_as_a_failure(h: Harness) -> None:
    h.agent.index_header = "banana"
    h.agent.entries = [entry("chat-a")]
    h.start()
    assert h.ids() == []
    assert not h.instances.consul_reachable
    assert h.delays_asked == [1]


def test_a_hung_blocking_query_times_out_and_is_retried(h: Harness) -> None:
    """TreqConsul gives it 3 + 30 + 30/16 seconds; then the loop backs off and reads afresh."""
    h.agent.entries = [entry("chat-a")]
    h.agent.wakes = False
    h.start()
    h.clock.advance(0.05)
    h.agent.requests.clear()
    h.clock.advance(3 + 30 + 30 / 16 - 0.01)
    assert h.instances.consul_reachable  # the refreshes answered meanwhile
    h.clock.advance(0.02)
    assert h.delays_asked == [1]
    h.clock.advance(1.0)
    assert h.agent.requests[-1][1] == {"passing": "1"}


def test_a_successful_refresh_ends_the_loops_back_off(h: Harness) -> None:
    """Consul answers again: the loop need not wait out a long back-off."""
    h = Harness(retry_delay=lambda attempt: 60.0)
    h.agent.entries = [entry("chat-a")]
    h.start()
    h.clock.advance(0.05)
    h.http.down = True
    h.agent.drop()  # the loop backs off for 60 s
    h.http.down = False
    h.clock.advance(4.95)  # the refresh at t=5 answers
    assert h.instances.consul_reachable
    h.clock.advance(0)
    assert "index" not in h.agent.requests[-1][1]
    h.clock.advance(0.05)
    assert h.agent.requests[-1][1]["index"] == "10"


# --- metrics ----------------------------------------------------------------------------------


def test_metrics_count_instances_and_the_staleness_grows_during_an_outage(h: Harness) -> None:
    h.agent.entries = [entry("chat-a"), entry("chat-b")]
    assert h.metric("snet_chat_instances_healthy") == 0
    assert math.isnan(h.metric("snet_consul_staleness_seconds") or 0.0)
    h.clock.advance(100)
    h.start()
    assert h.metric("snet_chat_instances_healthy") == 2
    assert h.metric("snet_consul_staleness_seconds") == 0
    assert h.metric("snet_consul_reachable") == 1
    h.clock.advance(0.05)
    h.http.down = True
    h.agent.drop()
    h.clock.advance(7.0)
    assert h.instances.last_success == 100.0
    assert h.metric("snet_consul_staleness_seconds") == pytest.approx(7.05)
    assert h.metric("snet_consul_reachable") == 0
    assert h.metric("snet_chat_instances_healthy") == 2


def test_staleness_counts_from_the_start_before_the_first_answer(h: Harness) -> None:
    h.http.down = True
    h.start()
    h.clock.advance(4.0)
    assert h.instances.last_success is None
    assert h.metric("snet_consul_staleness_seconds") == 4.0


# --- subscribers ------------------------------------------------------------------------------


def test_subscribers_can_leave_and_a_failing_one_does_not_stop_the_others(
    h: Harness, logs: Sequence[LogEvent]
) -> None:
    def broken(_: object) -> None:
        raise RuntimeError("subscriber bug")

    got: list[int] = []
    h.instances.subscribe(broken)
    leave = h.instances.subscribe(lambda instances: got.append(len(instances)))
    h.agent.entries = [entry("chat-a")]
    h.start()
    leave()
    h.clock.advance(0.05)
    h.agent.change([entry("chat-b")])
    assert got == [1]
    assert len(h.seen) == 2
    assert any(e.get("log_failure") is not None for e in logs)


# --- stopping ---------------------------------------------------------------------------------


def test_stop_cancels_the_blocking_query_and_the_refresh_and_leaves_no_timer(h: Harness) -> None:
    h.agent.entries = [entry("chat-a")]
    h.agent.hold_reads = True
    h.start()  # the first read is held
    h.agent.hold_reads = False
    h.agent.release()
    h.clock.advance(0.05)  # the blocking query is held
    h.agent.hold_reads = True
    h.clock.advance(4.95)  # a refresh is held too
    assert len(h.agent.held) == 2
    count = len(h.agent.requests)
    result_of(h.instances.stopService())
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(100)
    assert len(h.agent.requests) == count
    assert h.ids() == ["chat-a"]


def test_stop_while_backing_off_cancels_the_retry(h: Harness) -> None:
    h.http.down = True
    h.start()
    assert h.clock.getDelayedCalls() != []
    result_of(h.instances.stopService())
    assert h.clock.getDelayedCalls() == []


def test_a_stopped_service_can_start_again(h: Harness) -> None:
    h.agent.entries = [entry("chat-a")]
    h.start()
    h.clock.advance(0.05)
    result_of(h.instances.stopService())
    h.agent.change([entry("chat-b")])
    h.start()
    assert h.ids() == ["chat-b"]
    result_of(h.instances.stopService())
    assert h.clock.getDelayedCalls() == []


# --- reading answers --------------------------------------------------------------------------


def test_entries_take_the_node_address_when_the_service_has_none() -> None:
    raw = entry("chat-a", address="")
    endpoints, problems = endpoints_from_health([raw])
    assert endpoints == (ChatEndpoint("chat-a", "192.168.0.1", 8080),)
    assert problems == []


def test_malformed_entries_are_skipped_and_described() -> None:
    bad_port = entry("chat-b", port=0)
    no_id = entry("")
    no_service = {"Node": {}, "Checks": []}
    endpoints, problems = endpoints_from_health([entry("chat-a"), bad_port, no_id, no_service, 7])
    assert [e.instance_id for e in endpoints] == ["chat-a"]
    assert len(problems) == 4
    assert endpoints_from_health({"not": "a list"})[0] == ()


def test_an_id_registered_on_two_nodes_is_told_apart_by_node() -> None:
    endpoints, _ = endpoints_from_health(
        [entry("chat", node="n2", address="10.0.0.2"), entry("chat", node="n1")]
    )
    assert [e.instance_id for e in endpoints] == ["chat@n1", "chat@n2"]


def test_a_malformed_entry_is_logged_once_while_it_stays(
    h: Harness, logs: Sequence[LogEvent]
) -> None:
    h.agent.entries = [entry("chat-a"), entry("chat-b", port=70000)]
    h.start()
    for _ in range(3):
        h.clock.advance(0.05)
        h.agent.change(h.agent.entries)
    assert h.ids() == ["chat-a"]
    assert len([m for m in messages(logs, LogLevel.warn) if "invalid port" in m]) == 1


def test_ipv6_endpoints_put_the_host_in_brackets() -> None:
    assert ChatEndpoint("x", "fd00::5", 8080).url == "http://[fd00::5]:8080"
    assert ChatEndpoint("x", "chat.local", 80).url == "http://chat.local:80"


# --- one fixed address ------------------------------------------------------------------------


def test_static_instances_hold_the_one_endpoint_of_their_url() -> None:
    static = StaticInstances("http://proxy.local:9000")
    assert static.instances == (ChatEndpoint("proxy.local:9000", "proxy.local", 9000),)
    static.startService()
    assert result_of(static.stopService()) is None
    static.subscribe(lambda _: None)()


@pytest.mark.parametrize(
    ("url", "endpoint", "base"),
    [
        ("http://10.0.0.1", ChatEndpoint("10.0.0.1:80", "10.0.0.1", 80), "http://10.0.0.1:80"),
        ("http://[::1]:8081/", ChatEndpoint("[::1]:8081", "::1", 8081), "http://[::1]:8081"),
    ],
)
def test_a_chat_url_gives_an_endpoint_named_host_port(
    url: str, endpoint: ChatEndpoint, base: str
) -> None:
    assert endpoint_from_url(url) == endpoint
    assert endpoint.url == base


@pytest.mark.parametrize(
    "url",
    ["https://chat:443", "chat:8080", "http://", "http://chat:99999", "http://chat:80/v1", "x"],
)
def test_bad_chat_urls_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError):
        endpoint_from_url(url)
