"""Passive health: instances that fail calls leave the rotation for a growing back-off."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, capturedLogs

from snet.server.discovery import ChatEndpoint, Instances
from snet.server.ejection import PassiveHealth
from snet.server.roundrobin import RoundRobin


class ListSource:
    """An instance source whose list the test sets; tells its subscribers, as Consul's does."""

    def __init__(self, ids: list[str]) -> None:
        self.instances: Instances = ()
        self._subscribers: list[Callable[[Instances], object]] = []
        self.set(ids)

    def set(self, ids: list[str]) -> None:
        self.instances = tuple(ChatEndpoint(i, "10.0.0.1", 8000) for i in ids)
        for callback in self._subscribers:
            callback(self.instances)

    def subscribe(self, callback: Callable[[Instances], object]) -> Callable[[], None]:
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)


def endpoint(instance_id: str) -> ChatEndpoint:
    return ChatEndpoint(instance_id, "10.0.0.1", 8000)


def make(
    ids: list[str], eject_after: int = 3, registry: CollectorRegistry | None = None
) -> tuple[Clock, PassiveHealth, ListSource, RoundRobin]:
    clock = Clock()
    health = PassiveHealth(clock=clock, consecutive_failures=eject_after, registry=registry)
    source = ListSource(ids)
    return clock, health, source, RoundRobin(source, health=health)


def picks(balancer: RoundRobin, n: int) -> list[str]:
    return [balancer.next().instance_id for _ in range(n)]


@pytest.fixture
def logs() -> Iterator[Sequence[LogEvent]]:
    with capturedLogs() as events:
        yield events


# --- when an instance is ejected --------------------------------------------------------------


def test_an_instance_is_ejected_after_n_failures_in_a_row() -> None:
    clock = Clock()
    health = PassiveHealth(clock=clock, consecutive_failures=3)
    health.failed("a", "timeout")
    health.failed("a", "server_error")
    assert not health.ejected("a")
    health.failed("a", "lost")
    assert health.ejected("a")
    assert health.ejected_until("a") == 1.0


def test_a_success_between_failures_starts_the_count_again() -> None:
    health = PassiveHealth(clock=Clock(), consecutive_failures=3)
    for _ in range(3):
        health.failed("a", "timeout")
        health.failed("a", "timeout")
        health.succeeded("a")
    assert not health.ejected("a")


def test_a_refused_connection_ejects_at_once() -> None:
    """Refusing means nothing listens: the process is gone or stopping."""
    health = PassiveHealth(clock=Clock(), consecutive_failures=3)
    health.failed("a", "refused")
    assert health.ejected("a")


def test_failures_while_ejected_neither_count_nor_extend_the_ejection() -> None:
    """Attempts that were already in flight when the instance was ejected."""
    clock = Clock()
    health = PassiveHealth(clock=clock, consecutive_failures=1)
    health.failed("a", "timeout")
    clock.advance(0.5)
    for _ in range(5):
        health.failed("a", "timeout")
    assert health.ejected_until("a") == 1.0
    assert health.ejection_count("a") == 1


# --- back-off -------------------------------------------------------------------------------------


def test_the_ejection_doubles_each_time_up_to_30_seconds() -> None:
    """Back from an ejection, an instance is on probation: its first failure ejects it again."""
    clock = Clock()
    health = PassiveHealth(clock=clock, consecutive_failures=3)
    for _ in range(3):
        health.failed("a", "timeout")
    durations = []
    for _ in range(7):
        until = health.ejected_until("a")
        assert until is not None
        durations.append(until - clock.seconds())
        clock.advance(until - clock.seconds())
        assert not health.ejected("a")
        health.failed("a", "timeout")
    assert durations == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_success_after_an_ejection_ends_the_probation() -> None:
    clock = Clock()
    health = PassiveHealth(clock=clock, consecutive_failures=3)
    health.failed("a", "refused")
    clock.advance(1.0)
    health.succeeded("a")
    health.failed("a", "timeout")
    health.failed("a", "timeout")
    assert not health.ejected("a")
    health.failed("a", "timeout")
    assert health.ejected_until("a") == clock.seconds() + 2.0


def test_the_ejection_count_decays_by_one_per_healthy_interval() -> None:
    clock = Clock()
    health = PassiveHealth(clock=clock, consecutive_failures=1, decay_interval=10.0)
    for seconds in (1.0, 2.0, 4.0, 8.0):
        health.failed("a", "timeout")
        assert health.ejected_until("a") == clock.seconds() + seconds
        clock.advance(seconds)
    assert health.ejection_count("a") == 4
    clock.advance(22.0)  # back for 22 s: two intervals of 10 s take two off the count
    assert health.ejection_count("a") == 2
    health.failed("a", "timeout")
    assert health.ejection_count("a") == 3
    assert health.ejected_until("a") == clock.seconds() + 4.0
    clock.advance(4.0 + 1000.0)
    assert health.ejection_count("a") == 0
    health.failed("a", "timeout")
    assert health.ejected_until("a") == clock.seconds() + 1.0


def test_the_back_off_is_a_policy() -> None:
    clock = Clock()
    health = PassiveHealth(clock=clock, consecutive_failures=1, backoff=lambda n: 5.0 * n)
    health.failed("a", "timeout")
    clock.advance(5.0)
    health.failed("a", "timeout")
    assert health.ejected_until("a") == 15.0


def test_at_least_one_failure_is_needed() -> None:
    with pytest.raises(ValueError, match="consecutive_failures"):
        PassiveHealth(clock=Clock(), consecutive_failures=0)


# --- the rotation -----------------------------------------------------------------------------


def test_an_ejected_instance_leaves_the_rotation_and_comes_back_after_its_back_off() -> None:
    clock, health, _, balancer = make(["a", "b", "c"])
    health.failed("b", "refused")
    assert picks(balancer, 6) == ["a", "c"] * 3
    clock.advance(1.0)
    assert picks(balancer, 6) == ["a", "b", "c"] * 2


def test_round_robin_stays_exact_among_the_instances_in_good_standing() -> None:
    """An ejection mid-rotation does not reset or favour anyone."""
    _clock, health, _, balancer = make(["a", "b", "c", "d"])
    assert picks(balancer, 2) == ["a", "b"]
    health.failed("c", "refused")
    assert picks(balancer, 6) == ["d", "a", "b"] * 2
    assert [e.instance_id for e in balancer.candidates()] == ["d", "a", "b"]


def test_when_every_instance_is_ejected_traffic_goes_to_all_of_them(
    logs: Sequence[LogEvent],
) -> None:
    """Panic mode, like Envoy's: sending to instances that may have recovered beats failing."""
    clock, health, _, balancer = make(["a", "b", "c"])
    health.failed("a", "refused")
    health.failed("b", "refused")
    assert picks(balancer, 2) == ["c", "c"]
    assert not balancer.panic
    health.failed("c", "refused")
    assert picks(balancer, 6) == ["a", "b", "c"] * 2
    assert balancer.panic
    assert health.ejected_ids() == {"a", "b", "c"}
    clock.advance(1.0)
    picks(balancer, 1)
    assert not balancer.panic
    messages = [e["log_format"] for e in logs if e.get("log_namespace") == "snet.server.roundrobin"]
    assert len(messages) == 2 and "panic mode" in messages[0]
    assert [e["log_level"] for e in logs if e.get("log_namespace") == "snet.server.roundrobin"] == [
        LogLevel.warn,
        LogLevel.info,
    ]


def test_an_ejected_instance_that_consul_removes_is_forgotten_and_comes_back_clean() -> None:
    clock, health, source, balancer = make(["a", "b"])
    health.failed("a", "refused")
    clock.advance(1.0)
    health.failed("a", "refused")
    assert health.ejection_count("a") == 2
    source.set(["b"])
    assert health.ejection_count("a") == 0
    source.set(["a", "b"])
    assert picks(balancer, 2) == ["a", "b"]
    health.failed("a", "refused")
    assert health.ejected_until("a") == clock.seconds() + 1.0


def test_a_list_read_at_a_pick_forgets_removed_instances_too() -> None:
    """A source that does not call its subscribers (a fixed one) is still followed."""
    _clock, health, source, balancer = make(["a", "b"])
    health.failed("a", "refused")
    source.instances = (endpoint("b"),)  # changed behind the subscribers' back
    assert picks(balancer, 1) == ["b"]
    assert health.ejected_ids() == frozenset()


def test_failures_of_an_instance_no_longer_listed_are_not_remembered() -> None:
    _clock, _health, source, balancer = make(["a", "b"], eject_after=1)
    source.set(["b"])
    balancer.failed(endpoint("a"), "timeout")
    source.set(["a", "b"])
    assert picks(balancer, 2) == ["a", "b"]


def test_after_gives_the_next_instance_in_good_standing_not_yet_tried() -> None:
    _clock, health, _, balancer = make(["a", "b", "c", "d"])
    health.failed("c", "refused")
    assert balancer.after(endpoint("b")) == endpoint("d")
    assert balancer.after(endpoint("d"), exclude={"a"}) == endpoint("b")
    assert balancer.after(endpoint("a"), exclude={"b", "d"}) is None


# --- metrics --------------------------------------------------------------------------------------


def test_metrics_count_ejections_and_the_instances_ejected_now() -> None:
    registry = CollectorRegistry()
    clock, health, _, _ = make(["a", "b"], registry=registry)
    health.failed("a", "refused")
    for _ in range(3):
        health.failed("b", "timeout")

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("snet_chat_instances_ejected") == 2
    assert sample("snet_chat_ejections_total", instance="a", reason="refused") == 1
    assert sample("snet_chat_ejections_total", instance="b", reason="timeout") == 1
    clock.advance(1.0)
    assert sample("snet_chat_instances_ejected") == 0


def test_an_ejection_is_logged_with_its_instance_duration_and_reason(
    logs: Sequence[LogEvent],
) -> None:
    _clock, health, _, _ = make(["a"])
    health.failed("a", "refused")
    (event,) = [e for e in logs if e.get("log_namespace") == "snet.server.ejection"]
    assert (event["instance"], event["seconds"], event["reason"]) == ("a", 1.0, "refused")
    assert event["log_level"] == LogLevel.warn


# --- fairness (properties) --------------------------------------------------------------------

ids_strategy = st.lists(st.sampled_from("abcdefgh"), unique=True, min_size=1, max_size=8)


@given(ids_=ids_strategy, ejected=st.sets(st.sampled_from("abcdefgh")), rounds=st.integers(0, 8))
def test_n_times_k_picks_give_each_instance_in_good_standing_k_picks(
    ids_: list[str], ejected: set[str], rounds: int
) -> None:
    """Property: with R instances in good standing, R*k picks choose each of them exactly k
    times and never an ejected one; if all are ejected (panic), all of them k times."""
    _, health, _, balancer = make(ids_)
    for instance_id in ejected:
        health.failed(instance_id, "refused")
    good = [i for i in ids_ if i not in ejected] or ids_
    counts = Counter(picks(balancer, len(good) * rounds))
    assert set(counts) <= set(good)
    assert all(counts[i] == rounds for i in good)


# A run: steps that pick, eject an instance, or let time pass.
steps_strategy = st.lists(
    st.one_of(
        st.just(("pick", "")),
        st.tuples(st.just("eject"), st.sampled_from("abcdef")),
        st.tuples(st.just("wait"), st.sampled_from(["0.5", "1", "3"])),
    ),
    max_size=80,
)


@given(ids_=st.lists(st.sampled_from("abcdef"), unique=True, min_size=1), steps=steps_strategy)
def test_instances_in_good_standing_throughout_a_window_are_picked_equally_within_one(
    ids_: list[str], steps: list[tuple[str, str]]
) -> None:
    """Property: whatever ejections come and go, over every window of consecutive picks the
    instances in good standing at every pick of the window were each picked k or k + 1
    times, and no pick went to an ejected instance unless all were ejected."""
    clock, health, _, balancer = make(ids_)
    history: list[tuple[str, frozenset[str]]] = []
    for action, argument in steps:
        if action == "eject":
            health.failed(argument, "refused")
        elif action == "wait":
            clock.advance(float(argument))
        else:
            good = frozenset(ids_) - health.ejected_ids()
            picked = balancer.next().instance_id
            assert picked in (good or frozenset(ids_))
            history.append((picked, good))
    for begin in range(len(history)):
        counts: Counter[str] = Counter()
        present = history[begin][1]
        for picked, good in history[begin:]:
            counts[picked] += 1
            present = present & good
            if present:
                window = [counts[i] for i in present]
                assert max(window) - min(window) <= 1, (history, begin)
