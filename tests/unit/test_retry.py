"""Retry policies: back-off, the retry budget and the limits of one call's retries."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from snet.retry import RetryBudget, RetryLimits, exponential_backoff

# --- back-off ---------------------------------------------------------------------------------


def test_backoff_doubles_up_to_the_maximum_without_jitter() -> None:
    """jitter() == 0.5 is the middle of the +-50% band: the bare exponential."""
    delay = exponential_backoff(initial=0.2, maximum=10.0, factor=2.0, jitter=lambda: 0.5)
    assert [delay(n) for n in range(1, 9)] == pytest.approx(
        [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10.0, 10.0]
    )
    assert delay(10_000) == 10.0


def test_backoff_jitter_spans_half_to_one_and_a_half_times_and_is_capped() -> None:
    low = exponential_backoff(jitter=lambda: 0.0)
    high = exponential_backoff(jitter=lambda: 0.999)
    assert low(1) == pytest.approx(0.1)
    assert high(1) == pytest.approx(0.2 * 1.499)
    assert low(20) == pytest.approx(5.0)
    assert high(20) == 10.0


def test_backoff_uses_the_injected_jitter_every_time() -> None:
    draws = iter([0.0, 1.0, 0.5])
    delay = exponential_backoff(initial=1.0, maximum=100.0, jitter=lambda: next(draws))
    assert [delay(1), delay(1), delay(1)] == [0.5, 1.5, 1.0]


# --- the retry budget -------------------------------------------------------------------------


def test_the_budget_allows_retries_as_a_share_of_recent_calls_plus_a_reserve() -> None:
    clock = Clock()
    budget = RetryBudget(clock=clock, ratio=0.2, min_per_second=0.5, window=10.0)
    assert budget.available() == 5
    for _ in range(100):
        budget.called()
    assert budget.available() == 25
    assert sum(budget.try_retry() for _ in range(30)) == 25
    assert not budget.try_retry()
    clock.advance(5.0)
    for _ in range(10):
        budget.called()
    assert budget.available() == 2
    clock.advance(5.0)  # the first 100 calls and 25 retries leave the window
    assert budget.available() == 7


def test_a_budget_must_make_sense() -> None:
    with pytest.raises(ValueError, match="retry budget"):
        RetryBudget(clock=Clock(), window=0.0)


# --- the limits of one call -------------------------------------------------------------------


def limits(
    clock: Clock, *, max_attempts: int = 3, deadline: float = 10.0, reserve: float = 1.0
) -> RetryLimits:
    """Limits whose budget is a reserve of *reserve* retries a second (over 10 s) alone."""
    budget = RetryBudget(clock=clock, ratio=0.0, min_per_second=reserve)
    return RetryLimits(clock=clock, max_attempts=max_attempts, deadline=deadline, budget=budget)


def test_a_call_counts_in_the_budget_and_its_deadline_starts_when_it_begins() -> None:
    clock = Clock()
    clock.advance(100.0)
    call_limits = RetryLimits(clock=clock, deadline=5.0)
    call = call_limits.begin()
    assert call.deadline == 105.0
    clock.advance(2.0)
    assert call.time_left() == 3.0
    # The default reserve (10 a second over 10 s) and 0.2 of the one call, rounded down.
    assert call_limits.budget.available() == 100


def test_a_failure_that_reached_a_server_may_not_repeat_an_unsafe_request() -> None:
    call = limits(Clock()).begin()
    assert call.stop(reached=True, repeatable=False) == "unsafe"


def test_attempts_that_reached_a_server_are_bounded() -> None:
    call = limits(Clock(), max_attempts=2).begin()
    assert call.stop(reached=True, repeatable=True) is None
    assert call.stop(reached=True, repeatable=True) == "attempts"
    assert call.attempts == 2


def test_attempts_that_never_reached_a_server_are_free() -> None:
    """No server did any work: neither an attempt nor a retry from the budget is spent."""
    clock = Clock()
    call = limits(clock, max_attempts=1, reserve=0.0).begin()
    for _ in range(5):
        assert call.stop(reached=False, repeatable=False) is None
        assert call.take(reached=False)
    assert call.attempts == 0
    assert not call.take(reached=True)


def test_no_retry_starts_once_the_deadline_has_passed() -> None:
    clock = Clock()
    call = limits(clock, deadline=5.0).begin()
    clock.advance(4.9)
    assert call.stop(reached=False, repeatable=True) is None
    clock.advance(0.1)
    assert call.stop(reached=False, repeatable=True) == "deadline"
    assert call.stop(reached=True, repeatable=True) == "deadline"


def test_the_attempts_bound_comes_before_the_deadline() -> None:
    clock = Clock()
    call = limits(clock, max_attempts=1, deadline=1.0).begin()
    clock.advance(2.0)
    assert call.stop(reached=True, repeatable=True) == "attempts"


def test_retries_of_failures_that_reached_a_server_come_from_the_shared_budget() -> None:
    """A reserve of 1 per second over 10 s: ten retries, shared by all calls."""
    clock = Clock()
    shared = limits(clock, reserve=1.0)
    first, second = shared.begin(), shared.begin()
    assert sum(first.take(reached=True) for _ in range(8)) == 8
    assert sum(second.take(reached=True) for _ in range(8)) == 2


def test_a_call_needs_at_least_one_attempt() -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryLimits(clock=Clock(), max_attempts=0)
