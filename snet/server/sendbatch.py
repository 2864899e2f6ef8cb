"""Sends to one chat instance that come while a send call to it is out go together, in one
batch call, when that call ends.

A chat instance that gets a third of the monolith's sends gets them one by one, and pays
for each its own HTTP request, thread hand-off, statement and Redis round trip; the same
sends in one call cost it one request and one statement (docs/performance.md, step 12).
:class:`SendBatcher` sits between :class:`~snet.server.chat_client.ChatClient` and its wire,
per instance:

- A send to an instance with no send call out goes at once, by itself, to the send route:
  an idle system pays nothing for batching, not even a wait.
- A send that comes while a call is out waits. When the call ends, however it ends, the
  sends that waited go in one ``POST /v1/sends`` (``snet.chat_contract``), up to
  ``max_sends`` of them and ``max_bytes`` of body (a lone one goes to the send route). A
  queue that would pass either bound goes at once.
- A call out for longer than *stalled* seconds (20 ms: a chat call takes 1-3 ms here) does
  not hold the sends after it: the queue goes then (and the sends after that wait for its
  call, at most as long), as they would go on connections of their own without batching
  (the chat's ``MessageStore`` does the same for a stalled statement). Whatever a stalled
  call waits for (an instance being killed, a lock of MariaDB), the sends after it wait at
  most this much longer than without batching: the fault bench's slowest call under SIGKILL
  was 0.61 s with 0.5 s here, 0.41 s with 0.1 s, 0.33-0.34 s with 20 ms, as without
  batching; batches stay as large under load (docs/performance.md, step 12).
- Each send gets its own answer: the batch's result for it (:class:`ParsedAnswer`, as the
  send route would have answered it), or, when the batch call failed, the batch's failure or
  answer (a 5xx, an answer that is not the batch's), which the client then judges for each
  send as for a send of its own. An instance that answers the batch route 404 or 405 (one
  older than it, in a rolling upgrade) gets its sends one by one from then on.
- A retry goes at once by itself, and holds no send after it: it may meet the locks of its
  own first attempt, and is rare.
- Cancelling a send (its attempt timed out, its caller went away) while it waits fails it
  with :class:`NotSent`, a ``ConnectingCancelledError``: it never left, and the client tries
  the next instance at once (``not_sent``), holding nothing against this one, whose call
  ahead answers for itself. Cancelling it once sent leaves the
  batch to the others, and fails it as a cancelled single call fails
  (``ResponseNeverReceived``); the batch's connection is dropped only when every send of it
  is cancelled. The instance may still store it: the retry carries the same idempotency key.
- A batch that fails (its call failed or timed out, an answer not the batch's) is one
  failure of the instance, not one per send: each send's *told* note knows its batch, and
  ``Told.first()`` lets the client count only the first of them against the instance's
  health (a send cancelled by its caller counts nothing, and takes nothing away).

Retrying is the client's: a batch call is never sent twice by this class, except that
``ChatWire`` sends any call once more after a stale pooled connection, as for a single send
(every send has an idempotency key).
"""

from __future__ import annotations

import json
import uuid
from typing import Any, Protocol

from attrs import define, field, frozen
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectingCancelledError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived

from snet.chat_contract import MAX_BATCH_SENDS, SEND_BATCH_PATH
from snet.server.chatwire import ChatAnswer, ChatCall
from snet.server.discovery import ChatEndpoint

__all__ = ["BatchedSend", "NotSent", "ParsedAnswer", "SendBatcher", "Told"]

log = Logger()

MAX_BATCH_BYTES = 48 * 1024
"""The largest batch body, in bytes: under the chat service's 64 KiB request bound whatever
the sends' headers, so a batch is never refused for its size (a single send is never more
than about 25 KiB)."""

STALLED = 0.02
"""Seconds after which a send call out no longer holds the sends after it."""

_MAX_LANES = 1024
"""Instances whose queues are kept; past that many, the idle ones go."""

_BATCH_TARGET = SEND_BATCH_PATH.encode("ascii")


class _Wire(Protocol):
    def exchange(self, endpoint: ChatEndpoint, call: ChatCall) -> Deferred[ChatAnswer]: ...


@frozen
class BatchedSend:
    """A send as a call of its own (*call*) and as an item of a batch call (*item*: user_id,
    peer_id, idempotency_key, text and request_id)."""

    call: ChatCall
    item: dict[str, Any]


@frozen
class ParsedAnswer:
    """A send's answer out of a batch's: its status and, if *decoded*, its JSON *document*."""

    status: int
    document: Any
    decoded: bool = True


class NotSent(ConnectingCancelledError):
    """The send was cancelled while it waited for the instance's call before it: it was
    never sent."""


@define
class Told:
    """One attempt's note, filled in by :class:`SendBatcher`: the batch the send went in, if
    any, so that the instance's health counts a batch's failure once."""

    batch: _Batch | None = None

    def first(self) -> bool:
        """Whether this attempt's failure is to be counted: always for a send that went
        alone; for a batch's, only the first one asked (which marks the batch counted)."""
        batch = self.batch
        if batch is None:
            return True
        if batch.counted:
            return False
        batch.counted = True
        return True


@define(eq=False)
class _Waiting:
    send: BatchedSend
    lane: _Lane
    told: Told
    result: Deferred[ChatAnswer | ParsedAnswer] = field(init=False)
    size: int = 0
    alone: Deferred[ChatAnswer] | None = None
    """The send's own call, once it went alone."""
    sending: bool = False
    """Whether its own call is being made (a cancel meanwhile cannot say it was not sent)."""


@define(eq=False)
class _Batch:
    sends: list[_Waiting]
    call: Deferred[ChatAnswer] | None = None
    counted: bool = False
    """Whether a failure of one of its sends was counted against the instance (``Told``)."""


@define(eq=False)
class _Lane:
    """One instance: its send calls out and the sends waiting for them."""

    endpoint: ChatEndpoint
    out: dict[int, float] = field(factory=dict)
    """When each send call out (by its number) started."""
    queue: list[_Waiting] = field(factory=list)
    queued_bytes: int = 0
    batches: bool = True
    """False once the instance answered the batch route 404 or 405."""
    timer: IDelayedCall | None = None
    """When the queue goes if the calls out have stalled by then."""
    armed_for: float = 0.0
    """When the youngest call out started, as the timer was armed."""


class SendBatcher:
    """Batches of sends per instance over *wire* (see the module docstring): at most
    *max_sends* sends and *max_bytes* bytes of body in one call."""

    def __init__(
        self,
        wire: _Wire,
        *,
        clock: IReactorTime,
        max_sends: int = MAX_BATCH_SENDS,
        max_bytes: int = MAX_BATCH_BYTES,
        stalled: float = STALLED,
    ) -> None:
        if not 1 <= max_sends <= MAX_BATCH_SENDS:
            raise ValueError(f"max_sends must be 1 to {MAX_BATCH_SENDS}")
        self._wire = wire
        self._clock = clock
        self.max_sends = max_sends
        self.max_bytes = max_bytes
        self.stalled = stalled
        self._calls = 0
        self._lanes: dict[ChatEndpoint, _Lane] = {}
        self.batch_calls = 0
        """Batch calls made so far (with ``batched_sends``, their mean size)."""
        self.batched_sends = 0

    def exchange(
        self,
        endpoint: ChatEndpoint,
        send: BatchedSend,
        told: Told | None = None,
        *,
        alone: bool = False,
    ) -> Deferred[ChatAnswer | ParsedAnswer]:
        """Send *send* to *endpoint*, alone or in a batch; fires with its answer. *told*, if
        given, is filled in as the attempt ends (see ``Told``). With *alone* (a retry), it
        goes at once by itself, and its call holds no send after it."""
        lane = self._lanes.get(endpoint)
        if lane is None:
            lane = self._lane(endpoint)
        if alone:
            return self._call(lane, send.call, holds=False)  # type: ignore[return-value]
        busy = self._busy(lane)
        if (not busy and not lane.queue) or not lane.batches:
            return self._call(lane, send.call)  # type: ignore[return-value]
        waiting = _Waiting(send, lane, told if told is not None else Told())
        waiting.result = Deferred(lambda d: self._cancel(waiting, d))
        waiting.size = _item_bound(send.item)
        if lane.queue and lane.queued_bytes + waiting.size > self.max_bytes:
            self._flush(lane)  # what waits goes now, so that a batch stays within the bound
        lane.queue.append(waiting)
        lane.queued_bytes += waiting.size
        if not busy or len(lane.queue) >= self.max_sends:
            self._flush(lane)  # the calls out have stalled, or the batch is full
        elif lane.timer is None:
            self._flush_when_stalled(lane)
        return waiting.result

    def waiting(self, endpoint: ChatEndpoint) -> int:
        """How many sends wait for *endpoint* now."""
        lane = self._lanes.get(endpoint)
        return 0 if lane is None else len(lane.queue)

    def _lane(self, endpoint: ChatEndpoint) -> _Lane:
        if len(self._lanes) >= _MAX_LANES:
            for key, old in list(self._lanes.items()):
                if not old.out and not old.queue:
                    del self._lanes[key]
        lane = self._lanes[endpoint] = _Lane(endpoint)
        return lane

    def _busy(self, lane: _Lane) -> bool:
        """Whether a send call out on *lane* has not stalled yet."""
        if not lane.out:
            return False
        now = self._clock.seconds()
        return max(lane.out.values()) > now - self.stalled

    def _flush_when_stalled(self, lane: _Lane) -> None:
        youngest = lane.armed_for = max(lane.out.values())
        delay = max(0.0, youngest + self.stalled - self._clock.seconds())
        lane.timer = self._clock.callLater(delay, self._stall_passed, lane)

    def _stall_passed(self, lane: _Lane) -> None:
        lane.timer = None
        if not lane.queue:
            return
        if lane.out and max(lane.out.values()) > lane.armed_for:
            self._flush_when_stalled(lane)  # a newer call went out meanwhile
        else:
            self._flush(lane)

    def _call(
        self, lane: _Lane, call: ChatCall, *, holds: bool = True, batch: bool = False
    ) -> Deferred[ChatAnswer]:
        d = self._wire.exchange(lane.endpoint, call)
        if holds:
            self._calls += 1
            number = self._calls
            lane.out[number] = self._clock.seconds()
            d.addBoth(self._ended, lane, number, batch)
        return d

    def _ended(self, result: Any, lane: _Lane, number: int, batch: bool) -> Any:
        # The sends that waited go before this call's callers go on, so that the next batch
        # holds only the sends that came while this call was out.
        del lane.out[number]
        if batch and isinstance(result, ChatAnswer) and result.status in (404, 405):
            self._no_batch_route(lane, result.status)
        if lane.queue and not self._busy(lane):
            self._flush(lane)
        return result

    def _flush(self, lane: _Lane) -> None:
        """Send what waits on *lane* (within the bounds: see ``exchange``): one batch, or a
        lone send by itself."""
        if lane.timer is not None:
            lane.timer.cancel()
            lane.timer = None
        queued, lane.queue, lane.queued_bytes = lane.queue, [], 0
        sends = [waiting for waiting in queued if not waiting.result.called]
        if len(sends) == 1 or not lane.batches:
            for waiting in sends:
                self._alone(waiting)  # a callback of one may cancel the next
        elif sends:
            self._batch(lane, sends)

    def _no_batch_route(self, lane: _Lane, status: int) -> None:
        if lane.batches:
            lane.batches = False
            log.info(
                "chat instance {instance} has no batch route ({status}): its sends go one by one",
                instance=lane.endpoint.instance_id,
                status=status,
            )

    def _alone(self, waiting: _Waiting) -> None:
        if waiting.result.called:  # cancelled meanwhile
            return
        waiting.sending = True
        call = waiting.alone = self._call(waiting.lane, waiting.send.call)
        call.addBoth(self._settle, waiting)

    @staticmethod
    def _settle(result: ChatAnswer | Failure, waiting: _Waiting) -> None:
        if waiting.result.called:
            return
        if isinstance(result, Failure):
            waiting.result.errback(result)
        else:
            waiting.result.callback(result)

    def _batch(self, lane: _Lane, sends: list[_Waiting]) -> None:
        batch = _Batch(sends)
        for waiting in sends:
            waiting.told.batch = batch
        body = json.dumps(
            {"sends": [waiting.send.item for waiting in sends]},
            ensure_ascii=False,
            separators=(",", ":"),
        ).encode("utf-8")
        headers = (
            (b"X-Request-ID", uuid.uuid4().hex.encode("ascii")),
            (b"Content-Type", b"application/json"),
            (b"Accept", b"application/json"),
        )
        self.batch_calls += 1
        self.batched_sends += len(sends)
        call = batch.call = self._call(
            lane, ChatCall(b"POST", _BATCH_TARGET, headers, body, True), batch=True
        )
        call.addCallbacks(
            self._answered,
            self._failed,
            callbackArgs=(lane, batch),
            errbackArgs=(batch,),
        )

    def _answered(self, answer: ChatAnswer, lane: _Lane, batch: _Batch) -> None:
        # Each send is looked at as its turn comes: a callback of one may cancel another.
        if answer.status in (404, 405):  # the lane knows already (_ended)
            for waiting in batch.sends:
                if not waiting.result.called:
                    self._alone(waiting)
            return
        results = _results(answer, len(batch.sends))
        if results is None:
            # Not the batch's answer (a 5xx, a 401 or 403, a malformed body): each send gets
            # it as its own, and the client judges it as it would for a single call; a 2xx
            # is no send's answer, so it is one that could not be read (a bad_response).
            document, decoded = _decoded(answer.body)
            if 200 <= answer.status < 300:
                document, decoded = None, False
            for waiting in batch.sends:
                if not waiting.result.called:
                    waiting.result.callback(ParsedAnswer(answer.status, document, decoded))
            return
        for waiting, (status, document) in zip(batch.sends, results, strict=True):
            if not waiting.result.called:
                waiting.result.callback(ParsedAnswer(status, document))

    @staticmethod
    def _failed(failure: Failure, batch: _Batch) -> None:
        for waiting in batch.sends:
            if not waiting.result.called:
                waiting.result.errback(failure)

    def _cancel(self, waiting: _Waiting, d: Deferred[Any]) -> None:
        if waiting.alone is not None:
            waiting.alone.cancel()  # its failure comes through _settle
            return
        if waiting.sending:  # its own call is being made: it may have gone out
            d.errback(ResponseNeverReceived([Failure(CancelledError())]))  # type: ignore[no-untyped-call]
            return
        batch = waiting.told.batch
        if batch is None:
            lane = waiting.lane
            if waiting in lane.queue:  # else a flush took it and will skip it
                lane.queue.remove(waiting)
                lane.queued_bytes -= waiting.size
            d.errback(NotSent(lane.endpoint.instance_id))  # type: ignore[no-untyped-call]
            return
        d.errback(ResponseNeverReceived([Failure(CancelledError())]))  # type: ignore[no-untyped-call]
        if batch.call is not None and all(w.result.called for w in batch.sends):
            batch.call.cancel()


def _item_bound(item: dict[str, Any]) -> int:
    """At least the bytes *item* takes in a batch's JSON: its field names and punctuation
    (under 90), two ids of at most 19 digits, a key and a request id (client tokens:
    ``[A-Za-z0-9._:-]``, one byte a character, counted twice), and a text of at most 6
    bytes a character (a control character is escaped as ``\\u001f``)."""
    key, rid = item["idempotency_key"], item["request_id"]
    return 128 + 2 * (len(key) + len(rid)) + 6 * len(item["text"])


def _decoded(body: bytes) -> tuple[Any, bool]:
    try:
        return json.loads(body.decode("utf-8")), True
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None, False


def _results(answer: ChatAnswer, count: int) -> list[tuple[int, Any]] | None:
    """Each send's (status, body) of a batch's answer, or None if it is not one."""
    if answer.status != 200:
        return None
    document, decoded = _decoded(answer.body)
    results = document.get("results") if decoded and isinstance(document, dict) else None
    if not isinstance(results, list) or len(results) != count:
        return None
    out = []
    for result in results:
        status = result.get("status") if isinstance(result, dict) else None
        if type(status) is not int or not 200 <= status <= 599 or "body" not in result:
            return None
        out.append((status, result["body"]))
    return out
