"""Waiting until something is true, the two ways tests need it.

``wait_until`` blocks its thread between checks: for process-level tests and benchmarks,
which drive real processes and servers from blocking code (never call it on the reactor
thread); ``timed`` makes it return when the condition became true. ``eventually`` yields to
the reactor between checks: for tests that run on the real reactor under pytest-twisted.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.task import deferLater

T = TypeVar("T")


def tail(path: Path, lines: int = 30) -> str:
    """The last *lines* lines of the text file at *path* ("" if it does not exist)."""
    try:
        with path.open(encoding="utf-8", errors="replace") as text:
            return "".join(deque(text, maxlen=lines))
    except FileNotFoundError:
        return ""


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float,
    what: str,
    *,
    interval: float = 0.05,
    log_path: Path | None = None,
    log_lines: int = 30,
) -> T:
    """Call *predicate* until it returns something true, and return that.

    For blocking code only (it sleeps between calls): never call it on the reactor thread.
    To know *when* the condition became true, wait on ``timed(check)``.

    :param what: what is awaited, for the error message ("Consul to elect a leader").
    :param log_path: a log whose tail the error message includes.
    :raises TimeoutError: if *timeout* seconds pass first. Exceptions from *predicate* are
        not caught: a predicate that can fail for a while must catch them itself.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            message = f"timed out after {timeout:g}s waiting for {what}"
            if log_path is not None:
                message += f"\n--- last lines of {log_path} ---\n{tail(log_path, log_lines)}"
            raise TimeoutError(message)
        time.sleep(interval)


def timed(check: Callable[[], object]) -> Callable[[], float | None]:
    """*check* as a predicate for ``wait_until`` that returns the ``time.monotonic()`` at
    which the call that found it true started (so the moment is not late by the call's own
    duration), and None while it is false."""

    def started_at() -> float | None:
        at = time.monotonic()
        return at if check() else None

    return started_at


def sleep(seconds: float) -> Deferred[None]:
    """A Deferred that fires after *seconds* of real time, without blocking the reactor."""
    from twisted.internet import reactor

    return deferLater(reactor, seconds, lambda: None)


@inlineCallbacks
def eventually(
    check: Callable[[], bool | Deferred[bool]],
    timeout: float,
    what: str,
    interval: float = 0.01,
) -> Generator[Deferred[Any], Any, None]:
    """Poll *check* (a bool or a Deferred of one) until it is true; fail after *timeout* s.

    For tests on the real reactor: it waits with ``sleep``, so the reactor keeps running. An
    exception from *check* counts as "not yet" until the time is up.
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
    from twisted.internet import reactor

    found: list[object] = []
    for selectable in {*reactor.getReaders(), *reactor.getWriters()}:
        peer = getattr(selectable, "getPeer", None)
        if peer is not None and getattr(peer(), "port", None) == port:
            found.append(selectable)
    return found
