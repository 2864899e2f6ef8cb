"""RoundRobin: exact rotation over a stable list, and fairness while the list changes."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snet.server.discovery import ChatEndpoint, StaticInstances
from snet.server.gateway import NoChatInstance
from snet.server.roundrobin import RoundRobin, random_start


class ListSource:
    """An instance source whose list the test sets (in any order: RoundRobin sorts)."""

    def __init__(self, ids: list[str] | None = None) -> None:
        self.instances: tuple[ChatEndpoint, ...] = ()
        self.set(ids or [])

    def set(self, ids: list[str]) -> None:
        self.instances = tuple(endpoint(i) for i in ids)

    def subscribe(
        self, callback: Callable[[tuple[ChatEndpoint, ...]], object]
    ) -> Callable[[], None]:
        return lambda: None


def endpoint(instance_id: str) -> ChatEndpoint:
    return ChatEndpoint(instance_id, "10.0.0.1", 8000 + (hash(instance_id) % 1000))


def ids(picks: list[ChatEndpoint]) -> list[str]:
    return [e.instance_id for e in picks]


def test_picks_go_round_in_id_order() -> None:
    balancer = RoundRobin(ListSource(["c", "a", "b"]))
    assert ids([balancer.next() for _ in range(7)]) == ["a", "b", "c", "a", "b", "c", "a"]


def test_an_empty_list_raises_no_chat_instance() -> None:
    balancer = RoundRobin(ListSource([]))
    with pytest.raises(NoChatInstance):
        balancer.next()
    with pytest.raises(NoChatInstance):
        balancer.candidates()


def test_candidates_list_every_instance_once_from_the_next_one() -> None:
    """candidates() starts with the instance next() would give and counts as one pick."""
    balancer = RoundRobin(ListSource(["a", "b", "c"]))
    assert ids(balancer.candidates()) == ["a", "b", "c"]
    assert ids(balancer.candidates()) == ["b", "c", "a"]
    assert balancer.next().instance_id == "c"
    assert ids(balancer.candidates()) == ["a", "b", "c"]


def test_a_new_instance_joins_the_rotation_where_its_id_sorts() -> None:
    source = ListSource(["a", "c"])
    balancer = RoundRobin(source)
    assert balancer.next().instance_id == "a"
    source.set(["a", "b", "c"])
    assert ids([balancer.next() for _ in range(4)]) == ["b", "c", "a", "b"]


def test_removing_the_last_chosen_instance_goes_on_with_the_one_after_it() -> None:
    """Not back to the first instance, which a reset to position 0 would favour."""
    source = ListSource(["a", "b", "c", "d"])
    balancer = RoundRobin(source)
    assert ids([balancer.next(), balancer.next()]) == ["a", "b"]
    source.set(["a", "c", "d"])
    assert ids([balancer.next() for _ in range(4)]) == ["c", "d", "a", "c"]


def test_a_static_source_always_gives_its_endpoint() -> None:
    balancer = RoundRobin(StaticInstances("http://proxy:9000"))
    assert {balancer.next().url for _ in range(3)} == {"http://proxy:9000"}


instance_ids = st.lists(st.text("abcdefgh", min_size=1, max_size=3), unique=True, max_size=8)


@given(ids_=instance_ids.filter(bool), rounds=st.integers(0, 20), start=st.integers(0, 20))
def test_n_times_k_picks_from_any_state_pick_each_instance_k_times(
    ids_: list[str], rounds: int, start: int
) -> None:
    """Property: with a stable list of N instances, after any number of earlier picks, the
    next N*k picks choose each instance exactly k times."""
    balancer = RoundRobin(ListSource(ids_))
    for _ in range(start):
        balancer.next()
    counts = Counter(balancer.next().instance_id for _ in range(len(ids_) * rounds))
    assert all(counts[i] == rounds for i in ids_)


@given(ids_=instance_ids.filter(bool), picks=st.integers(0, 60))
def test_any_number_of_picks_from_a_stable_list_differs_by_at_most_one(
    ids_: list[str], picks: int
) -> None:
    """Property: with a stable list, m picks give every instance floor(m/N) or ceil(m/N)."""
    balancer = RoundRobin(ListSource(ids_))
    counts = Counter(balancer.next().instance_id for _ in range(picks))
    assert {counts[i] for i in ids_} <= {picks // len(ids_), -(-picks // len(ids_))}


# A run: the list is set, then a series of steps, each a pick (None) or a new list.
steps = st.lists(st.one_of(st.none(), instance_ids), max_size=60)


@given(first=instance_ids, steps=steps)
def test_instances_listed_throughout_any_window_are_picked_equally_within_one(
    first: list[str], steps: list[list[str] | None]
) -> None:
    """Property, with changes: for every window of consecutive picks (changes of the list
    in between allowed), the instances that were in the list at every pick of the window
    were each picked k or k + 1 times, for some k. An empty list raises NoChatInstance."""
    source = ListSource(first)
    balancer = RoundRobin(source)
    history: list[tuple[str, frozenset[str]]] = []  # (picked id, ids listed at that pick)
    for step in steps:
        if step is not None:
            source.set(step)
            continue
        listed = frozenset(e.instance_id for e in source.instances)
        if not listed:
            with pytest.raises(NoChatInstance):
                balancer.next()
            continue
        picked = balancer.next().instance_id
        assert picked in listed
        history.append((picked, listed))
    for begin in range(len(history)):
        counts: Counter[str] = Counter()
        present = history[begin][1]
        for picked, listed in history[begin:]:
            counts[picked] += 1
            present = present & listed
            if present:
                window = [counts[i] for i in present]
                assert max(window) - min(window) <= 1, (history, begin)


@given(ids_=instance_ids.filter(bool), before=st.integers(0, 10))
def test_candidates_are_a_rotation_of_the_sorted_list(ids_: list[str], before: int) -> None:
    """Property: candidates() is the sorted list rotated to start at the next pick."""
    balancer = RoundRobin(ListSource(ids_))
    for _ in range(before):
        balancer.next()
    expected_first = RoundRobin(ListSource(ids_))
    for _ in range(before):
        expected_first.next()
    first = expected_first.next().instance_id
    ordered = sorted(ids_)
    start = ordered.index(first)
    assert ids(balancer.candidates()) == ordered[start:] + ordered[:start]


@given(
    ids_=instance_ids.filter(bool),
    dead=st.sets(st.text("abcdefgh", min_size=1, max_size=3)),
    calls=st.integers(0, 60),
)
def test_calls_that_skip_unreachable_instances_go_round_the_others(
    ids_: list[str], dead: set[str], calls: int
) -> None:
    """Property: when the client takes the first reachable candidate and says so with
    skipped_to, the reachable instances serve m calls floor(m/R) or ceil(m/R) times each."""
    alive = [i for i in ids_ if i not in dead]
    balancer = RoundRobin(ListSource(ids_))
    served: Counter[str] = Counter()
    for _ in range(calls):
        candidates = balancer.candidates()
        reachable = [e for e in candidates if e.instance_id not in dead]
        if not reachable:
            continue
        balancer.skipped_to(candidates[0], reachable[0])
        served[reachable[0].instance_id] += 1
    if alive:
        assert {served[i] for i in alive} <= {calls // len(alive), -(-calls // len(alive))}


def test_skipped_to_leaves_the_rotation_alone_when_another_pick_came_in_between() -> None:
    balancer = RoundRobin(ListSource(["a", "b", "c"]))
    first = balancer.candidates()
    assert balancer.next().instance_id == "b"  # a concurrent call
    balancer.skipped_to(first[0], first[2])
    assert balancer.next().instance_id == "c"


def test_after_gives_the_next_instance_not_yet_tried_without_moving_the_rotation() -> None:
    balancer = RoundRobin(ListSource(["a", "b", "c", "d"]))
    assert balancer.after(endpoint("b")) == endpoint("c")
    assert balancer.after(endpoint("d")) == endpoint("a")
    assert balancer.after(endpoint("b"), exclude={"c", "d"}) == endpoint("a")
    assert balancer.after(endpoint("b"), exclude={"a", "c", "d"}) is None
    assert balancer.next().instance_id == "a"


def test_after_goes_on_from_an_instance_no_longer_listed() -> None:
    source = ListSource(["a", "b", "c"])
    balancer = RoundRobin(source)
    source.set(["a", "c"])
    assert balancer.after(endpoint("b")) == endpoint("c")
    source.set([])
    assert balancer.after(endpoint("b")) is None


def test_without_a_passive_health_failures_eject_nobody() -> None:
    balancer = RoundRobin(ListSource(["a", "b"]))
    for _ in range(10):
        balancer.failed(endpoint("a"), "refused")
    balancer.succeeded(endpoint("b"))
    assert ids([balancer.next() for _ in range(4)]) == ["a", "b", "a", "b"]
    assert not balancer.panic


def test_a_start_function_picks_where_the_rotation_begins() -> None:
    balancer = RoundRobin(ListSource(["c", "a", "b"]), start=lambda count: count - 1)
    assert ids([balancer.next() for _ in range(4)]) == ["c", "a", "b", "c"]


def test_random_start_is_an_index_below_the_count() -> None:
    assert {random_start(3) for _ in range(200)} == {0, 1, 2}
    assert random_start(1) == 0


@given(
    ids_=instance_ids.filter(bool),
    starts=st.lists(st.integers(0, 1000), min_size=1, max_size=6),
    order=st.lists(st.integers(0, 5), max_size=200),
)
def test_monoliths_that_start_anywhere_spread_within_their_number(
    ids_: list[str], starts: list[int], order: list[int]
) -> None:
    """Several monoliths, each with its own balancer starting at its own position, whose
    picks interleave in any order: over all their picks together, the instances' counts
    differ by at most the number of monoliths."""
    source = ListSource(ids_)
    balancers = [RoundRobin(source, start=lambda count, s=s: s) for s in starts]
    counts = Counter({i: 0 for i in ids_})
    for turn in order:
        counts[balancers[turn % len(balancers)].next().instance_id] += 1
    assert max(counts.values()) - min(counts.values()) <= len(balancers)
