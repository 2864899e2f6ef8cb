"""Passive health of the chat instances: taking out of rotation those that fail calls.

Like Envoy's outlier detection, :class:`PassiveHealth` learns from the calls themselves, not
from probes: the chat client tells it how every attempt on an instance ended, and an instance
that fails ``consecutive_failures`` attempts in a row (timed out, connection lost, 5xx, an
answer that is not JSON, a connect timeout) is *ejected*: the balancer leaves it out of the
rotation until its ejection ends. A refused connection ejects at once: nothing listens on the
port, so the process is gone or stopping, and waiting for more refusals would only cost more
skips. So does a failed identity (``identity``: the instance's certificate is not the chat
service's, a rogue registration; docs/trust.md): it will not become the chat service by
waiting. Any answer that is not a failure (4xx included: the instance is there and answering)
resets the count.

- **Back-off.** The *n*-th ejection of an instance lasts ``backoff(n)`` seconds (by default
  1 s, 2 s, 4 s ... capped at 30 s). The count goes down by one for every ``decay_interval``
  seconds the instance has been back in rotation since its last ejection ended, so an
  instance that failed once long ago starts again at 1 s.
- **Probation.** An instance that comes back from an ejection has to earn its standing again:
  its first failure ejects it anew (for longer), its first success clears the slate. An
  instance that is still down (a SIGSTOPped process) thus costs one failed attempt per
  ejection, not ``consecutive_failures`` of them.
- **Failures while ejected** (attempts that were already in flight) neither count nor extend
  the ejection.
- **Forgetting.** The balancer calls :meth:`PassiveHealth.retain` with every new list from
  Consul: an instance that is no longer listed is forgotten, and one listed again starts clean.

The ejection ends by the clock alone (no timer is scheduled); :meth:`PassiveHealth.ejected`
reads it. Never ejecting every instance is the balancer's business (panic mode, see
:mod:`snet.server.roundrobin`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from attrs import define
from prometheus_client import CollectorRegistry, Counter, Gauge
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from snet.retry import exponential_backoff

__all__ = ["IMMEDIATE_EJECTION", "PassiveHealth"]

log = Logger()

IMMEDIATE_EJECTION = frozenset({"refused", "identity"})
"""Failure reasons that eject an instance at once, whatever its count of failures."""


@define
class _Standing:
    """What is known of one instance."""

    failures: int = 0  # consecutive failures since the last success
    ejections: int = 0  # the ejection count (decayed when the next ejection comes)
    ejected_until: float | None = None  # when the last ejection ends (or ended)
    back_announced: bool = True  # whether the end of the last ejection was logged
    probation: bool = False  # back from an ejection and not yet answered well


class PassiveHealth:
    """Ejects the chat instances that fail calls (see the module docstring).

    :param consecutive_failures: failures in a row that eject an instance (at least 1).
    :param backoff: how long the *n*-th ejection lasts (from 1), in seconds; by default
        1 s doubling up to 30 s.
    :param decay_interval: seconds back in rotation that take one off the ejection count.
    :param eject_at_once: failure reasons that eject at the first occurrence.
    :param registry: exports ``snet_chat_instances_ejected`` (instances ejected now) and
        ``snet_chat_ejections_total{instance,reason}`` (ejections, by the reason of the
        failure that caused them).
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        consecutive_failures: int = 3,
        backoff: Callable[[int], float] | None = None,
        decay_interval: float = 10.0,
        eject_at_once: frozenset[str] = IMMEDIATE_EJECTION,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if consecutive_failures < 1:
            raise ValueError("consecutive_failures must be at least 1")
        self._clock = clock
        self.consecutive_failures = consecutive_failures
        self._backoff = backoff or exponential_backoff(
            initial=1.0, maximum=30.0, jitter=lambda: 0.5
        )
        self._decay_interval = decay_interval
        self._eject_at_once = eject_at_once
        self._standings: dict[str, _Standing] = {}
        self._ejections: Counter | None = None
        if registry is not None:
            Gauge(
                "snet_chat_instances_ejected",
                "Chat instances taken out of rotation for failing calls (passive health)",
                registry=registry,
            ).set_function(lambda: len(self.ejected_ids()))
            self._ejections = Counter(
                "snet_chat_ejections",
                "Ejections of chat instances, by the reason of the failure that caused them",
                ["instance", "reason"],
                registry=registry,
            )

    # Reading.

    def ejected(self, instance_id: str) -> bool:
        """Whether *instance_id* is out of rotation now."""
        standing = self._standings.get(instance_id)
        if standing is None or standing.ejected_until is None:
            return False
        if self._clock.seconds() < standing.ejected_until:
            return True
        if not standing.back_announced:
            standing.back_announced = True
            log.info(
                "chat instance {instance} back in rotation (on probation) after ejection"
                " {ejections}",
                instance=instance_id,
                ejections=standing.ejections,
            )
        return False

    def ejected_ids(self) -> frozenset[str]:
        """The instances out of rotation now."""
        return frozenset(i for i in list(self._standings) if self.ejected(i))

    def ejected_until(self, instance_id: str) -> float | None:
        """When the current ejection of *instance_id* ends; None if it is in rotation."""
        if not self.ejected(instance_id):
            return None
        return self._standings[instance_id].ejected_until

    def ejection_count(self, instance_id: str) -> int:
        """How many times in a row (after decay) *instance_id* has been ejected."""
        standing = self._standings.get(instance_id)
        if standing is None:
            return 0
        return self._decayed(standing, self._clock.seconds())

    # Learning.

    def succeeded(self, instance_id: str) -> None:
        """An attempt on *instance_id* got an answer that is not a failure."""
        standing = self._standings.get(instance_id)
        if standing is not None:
            standing.failures = 0
            standing.probation = False

    def failed(self, instance_id: str, reason: str) -> None:
        """An attempt on *instance_id* failed for *reason* (``refused``, ``timeout``, ...)."""
        if self.ejected(instance_id):
            return
        standing = self._standings.setdefault(instance_id, _Standing())
        standing.failures += 1
        if (
            standing.probation
            or reason in self._eject_at_once
            or standing.failures >= self.consecutive_failures
        ):
            self._eject(instance_id, standing, reason)

    def retain(self, instance_ids: Iterable[str]) -> None:
        """Forget every instance but *instance_ids* (the list Consul reports now)."""
        keep = set(instance_ids)
        for instance_id in [i for i in self._standings if i not in keep]:
            del self._standings[instance_id]

    # Inside.

    def _decayed(self, standing: _Standing, now: float) -> int:
        if standing.ejected_until is None or now < standing.ejected_until:
            return standing.ejections
        healthy = now - standing.ejected_until
        return max(0, standing.ejections - int(healthy // self._decay_interval))

    def _eject(self, instance_id: str, standing: _Standing, reason: str) -> None:
        now = self._clock.seconds()
        failures, probation = standing.failures, standing.probation
        standing.ejections = self._decayed(standing, now) + 1
        duration = self._backoff(standing.ejections)
        standing.ejected_until = now + duration
        standing.back_announced = False
        standing.failures = 0
        standing.probation = True  # when it comes back, one failure ejects it again
        if self._ejections is not None:
            self._ejections.labels(instance=instance_id, reason=reason).inc()
        log.warn(
            "ejecting chat instance {instance} for {seconds:g}s after {failures} failed"
            " attempts in a row{probation} (last: {reason}); ejection {ejections}",
            instance=instance_id,
            seconds=duration,
            failures=failures,
            probation=" back from an ejection" if probation else "",
            reason=reason,
            ejections=standing.ejections,
        )
