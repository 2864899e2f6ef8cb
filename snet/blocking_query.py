"""One blocking-query loop on a Consul endpoint, following Consul's rules for blocking clients.

:class:`BlockingQuery` calls *fetch(index)* again and again and hands every answer to
*apply*: the first call (and the first after a failure or a :meth:`~BlockingQuery.restart`)
does not block, an index that goes backwards starts the loop afresh, an index below 1 is
never waited on, calls are at least ``min_interval`` seconds apart (so that an index that
changes all the time cannot make the loop spin), and failures are retried after the
``retry_delay`` policy. Timeouts are the client's: ``TreqConsul`` gives a blocking call
``wait + wait/16`` on top of its own.

:class:`ConsulReach` is whether Consul answers, for one thing read from it: an outage and the
recovery are each logged once, however many calls (of one loop, or of a loop and a periodic
read of the same thing) fail or succeed in between.

The Connect certificate watcher runs two loops (leaf and roots); the chat instance list
(``snet.server.discovery``) runs one, next to its periodic refresh, sharing one
:class:`ConsulReach` with it.
"""

from __future__ import annotations

from collections.abc import Callable

import consul
from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from snet.consul import ConsulUnavailable
from snet.httpcall import describe

__all__ = ["Answer", "BlockingQuery", "ConsulReach", "Fetch", "consul_index"]

log = Logger()

Fetch = Callable[[int], "Deferred[tuple[object, object]]"]
"""*fetch(index)*: ``(X-Consul-Index, body)``; at once for 0, else possibly after a wait."""


def consul_index(raw: object) -> int:
    """An ``X-Consul-Index`` as a number.

    :raises consul.ConsulException: if it is not one.
    """
    try:
        return int(str(raw))
    except ValueError:
        raise consul.ConsulException(f"invalid X-Consul-Index {raw!r}") from None


@frozen
class Answer:
    """One answer of the loop: Consul's index, the body, and the index the call was sent
    with (``went_back``: Consul's index went backwards, an agent restart; the loop reads
    afresh)."""

    index: int
    body: object
    sent_index: int

    @property
    def went_back(self) -> bool:
        return self.index < self.sent_index


def log_went_back(what: str, old: int, new: int) -> None:
    log.info(
        "consul index of {what} went backwards ({old} -> {new}): reading afresh",
        what=what,
        old=old,
        new=new,
    )


class ConsulReach:
    """Whether Consul answers reads of *what*: ``reachable`` (False until the first answer),
    ``last_success`` (clock time of the last answer), an outage and the recovery each logged
    once. *kept* says what is kept in use meanwhile (``"the last one"``)."""

    def __init__(
        self, what: str, clock: IReactorTime, kept: Callable[[], str] = lambda: "the last one"
    ) -> None:
        self.what = what
        self._clock = clock
        self._kept = kept
        self.reachable = False
        self.last_success: float | None = None
        self._outage_logged = False

    def succeeded(self) -> None:
        self.last_success = self._clock.seconds()
        self.reachable = True
        if self._outage_logged:
            self._outage_logged = False
            log.info("consul reachable again, reading {what}", what=self.what)

    def failed(self, failure: Failure, retry_in: float | None) -> None:
        self.reachable = False
        expected = failure.check(ConsulUnavailable, consul.ConsulException, ValueError)  # type: ignore[no-untyped-call]
        if not expected:
            log.failure("unexpected error reading {what} from consul", failure, what=self.what)
        if self._outage_logged:
            return
        self._outage_logged = True
        log.warn(
            "cannot read {what} from consul, keeping {kept}: {error}",
            what=self.what,
            kept=self._kept(),
            error=failure.getErrorMessage() if failure.value is None else describe(failure.value),
            retry_in=retry_in,
        )


class BlockingQuery:
    """One blocking-query loop: *fetch(index)* again and again, *apply* every answer.

    *fetch(0)* must answer at once; *fetch(n)* for n > 0 may wait for a change after index
    n. *apply(answer)* may raise ValueError (an unusable answer): that counts as a failure
    and is retried like one. ``healthy`` is whether the last call brought a usable answer;
    *reach* (one of its own by default) hears of every answer and failure.
    """

    def __init__(
        self,
        what: str,
        fetch: Fetch,
        apply: Callable[[Answer], None],
        *,
        clock: IReactorTime,
        retry_delay: Callable[[int], float],
        min_interval: float,
        reach: ConsulReach | None = None,
    ) -> None:
        self.what = what
        self._fetch = fetch
        self._apply = apply
        self._clock = clock
        self._retry_delay = retry_delay
        self._min_interval = min_interval
        self.reach = reach or ConsulReach(what, clock)
        self.healthy = False
        self.failures = 0
        self._index = 0
        self._running = False
        self._sent_at: float | None = None
        self._timer: IDelayedCall | None = None
        self._call: Deferred[None] | None = None

    @property
    def index(self) -> int:
        """The index the next call waits on (0: it reads at once)."""
        return self._index

    def start(self) -> None:
        self._running = True
        self._index = 0
        self.failures = 0
        self._sent_at = None
        self._schedule(0.0)

    def stop(self) -> Deferred[None]:
        """Stop; fires once no call is in flight and no timer is left."""
        self._running = False
        self._cancel_timer()
        call, self._call = self._call, None
        if call is None:
            return succeed(None)
        call.cancel()
        done: Deferred[None] = DeferredList([call], consumeErrors=True).addCallback(lambda _: None)
        return done

    def restart(self) -> None:
        """Make the next call a fresh read, cancelling a blocking call in flight."""
        self._index = 0
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
            self._schedule(self._rate_limited())

    def wake(self) -> None:
        """Consul answers again (another path saw it): end a back-off now."""
        if self._running and self.failures and self._call is None and self._timer is not None:
            self._schedule(self._rate_limited())

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _schedule(self, delay: float) -> None:
        self._cancel_timer()
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
        call: Deferred[None] = (
            self._fetch(sent_index)
            .addCallback(self._answered, sent_index)
            .addErrback(self._failed)
            .addErrback(self._bug)
        )
        self._call = call

        def settled(result: object) -> object:
            if self._call is call:  # not a call restart() already let go of
                self._call = None
            return result

        call.addBoth(settled)

    def _answered(self, raw: tuple[object, object], sent_index: int) -> None:
        if not self._running:
            return
        raw_index, body = raw
        answer = Answer(consul_index(raw_index), body, sent_index)
        self._apply(answer)
        self.reach.succeeded()
        if answer.went_back:
            log_went_back(self.what, sent_index, answer.index)
            self._index = 0
        else:
            self._index = max(answer.index, 1)
        self.failures = 0
        self.healthy = True
        self._schedule(self._rate_limited())

    def _failed(self, failure: Failure) -> None:
        if not self._running or failure.check(CancelledError):  # type: ignore[no-untyped-call]
            return  # stopped, or cancelled by restart(), which schedules the next call
        self.failures += 1
        self.healthy = False
        self._index = 0  # the agent may have restarted: read afresh
        delay = max(self._retry_delay(self.failures), self._rate_limited())
        self.reach.failed(failure, delay)
        self._schedule(delay)

    def _bug(self, failure: Failure) -> None:
        log.failure("bug in the blocking query loop of {what}", failure, what=self.what)
        if self._running:
            self.failures += 1
            self._index = 0
            self._schedule(self._retry_delay(self.failures))
