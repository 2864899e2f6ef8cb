"""Draining: ``InFlight`` counts the requests being answered, so that a stopping service can
close keep-alive connections after their response and wait, bounded, for the rest."""

from __future__ import annotations

from attrs import define, field
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from snet.web.requests import notify_finish, set_header

log = Logger(namespace="snet.web")


@define
class InFlight:
    """The requests being answered now, so that a stopping service can wait for them.

    ``begin(request)`` counts a request until it finishes (or its client goes away). After
    ``start_draining()`` every response says ``Connection: close`` and the connection is
    closed after it, so keep-alive clients move to another instance.
    """

    _requests: set[IRequest] = field(factory=set, init=False)
    _waiters: list[Deferred[int]] = field(factory=list, init=False)
    draining: bool = field(default=False, init=False)

    @property
    def count(self) -> int:
        """How many requests are in flight."""
        return len(self._requests)

    def begin(self, request: IRequest) -> None:
        """Count *request* until it finishes."""
        self._requests.add(request)
        if self.draining:
            _close_after(request)
        notify_finish(request).addBoth(self._end, request)

    def _end(self, result: object, request: IRequest) -> None:
        self._requests.discard(request)
        if not self._requests:
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(0)

    def start_draining(self) -> None:
        """From now on, close every connection after its response."""
        self.draining = True
        for request in self._requests:
            _close_after(request)

    def drained(self, timeout: float, clock: IReactorTime) -> Deferred[int]:
        """Fire with 0 once no request is in flight, or after *timeout* seconds with the
        number still in flight (and log it)."""
        if not self._requests:
            return defer.succeed(0)
        waiter: Deferred[int] = Deferred()
        self._waiters.append(waiter)
        delayed: IDelayedCall | None = None

        def give_up() -> None:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                left = self.count
                log.warn(
                    "drain timed out after {timeout}s with {in_flight} requests in flight",
                    timeout=timeout,
                    in_flight=left,
                )
                waiter.callback(left)

        def cancel_timer(result: int) -> int:
            if delayed is not None and delayed.active():
                delayed.cancel()
            return result

        delayed = clock.callLater(timeout, give_up)
        waiter.addCallback(cancel_timer)
        return waiter


def _close_after(request: IRequest) -> None:
    """Say ``Connection: close`` on *request*'s response and close the connection after it."""
    if getattr(request, "startedWriting", False):
        return
    set_header(request, b"Connection", b"close")
    channel = getattr(request, "channel", None)
    if channel is not None and hasattr(channel, "persistent"):
        channel.persistent = False
