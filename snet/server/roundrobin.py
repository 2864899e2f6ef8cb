"""Round-robin over the chat instances an :class:`~snet.server.discovery.InstanceSource` lists.

The rotation is kept as a position in the sorted order of instance ids (the id of the last
instance chosen), not as a number into the list: each pick takes the first instance whose id
comes after the last one chosen, wrapping around. With a stable list that is exact
round-robin; when instances come or go, the rotation goes on from where it was instead of
starting again from the first instance (which would favour it). Over any run of picks, the
instances listed during the whole run were each picked either k or k + 1 times. A call that
skips instances that cannot be reached moves the rotation on to the one that took it, so the
calls go round the instances that answer.

With a :class:`~snet.server.ejection.PassiveHealth`, the rotation is made of the instances in
*good standing*: listed, and not ejected for failing calls. Ejected instances are passed
over exactly as if they were not listed, so the rotation stays exact among the others. If
every listed instance is ejected, the balancer is in *panic mode* (like Envoy's): it ignores
the ejections and goes round all of them, since sending to instances that may have recovered
beats failing every call. Every new list from the source is handed to the health's
``retain`` (through the source's subscription, and when a pick finds a new list), so an
instance Consul removes is forgotten and one Consul lists again starts clean.

Where the rotation begins is the caller's choice (``start``): the monolith starts at a random
position, so that several monolith processes do not go round the instances in step.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable, Collection

from twisted.logger import Logger

from snet.server.discovery import ChatEndpoint, Instances, InstanceSource
from snet.server.ejection import PassiveHealth
from snet.server.gateway import NoChatInstance

__all__ = ["RoundRobin", "random_start"]

log = Logger()


def random_start(count: int) -> int:
    """A random index below *count*: where a monolith process starts its rotation."""
    return random.SystemRandom().randrange(count)


class RoundRobin:
    """Picks the chat instance for each call, in turn, from *source*'s current list.

    Instance ids must be unique in the list (``HealthyInstances`` and ``StaticInstances``
    guarantee it); the list need not be sorted. Without *health*, every listed instance is
    in good standing.

    *start* picks where the rotation begins: given the number of instances in the rotation
    at the first pick, the index of the first one to use (None: the first by id). Monolith
    processes each pass a random one (``random_start``), so that a fleet of them does not
    send its first calls, and every round after, to the same instance in step: each one
    goes round exactly, and the counts of all of them together differ by at most the number
    of monoliths.
    """

    def __init__(
        self,
        source: InstanceSource,
        *,
        health: PassiveHealth | None = None,
        start: Callable[[int], int] | None = None,
    ) -> None:
        self._source = source
        self.health = health
        self._start = start
        self._last_id: str | None = None
        self._seen: Instances | None = None
        self._ordered: list[ChatEndpoint] = []
        self._panic = False
        if health is not None:
            self._unsubscribe = source.subscribe(self._listed)

    def _listed(self, instances: Instances) -> None:
        if self.health is not None:
            self.health.retain(e.instance_id for e in instances)

    def _current(self) -> list[ChatEndpoint]:
        """Every listed instance, sorted by id."""
        instances = self._source.instances
        if instances is not self._seen:
            self._seen = instances
            self._ordered = sorted(instances, key=lambda e: e.instance_id)
            self._listed(instances)
        return self._ordered

    def rotation(self) -> list[ChatEndpoint]:
        """The instances calls go round now, sorted by id: those in good standing, or every
        listed one in panic mode (when all are ejected)."""
        ordered = self._current()
        if self.health is None or not ordered:
            return ordered
        health = self.health
        good = [e for e in ordered if not health.ejected(e.instance_id)]
        panic = not good
        if panic != self._panic:
            self._panic = panic
            if panic:
                log.warn(
                    "every chat instance is ejected ({count}): panic mode, sending to all",
                    count=len(ordered),
                )
            else:
                log.info(
                    "{good} of {count} chat instances in good standing: panic mode over",
                    good=len(good),
                    count=len(ordered),
                )
        return ordered if panic else good

    @property
    def panic(self) -> bool:
        """Whether every listed instance was ejected at the last look (see ``rotation``)."""
        return self._panic

    def _position_after(self, rotation: list[ChatEndpoint], last_id: str | None) -> int:
        if last_id is None:
            return self._start(len(rotation)) % len(rotation) if self._start else 0
        position = bisect_right([e.instance_id for e in rotation], last_id)
        return 0 if position == len(rotation) else position

    def next(self) -> ChatEndpoint:
        """The instance for the next call.

        :raises NoChatInstance: if the list is empty.
        """
        rotation = self.rotation()
        if not rotation:
            raise NoChatInstance("no chat instance is passing its health check")
        chosen = rotation[self._position_after(rotation, self._last_id)]
        self._last_id = chosen.instance_id
        return chosen

    def candidates(self) -> list[ChatEndpoint]:
        """The rotation once, in order from the next instance (which counts as picked).

        The caller sends to the first and moves on to the following ones only when an
        instance cannot be reached; the rotation advances by one pick, as ``next()`` does
        (tell it with ``skipped_to`` when a later candidate took the call).

        :raises NoChatInstance: if the list is empty.
        """
        rotation = self.rotation()
        if not rotation:
            raise NoChatInstance("no chat instance is passing its health check")
        position = self._position_after(rotation, self._last_id)
        self._last_id = rotation[position].instance_id
        return rotation[position:] + rotation[:position]

    def after(self, endpoint: ChatEndpoint, exclude: Collection[str] = ()) -> ChatEndpoint | None:
        """The instance a call that *endpoint* failed goes to next, or None if none is left.

        That is the first instance of the rotation as it is now (so an instance ejected since
        the call began is passed over) after *endpoint* in id order, wrapping around, whose
        id is not in *exclude* (the instances the call has tried). Does not move the
        rotation: tell it with ``skipped_to`` which instance finally took the call.
        """
        rotation = self.rotation()
        if not rotation:
            return None
        position = self._position_after(rotation, endpoint.instance_id)
        for candidate in rotation[position:] + rotation[:position]:
            if candidate.instance_id != endpoint.instance_id and (
                candidate.instance_id not in exclude
            ):
                return candidate
        return None

    def skipped_to(self, first: ChatEndpoint, served: ChatEndpoint) -> None:
        """Say that *served*, a later candidate, took the call *first* could not take.

        The rotation then goes on after *served*, so that an instance that refuses calls does
        not hand its whole share to the instance after it: the calls go round the instances
        that answer. Does nothing if another pick came in between (the rotation has moved on).
        """
        if self._last_id == first.instance_id:
            self._last_id = served.instance_id

    # What the calls tell the passive health.

    def succeeded(self, endpoint: ChatEndpoint) -> None:
        """An attempt on *endpoint* got an answer (a 4xx is an answer too)."""
        if self.health is not None:
            self.health.succeeded(endpoint.instance_id)

    def failed(self, endpoint: ChatEndpoint, reason: str) -> None:
        """An attempt on *endpoint* failed for *reason* (see ``ChatInstanceFailed``)."""
        if self.health is not None and endpoint in self._current():
            self.health.failed(endpoint.instance_id, reason)
