"""Test support that ships with the package: real-server harnesses and small helpers."""

from __future__ import annotations

from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


def result_of(d: Deferred[T]) -> T:
    """The result a Deferred already has, like trial's ``successResultOf``.

    Unit tests drive fake time and in-memory HTTP by hand, so the Deferred must have fired;
    a failure is raised as its exception so that pytest shows it.
    """
    results: list[T | Failure] = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError(f"{d!r} has not fired")
    result = results[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def failure_of(d: Deferred[Any]) -> Failure:
    """The Failure a Deferred already has, like trial's ``failureResultOf``."""
    results: list[object] = []
    d.addBoth(results.append)
    if not results:
        raise AssertionError(f"{d!r} has not fired")
    if not isinstance(results[0], Failure):
        raise AssertionError(f"{d!r} succeeded with {results[0]!r}")
    return results[0]
