"""Round-robin over the chat instances an :class:`~snet.server.discovery.InstanceSource` lists.

The rotation is kept as a position in the sorted order of instance ids (the id of the last
instance chosen), not as a number into the list: each pick takes the first instance whose id
comes after the last one chosen, wrapping around. With a stable list that is exact
round-robin; when instances come or go, the rotation goes on from where it was instead of
starting again from the first instance (which would favour it). Over any run of picks, the
instances listed during the whole run were each picked either k or k + 1 times. A call that
skips instances that cannot be reached moves the rotation on to the one that took it, so the
calls go round the instances that answer.
"""

from __future__ import annotations

from bisect import bisect_right

from snet.server.discovery import ChatEndpoint, Instances, InstanceSource
from snet.server.gateway import NoChatInstance

__all__ = ["RoundRobin"]


class RoundRobin:
    """Picks the chat instance for each call, in turn, from *source*'s current list.

    Instance ids must be unique in the list (``HealthyInstances`` and ``StaticInstances``
    guarantee it); the list need not be sorted.
    """

    def __init__(self, source: InstanceSource) -> None:
        self._source = source
        self._last_id: str | None = None
        self._seen: Instances | None = None
        self._ordered: list[ChatEndpoint] = []
        self._ids: list[str] = []

    def _current(self) -> list[ChatEndpoint]:
        instances = self._source.instances
        if instances is not self._seen:
            self._seen = instances
            self._ordered = sorted(instances, key=lambda e: e.instance_id)
            self._ids = [e.instance_id for e in self._ordered]
        return self._ordered

    def _next_position(self) -> int:
        if self._last_id is None:
            return 0
        position = bisect_right(self._ids, self._last_id)
        return 0 if position == len(self._ids) else position

    def next(self) -> ChatEndpoint:
        """The instance for the next call.

        :raises NoChatInstance: if the list is empty.
        """
        ordered = self._current()
        if not ordered:
            raise NoChatInstance("no chat instance is passing its health check")
        chosen = ordered[self._next_position()]
        self._last_id = chosen.instance_id
        return chosen

    def candidates(self) -> list[ChatEndpoint]:
        """Every instance once, in rotation order from the next one (which counts as picked).

        The caller sends to the first and moves on to the following ones only when an
        instance cannot be reached; the rotation advances by one pick, as ``next()`` does
        (tell it with ``skipped_to`` when a later candidate took the call).

        :raises NoChatInstance: if the list is empty.
        """
        ordered = self._current()
        if not ordered:
            raise NoChatInstance("no chat instance is passing its health check")
        position = self._next_position()
        self._last_id = ordered[position].instance_id
        return ordered[position:] + ordered[:position]

    def skipped_to(self, first: ChatEndpoint, served: ChatEndpoint) -> None:
        """Say that *served*, a later candidate, took the call *first* could not take.

        The rotation then goes on after *served*, so that an instance that refuses calls does
        not hand its whole share to the instance after it: the calls go round the instances
        that answer. Does nothing if another pick came in between (the rotation has moved on).
        """
        if self._last_id == first.instance_id:
            self._last_id = served.instance_id
