"""Retry policies: when to try again, and how long to wait before it.

- **Back-off.** :func:`exponential_backoff` makes a function from an attempt number to the
  delay before the next attempt. Everything in snet that retries after a wait (Consul
  registration, discovery, schema application, ejection) takes such a function, so tests
  can pass a fixed one and production a jittered one.
- **Retries of calls.** :class:`RetryLimits` says whether a call that failed on one server
  may be tried on another at once (the monolith's dialog calls): at most ``max_attempts``
  attempts that reached a server, never a repeat of a request that is not safe to repeat,
  nothing after the call's deadline, and within a :class:`RetryBudget` shared by all calls.
  Attempts that never reached a server (refused, connect timeout) are free: no server did
  any work, so they count neither as attempts nor against the budget.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Callable

from twisted.internet.interfaces import IReactorTime

__all__ = ["CallRetries", "RetryBudget", "RetryLimits", "exponential_backoff"]


def exponential_backoff(
    initial: float = 0.2,
    maximum: float = 10.0,
    factor: float = 2.0,
    jitter: Callable[[], float] = random.random,
) -> Callable[[int], float]:
    """A retry policy: the delay before the attempt that follows failed attempt *n* (from 1).

    The delay grows as ``initial * factor ** (n - 1)``, then gets +-50% jitter
    (``jitter()`` returns a number in [0, 1): 0 halves the delay, 0.5 keeps it, 1 makes it
    half as long again), and never exceeds *maximum*. Half-width jitter rather than full
    jitter keeps a retry from ever firing at once after a failure.
    """

    def delay(attempt: int) -> float:
        exponent = min(max(attempt, 1) - 1, 64)
        base = min(maximum, initial * factor**exponent)
        return min(maximum, base * (0.5 + jitter()))

    return delay


class RetryBudget:
    """How many retries the calls may make: a share of recent calls, plus a reserve.

    Like Finagle's ``RetryBudget``: over the last *window* seconds, retries may number at
    most ``ratio`` times the calls made plus ``min_per_second * window`` (the reserve, so
    that a lightly used client still retries). When a fleet fails as a whole, the retries
    thus add at most ``ratio`` to its load instead of multiplying it by ``max_attempts``.
    The window slides in tenths (*buckets*), driven by *clock*.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        ratio: float = 0.2,
        min_per_second: float = 10.0,
        window: float = 10.0,
        buckets: int = 10,
    ) -> None:
        if ratio < 0 or min_per_second < 0 or window <= 0 or buckets < 1:
            raise ValueError("invalid retry budget")
        self._clock = clock
        self.ratio = ratio
        self.reserve = min_per_second * window
        self._width = window / buckets
        self._buckets = buckets
        # [bucket number, calls, retries], oldest first.
        self._counts: deque[list[int]] = deque()
        self._calls = 0
        self._retries = 0

    def _bucket(self) -> list[int]:
        number = int(self._clock.seconds() // self._width)
        while self._counts and self._counts[0][0] <= number - self._buckets:
            _, calls, retries = self._counts.popleft()
            self._calls -= calls
            self._retries -= retries
        if not self._counts or self._counts[-1][0] != number:
            self._counts.append([number, 0, 0])
        return self._counts[-1]

    def available(self) -> int:
        """How many retries may start now."""
        self._bucket()
        return max(0, math.floor(self.reserve + self.ratio * self._calls - self._retries))

    def called(self) -> None:
        """A call began (its first attempt)."""
        self._bucket()[1] += 1
        self._calls += 1

    def try_retry(self) -> bool:
        """Take one retry from the budget; False (and nothing taken) if none is left."""
        if self.available() < 1:
            return False
        self._bucket()[2] += 1
        self._retries += 1
        return True


class RetryLimits:
    """How far the calls of one client may retry (see the module docstring).

    *deadline* is each call's time end to end, in seconds; *max_attempts* (at least 1) bounds
    a call's attempts that reached a server; *budget* (by default a :class:`RetryBudget` on
    *clock*) bounds the retries of all calls together.
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        max_attempts: int = 3,
        deadline: float = 10.0,
        budget: RetryBudget | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self._clock = clock
        self.max_attempts = max_attempts
        self.deadline = deadline
        self.budget = budget if budget is not None else RetryBudget(clock=clock)

    def begin(self) -> CallRetries:
        """A call begins: its deadline starts now, and it counts in the budget."""
        self.budget.called()
        return CallRetries(self, self._clock, self._clock.seconds() + self.deadline)


class CallRetries:
    """The retries of one call, made by :meth:`RetryLimits.begin`.

    After an attempt fails, ask :meth:`stop` whether the call must end (and why); if not, find
    the next server, then ask :meth:`take` whether the budget allows the retry. The causes,
    checked in this order: ``unsafe`` (a request that reached a server and may not be
    repeated), ``attempts``, ``deadline``; then (the caller's) no server left; then ``budget``.
    """

    def __init__(self, limits: RetryLimits, clock: IReactorTime, deadline: float) -> None:
        self._limits = limits
        self._clock = clock
        self.deadline = deadline
        """The clock time after which no attempt starts."""
        self.attempts = 0
        """Attempts so far that reached a server."""

    def time_left(self) -> float:
        """Seconds until the deadline (negative once it passed)."""
        return self.deadline - self._clock.seconds()

    def stop(self, *, reached: bool, repeatable: bool) -> str | None:
        """Why the call must end after an attempt that failed, or None if it may go on.

        *reached*: whether the attempt got to a server (if not, it is free); *repeatable*:
        whether the request may be sent again after it reached one.
        """
        if reached:
            self.attempts += 1
            if not repeatable:
                return "unsafe"
            if self.attempts >= self._limits.max_attempts:
                return "attempts"
        if self.time_left() <= 0:
            return "deadline"
        return None

    def take(self, *, reached: bool) -> bool:
        """Take the retry that follows a failed attempt from the budget (free when the attempt
        did not reach a server); False if the budget has none left."""
        return not reached or self._limits.budget.try_retry()
