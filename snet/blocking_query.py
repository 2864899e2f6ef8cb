"""One blocking-query loop on a Consul endpoint, following Consul's rules for blocking clients.

:class:`BlockingQuery` calls *fetch(index)* again and again and hands every answer to
*apply*: the first call (and the first after a failure) does not block, an index that goes
backwards starts the loop afresh, an index below 1 is never waited on, calls are at least
``min_interval`` seconds apart (so that an index that changes all the time cannot make the
loop spin), and failures are retried after the ``retry_delay`` policy. Timeouts are the
client's: ``TreqConsul`` gives a blocking call ``wait + wait/16`` on top of its own. An outage
and the recovery are each logged once.

The Connect certificate watcher runs two of these; the chat instance list
(``snet.server.discovery``) still has a loop of its own with the same rules, plus ordering
against its periodic refresh.
"""

from __future__ import annotations

from collections.abc import Callable

import consul
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from snet.consul import ConsulUnavailable

__all__ = ["BlockingQuery", "Fetch"]

log = Logger()

Fetch = Callable[[int], "Deferred[tuple[int, object]]"]


def _describe(failure: Failure) -> str:
    error = failure.value
    if error is None:
        return failure.getErrorMessage()
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class BlockingQuery:
    """One blocking-query loop: *fetch(index)* again and again, *apply* every answer.

    *fetch(0)* must answer at once; *fetch(n)* for n > 0 may wait for a change after index
    n. An answer is ``(index, body)``. *apply(body)* may raise ValueError (an unusable
    answer): that counts as a failure and is retried like one. ``healthy`` is whether the
    last call brought a usable answer.
    """

    def __init__(
        self,
        what: str,
        fetch: Fetch,
        apply: Callable[[object], None],
        *,
        clock: IReactorTime,
        retry_delay: Callable[[int], float],
        min_interval: float,
    ) -> None:
        self.what = what
        self._fetch = fetch
        self._apply = apply
        self._clock = clock
        self._retry_delay = retry_delay
        self._min_interval = min_interval
        self.healthy = False
        self.failures = 0
        self._index = 0
        self._running = False
        self._sent_at: float | None = None
        self._timer: IDelayedCall | None = None
        self._call: Deferred[None] | None = None
        self._outage_logged = False

    def start(self) -> None:
        self._running = True
        self._index = 0
        self.failures = 0
        self._schedule(0.0)

    def stop(self) -> Deferred[None]:
        """Stop; fires once no call is in flight and no timer is left."""
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        call, self._call = self._call, None
        if call is None:
            return succeed(None)
        call.cancel()
        done: Deferred[None] = DeferredList([call], consumeErrors=True).addCallback(lambda _: None)
        return done

    def _schedule(self, delay: float) -> None:
        self._timer = self._clock.callLater(max(0.0, delay), self._run)

    def _rate_limited(self) -> float:
        if self._sent_at is None:
            return 0.0
        return self._sent_at + self._min_interval - self._clock.seconds()

    def _run(self) -> None:
        self._timer = None
        if not self._running:
            return
        sent_index = self._index
        self._sent_at = self._clock.seconds()
        d = self._fetch(sent_index)
        call: Deferred[None] = d.addCallbacks(
            self._answered, self._failed, callbackArgs=(sent_index,)
        ).addErrback(self._bug)
        self._call = call

        def settled(result: object) -> object:
            if self._call is call:
                self._call = None
            return result

        call.addBoth(settled)

    def _answered(self, answer: tuple[int, object], sent_index: int) -> None:
        if not self._running:
            return
        raw_index, body = answer
        try:
            index = int(str(raw_index))
        except ValueError:
            raise consul.ConsulException(f"invalid X-Consul-Index {raw_index!r}") from None
        self._apply(body)
        if index < sent_index:
            log.info(
                "consul index of {what} went backwards ({old} -> {new}): reading afresh",
                what=self.what,
                old=sent_index,
                new=index,
            )
            self._index = 0
        else:
            self._index = max(index, 1)
        self.failures = 0
        self.healthy = True
        if self._outage_logged:
            self._outage_logged = False
            log.info("{what}: consul answers again", what=self.what)
        self._schedule(self._rate_limited())

    def _failed(self, failure: Failure) -> None:
        if not self._running or failure.check(CancelledError):  # type: ignore[no-untyped-call]
            return
        self.failures += 1
        self.healthy = False
        self._index = 0  # the agent may have restarted: read afresh
        delay = max(self._retry_delay(self.failures), self._rate_limited())
        expected = failure.check(ConsulUnavailable, consul.ConsulException, ValueError)  # type: ignore[no-untyped-call]
        if not expected:
            log.failure("unexpected error reading {what}", failure, what=self.what)
        if not self._outage_logged:
            self._outage_logged = True
            log.warn(
                "cannot read {what} from consul, keeping the last one: {error}",
                what=self.what,
                error=_describe(failure),
                retry_in=delay,
            )
        self._schedule(delay)

    def _bug(self, failure: Failure) -> None:
        log.failure("bug in the blocking query loop of {what}", failure, what=self.what)
        if self._running:
            self.failures += 1
            self._index = 0
            self._schedule(self._retry_delay(self.failures))
