"""Waiting on the real reactor, for integration tests that run under pytest-twisted."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.task import deferLater


def sleep(seconds: float) -> Deferred[None]:
    """A Deferred that fires after *seconds* of real time, without blocking the reactor."""
    return deferLater(reactor, seconds, lambda: None)


@inlineCallbacks
def eventually(
    check: Callable[[], bool | Deferred[bool]],
    timeout: float,
    what: str,
    interval: float = 0.01,
) -> Generator[Deferred[Any], Any, None]:
    """Poll *check* (a bool or a Deferred of one) until it is true; fail after *timeout* s.

    An exception from *check* counts as "not yet" until the time is up.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (yield maybeDeferred(check)):
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        yield sleep(interval)


def connections_to(port: int) -> list[object]:
    """The reactor's sockets connected to *port* (to check that a client closed its pool)."""
    found: list[object] = []
    for selectable in {*reactor.getReaders(), *reactor.getWriters()}:
        peer = getattr(selectable, "getPeer", None)
        if peer is not None and getattr(peer(), "port", None) == port:
            found.append(selectable)
    return found
