"""Retry policies: functions from an attempt number to the delay before the next attempt.

Everything in snet that retries (Consul registration, discovery, schema application) takes
such a policy, so tests can pass a fixed one and production a jittered one.
"""

from __future__ import annotations

import random
from collections.abc import Callable


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
