"""Unit tests of the chat HTTP API (snet.chat.app) and of the send/read rules of
snet.chat.store.Dialogs, served in memory by StubTreq over in-memory fakes of MessageStore,
UnreadIndex and UnreadRepairs. The fakes stand in for MySQL and Redis in validation and HTTP
logic only: tests/integration/test_chat_store.py and test_unread.py check the real stores."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pymysql
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from snet.chat.app import ChatAPI, parse_limit
from snet.chat.store import COUNTER_TIMEOUT, Dialogs, IdempotencyKeyReused, Message, MessageStore
from snet.chat.unread import UnreadIndex, UnreadRepairs
from snet.chat_contract import MAX_TEXT, validate_message_text
from snet.config import ConsulConfig
from snet.connect import ConnectAuthorizer, Decision, FixedIdentity, PeerIdentity
from snet.consul import TreqConsul
from snet.rediswire import RedisUnavailable
from snet.testing import result_of
from snet.testing.connect import FakeConnectAgent, TestCA
from snet.web.draining import InFlight
from snet.web.errors import BadRequest, ErrorCode, Forbidden
from snet.web.inputs import parse_id
from snet.web.metrics import HTTPMetrics

BASE = "http://chat.test"
ALICE, BOB, CAROL = 1, 2, 3


class FakeMessages:
    """MessageStore's behaviour, kept in lists and dicts."""

    def __init__(self) -> None:
        self.rows: list[Message] = []
        self.reads: dict[tuple[int, int], int] = {}
        self.next_id = 1
        self.ping_result: Deferred[None] | None = None
        self._keys: dict[int, str] = {}
        self.batches: list[int] = []
        """The size of each ``send_many`` call."""
        self.failure: Exception | None = None
        """What ``send_many`` fails every send with, if set."""

    def send(self, sender: int, recipient: int, text: str, key: str) -> Deferred[Any]:
        for row in self.rows:
            if row.sender_id == sender and self._keys[row.id] == key:
                if row.recipient_id != recipient or row.text != text:
                    return fail(
                        IdempotencyKeyReused("idempotency key reused with a different message")
                    )
                return succeed((row, False))
        message = Message(
            id=self.next_id,
            sender_id=sender,
            recipient_id=recipient,
            text=text,
            created_at=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(seconds=self.next_id),
        )
        self._keys[message.id] = key
        self.next_id += 1
        self.rows.append(message)
        return succeed((message, True))

    def send_many(self, sends: list[tuple[int, int, str, str]]) -> list[Deferred[Any]]:
        self.batches.append(len(sends))
        if self.failure is not None:
            return [fail(self.failure) for _ in sends]
        return [self.send(*send) for send in sends]

    def _dialog(self, a: int, b: int) -> list[Message]:
        return [r for r in self.rows if {r.sender_id, r.recipient_id} == {a, b}]

    def list_dialog(
        self,
        user_id: int,
        peer_id: int,
        *,
        after_id: int | None = None,
        before_id: int | None = None,
        limit: int = 50,
    ) -> Deferred[list[Message]]:
        rows = [r for r in self._dialog(user_id, peer_id) if r.id > (after_id or 0)]
        return succeed(rows[:limit])

    def mark_read(self, reader: int, peer: int, up_to_id: int) -> Deferred[None]:
        self.reads[reader, peer] = max(self.reads.get((reader, peer), 0), up_to_id)
        return succeed(None)

    def mark_dialog_read(self, reader: int, peer: int) -> Deferred[int | None]:
        rows = self._dialog(reader, peer)
        if not rows:
            return succeed(None)
        self.mark_read(reader, peer, rows[-1].id)
        return succeed(rows[-1].id)

    def unread_from_mysql(self, user_id: int | None = None) -> Deferred[dict[Any, int]]:
        counts: dict[tuple[int, int], int] = {}
        for r in self.rows:
            if user_id is not None and r.recipient_id != user_id:
                continue
            if r.id > self.reads.get((r.recipient_id, r.sender_id), 0):
                key = (r.recipient_id, r.sender_id)
                counts[key] = counts.get(key, 0) + 1
        return succeed(counts)

    def ping(self) -> Deferred[None]:
        return self.ping_result if self.ping_result is not None else succeed(None)


class FakeUnread:
    """UnreadIndex's behaviour: a set of unread ids and a read mark per (reader, peer);
    ``failure`` makes every call fail with it."""

    def __init__(self) -> None:
        self.ids: dict[tuple[int, int], set[int]] = {}
        self.marks: dict[tuple[int, int], int] = {}
        self.failure: Exception | None = None

    @property
    def hashes(self) -> dict[int, dict[int, int]]:
        """{reader: {peer: count}}, positive counts only."""
        out: dict[int, dict[int, int]] = {}
        for (reader, peer), ids in self.ids.items():
            if ids:
                out.setdefault(reader, {})[peer] = len(ids)
        return out

    def settle(
        self, reader: int, peer: int, *, read_up_to: int = 0, unread: Any = ()
    ) -> Deferred[Any]:
        if self.failure is not None:
            return fail(self.failure)
        mark = self.marks[reader, peer] = max(self.marks.get((reader, peer), 0), read_up_to)
        ids = {i for i in self.ids.get((reader, peer), set()) | set(unread) if i > mark}
        self.ids[reader, peer] = ids
        return succeed(len(ids))

    def counted(self, reader: int, peer: int, message_id: int) -> Deferred[Any]:
        return self.settle(reader, peer, unread=(message_id,))

    def read(self, reader: int, peer: int, up_to_id: int) -> Deferred[Any]:
        return self.settle(reader, peer, read_up_to=up_to_id)

    def counts(self, reader: int) -> Deferred[Any]:
        if self.failure is not None:
            return fail(self.failure)
        return succeed(dict(self.hashes.get(reader, {})))


class FakeRepairs:
    """UnreadRepairs' behaviour: the pairs marked, and a rebuild from FakeMessages."""

    def __init__(self, messages: FakeMessages, unread: FakeUnread) -> None:
        self.messages = messages
        self.unread = unread
        self.marked: list[tuple[int, int]] = []

    async def mark(self, reader: int, peer: int, *, request_id: str | None = None) -> None:
        self.marked.append((reader, peer))

    async def rebuild_all(self) -> int:
        self.unread.ids = {}
        for row in self.messages.rows:
            pair = (row.recipient_id, row.sender_id)
            await self.unread.settle(
                *pair, read_up_to=self.messages.reads.get(pair, 0), unread=(row.id,)
            )
        return len(self.unread.hashes)


class Chat:
    """A ChatAPI over fakes, with a helper to call it in memory."""

    def __init__(self, direct: bool = True) -> None:
        self.messages = FakeMessages()
        self.unread = FakeUnread()
        self.repairs = FakeRepairs(self.messages, self.unread)
        self.clock = Clock()
        self.in_flight = InFlight()
        self.api = ChatAPI(
            dialogs=Dialogs(
                cast(MessageStore, self.messages),
                cast(UnreadIndex, self.unread),
                cast(UnreadRepairs, self.repairs),
                self.clock,
            ),
            in_flight=self.in_flight,
            metrics=HTTPMetrics(),
            version="9.9.9",
            clock=self.clock,
        )
        self.http = StubTreq(self.api.resource(direct=direct))

    def call(self, method: str, path: str, **kwargs: Any) -> tuple[Any, Any]:
        d = self.http.request(method, BASE + path, **kwargs)
        self.http.flush()
        response = result_of(d)
        raw = result_of(response.content())
        try:
            return response, json.loads(raw)
        except ValueError:
            return response, raw

    def send(
        self,
        sender: int | str,
        peer: int | str,
        body: Any = None,
        *,
        key: str | None = "k1",
        raw: bytes | None = None,
    ) -> tuple[Any, Any]:
        headers = {"X-Snet-User-Id": str(sender), "Content-Type": "application/json"}
        if key is not None:
            headers["Idempotency-Key"] = key
        data = raw if raw is not None else json.dumps(body).encode()
        return self.call("POST", f"/v1/dialogs/{peer}/messages", data=data, headers=headers)

    def list(self, reader: int, peer: int | str, query: str = "") -> tuple[Any, Any]:
        return self.call(
            "GET", f"/v1/dialogs/{peer}/messages{query}", headers={"X-Snet-User-Id": str(reader)}
        )


@pytest.fixture(params=[True, False], ids=["direct", "klein"])
def chat(request: pytest.FixtureRequest) -> Chat:
    """The API with its sends run directly, as served, and by Klein (snet.web.direct): every
    test that takes it holds for both."""
    return Chat(direct=request.param)


def header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


# --- send -----------------------------------------------------------------------------------


def item(sender: Any, peer: Any, text: Any = "hi", key: Any = "k1", **more: Any) -> dict[str, Any]:
    """One send of a batch call."""
    return {"user_id": sender, "peer_id": peer, "text": text, "idempotency_key": key, **more}


def send_batch(chat: Chat, sends: Any, *, raw: bytes | None = None) -> tuple[Any, Any]:
    data = raw if raw is not None else json.dumps({"sends": sends}).encode()
    return chat.call("POST", "/v1/sends", data=data, headers={"Content-Type": "application/json"})


def test_a_batch_stores_its_sends_together_each_answered_as_the_send_route_would(
    chat: Chat,
) -> None:
    _, single = chat.send(CAROL, ALICE, {"text": "before"}, key="c1")
    response, body = send_batch(
        chat,
        [
            item(ALICE, BOB, "hi Bob", "a1", request_id="rid-1"),
            item(BOB, ALICE, "hi Alice", "b1"),
            item(CAROL, ALICE, "before", "c1"),  # a replay of the single send
        ],
    )
    assert response.code == 200
    results = body["results"]
    assert [r["status"] for r in results] == [201, 201, 201]
    assert [r["replayed"] for r in results] == [False, False, True]
    assert results[0]["body"]["message"] == {
        "id": 2,
        "sender_id": ALICE,
        "recipient_id": BOB,
        "text": "hi Bob",
        "created_at": "2026-01-01T00:00:02.000000Z",
    }
    assert results[1]["body"]["message"]["recipient_id"] == ALICE
    assert results[2]["body"] == single
    assert chat.messages.batches == [3]
    assert len(chat.messages.rows) == 3
    admin = StubTreq(chat.api.admin_resource())
    metrics = result_of(result_of(admin.get(BASE + "/metrics")).content())
    assert b'snet_chat_batched_send_results_total{status="201"} 3.0' in metrics
    assert chat.unread.hashes == {BOB: {ALICE: 1}, ALICE: {BOB: 1, CAROL: 1}}


def test_a_batch_answers_each_bad_send_400_and_stores_only_the_good_ones(chat: Chat) -> None:
    sends: list[Any] = [
        item(ALICE, ALICE, key="self"),
        item(ALICE, BOB, key=None),
        item(ALICE, BOB, key="bad key!"),
        item(ALICE, BOB, text="", key="empty"),
        item(ALICE, BOB, text=7, key="number"),
        item("1", BOB, key="string-id"),
        item(ALICE, True, key="bool-id"),
        item(ALICE, 2**63, key="big-id"),
        item(0, BOB, key="zero-id"),
        "not an object",
        item(ALICE, BOB, "fine", "good", request_id="rid-good"),
    ]
    response, body = send_batch(chat, sends)
    assert response.code == 200
    statuses = [r["status"] for r in body["results"]]
    assert statuses == [400] * 10 + [201]
    codes = [r["body"]["code"] for r in body["results"][:10]]
    assert codes == [
        ErrorCode.SELF_DIALOG,
        ErrorCode.MISSING_HEADER,
        ErrorCode.INVALID_PARAMETER,
        ErrorCode.INVALID_TEXT,
        ErrorCode.INVALID_TEXT,
        ErrorCode.INVALID_PARAMETER,
        ErrorCode.INVALID_PARAMETER,
        ErrorCode.INVALID_PARAMETER,
        ErrorCode.INVALID_PARAMETER,
        ErrorCode.INVALID_JSON,
    ]
    assert all(r["body"]["message"] for r in body["results"][:10])
    assert [m.text for m in chat.messages.rows] == ["fine"]
    assert chat.unread.hashes == {BOB: {ALICE: 1}}


def test_a_key_reused_in_a_batch_for_another_message_is_a_409_for_that_send_only(
    chat: Chat,
) -> None:
    _response, body = send_batch(
        chat,
        [item(ALICE, BOB, "one", "k"), item(ALICE, BOB, "two", "k"), item(ALICE, BOB, "one", "k")],
    )
    assert [r["status"] for r in body["results"]] == [201, 409, 201]
    assert body["results"][1]["body"]["code"] == ErrorCode.IDEMPOTENCY_KEY_REUSED
    assert body["results"][2]["replayed"] is True
    assert [m.text for m in chat.messages.rows] == ["one"]


@pytest.mark.parametrize(
    "raw",
    [
        b'{"sends": []}',
        b'{"sends": {}}',
        b'{"sends": "x"}',
        b"{}",
        b"[]",
        b"not json",
        json.dumps({"sends": [item(ALICE, BOB, key=f"k{i}") for i in range(51)]}).encode(),
    ],
)
def test_a_batch_that_is_not_a_list_of_1_to_50_sends_is_a_400_and_stores_nothing(
    chat: Chat, raw: bytes
) -> None:
    response, body = send_batch(chat, None, raw=raw)
    assert response.code == 400
    assert body["code"] in (ErrorCode.INVALID_JSON, ErrorCode.INVALID_PARAMETER)
    assert chat.messages.rows == []


def test_a_batch_of_50_is_taken(chat: Chat) -> None:
    _response, body = send_batch(chat, [item(ALICE, BOB, key=f"k{i}") for i in range(50)])
    assert [r["status"] for r in body["results"]] == [201] * 50
    assert len(chat.messages.rows) == 50


def test_a_batch_whose_store_is_away_answers_each_send_503_with_its_request_id(
    chat: Chat,
) -> None:
    chat.messages.failure = pymysql.err.OperationalError(2003, "Can't connect")
    response, body = send_batch(
        chat, [item(ALICE, BOB, key="a", request_id="first"), item(BOB, ALICE, key="b")]
    )
    assert response.code == 200
    assert [r["status"] for r in body["results"]] == [503, 503]
    assert body["results"][0]["body"]["request_id"] == "first"
    assert body["results"][1]["body"]["request_id"]  # a new one
    assert chat.unread.hashes == {}


def test_a_batch_while_redis_is_down_stores_and_marks_each_dialog_for_repair(chat: Chat) -> None:
    chat.unread.failure = RedisUnavailable("down")
    _response, body = send_batch(chat, [item(ALICE, BOB, key="a"), item(CAROL, BOB, key="c")])
    assert [r["status"] for r in body["results"]] == [201, 201]
    assert sorted(chat.repairs.marked) == [(BOB, ALICE), (BOB, CAROL)]


def test_each_send_of_a_batch_is_logged_with_its_own_request_id(chat: Chat) -> None:
    with capturedLogs() as events:
        send_batch(
            chat,
            [item(ALICE, BOB, key="a", request_id="rid-a"), item(ALICE, ALICE, request_id="rid-b")],
        )
    lines = [formatEvent(e) for e in events if "in batch" in (e.get("log_format") or "")]
    assert len(lines) == 2
    assert lines[0].startswith("[rid-a] send 201 in batch ")
    assert lines[0].endswith("(1 of 2)")
    assert lines[1].startswith("[rid-b] send 400 in batch ")


def test_a_send_stores_the_message_and_counts_it_unread_for_the_recipient(chat: Chat) -> None:
    response, body = chat.send(ALICE, BOB, {"text": "hi Bob"})
    assert response.code == 201
    assert body == {
        "message": {
            "id": 1,
            "sender_id": ALICE,
            "recipient_id": BOB,
            "text": "hi Bob",
            "created_at": "2026-01-01T00:00:01.000000Z",
        }
    }
    assert header(response, "Idempotent-Replayed") is None
    assert chat.unread.hashes == {BOB: {ALICE: 1}}


def test_a_replayed_send_answers_the_same_and_counts_nothing_twice(chat: Chat) -> None:
    first, first_body = chat.send(ALICE, BOB, {"text": "hi"}, key="retry-1")
    again, again_body = chat.send(ALICE, BOB, {"text": "hi"}, key="retry-1")
    assert (again.code, again_body) == (first.code, first_body) == (201, first_body)
    assert header(again, "Idempotent-Replayed") == "true"
    assert len(chat.messages.rows) == 1
    assert chat.unread.hashes == {BOB: {ALICE: 1}}


@pytest.mark.parametrize(("peer", "text"), [(BOB, "other text"), (CAROL, "hi")])
def test_a_key_reused_for_another_message_is_a_conflict(chat: Chat, peer: int, text: str) -> None:
    chat.send(ALICE, BOB, {"text": "hi"}, key="k")
    response, body = chat.send(ALICE, peer, {"text": text}, key="k")
    assert response.code == 409
    assert body["code"] == ErrorCode.IDEMPOTENCY_KEY_REUSED
    assert len(chat.messages.rows) == 1
    assert chat.unread.hashes == {BOB: {ALICE: 1}}


def test_the_same_key_from_another_sender_is_another_message(chat: Chat) -> None:
    chat.send(ALICE, BOB, {"text": "hi"}, key="k")
    response, _ = chat.send(CAROL, BOB, {"text": "hi"}, key="k")
    assert response.code == 201
    assert chat.unread.hashes == {BOB: {ALICE: 1, CAROL: 1}}


def test_unknown_fields_are_ignored(chat: Chat) -> None:
    response, body = chat.send(ALICE, BOB, {"text": "hi", "mood": "happy", "id": 99})
    assert response.code == 201
    assert body["message"]["id"] == 1


def test_when_redis_is_down_a_send_is_stored_and_its_dialog_marked_for_repair(
    chat: Chat,
) -> None:
    """A committed message is never undone for a counter's sake."""
    chat.unread.failure = RedisUnavailable("cannot reach Redis: Connection refused")
    response, body = chat.send(ALICE, BOB, {"text": "hi"}, key="k")
    assert response.code == 201
    assert body["message"]["text"] == "hi"
    assert len(chat.messages.rows) == 1
    assert chat.repairs.marked == [(BOB, ALICE)]


def test_when_redis_stalls_a_send_is_answered_after_the_counter_timeout(chat: Chat) -> None:
    chat.unread.counted = lambda *args: Deferred()  # type: ignore[method-assign]
    d = chat.http.request(
        "POST",
        BASE + f"/v1/dialogs/{BOB}/messages",
        data=b'{"text": "hi"}',
        headers={
            "X-Snet-User-Id": str(ALICE),
            "Idempotency-Key": "k",
            "Content-Type": "application/json",
        },
    )
    answers: list[Any] = []
    d.addCallback(answers.append)
    chat.http.flush()
    assert answers == [], "waits for the counter"
    assert len(chat.messages.rows) == 1
    chat.clock.advance(COUNTER_TIMEOUT)
    chat.http.flush()
    assert [answer.code for answer in answers] == [201]
    assert chat.repairs.marked == [(BOB, ALICE)]


def test_a_replayed_send_counts_the_message_an_earlier_attempt_missed(chat: Chat) -> None:
    chat.unread.failure = RedisUnavailable("cannot reach Redis: Connection refused")
    chat.send(ALICE, BOB, {"text": "hi"}, key="k")
    chat.unread.failure = None
    response, _ = chat.send(ALICE, BOB, {"text": "hi"}, key="k")
    assert response.code == 201
    assert header(response, "Idempotent-Replayed") == "true"
    assert len(chat.messages.rows) == 1
    assert chat.unread.hashes == {BOB: {ALICE: 1}}


# --- send validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"sender": ALICE, "peer": ALICE, "body": {"text": "me"}}, ErrorCode.SELF_DIALOG),
        ({"sender": "0", "peer": BOB, "body": {"text": "x"}}, ErrorCode.INVALID_PARAMETER),
        ({"sender": "-1", "peer": BOB, "body": {"text": "x"}}, ErrorCode.INVALID_PARAMETER),
        ({"sender": ALICE, "peer": "007", "body": {"text": "x"}}, ErrorCode.INVALID_PARAMETER),
        ({"sender": ALICE, "peer": "bob", "body": {"text": "x"}}, ErrorCode.INVALID_PARAMETER),
        ({"sender": ALICE, "peer": str(2**63), "body": {"text": "x"}}, 40004),
        ({"sender": ALICE, "peer": BOB, "body": {"text": "x"}, "key": None}, 40005),
        ({"sender": ALICE, "peer": BOB, "body": {"text": "x"}, "key": "a b"}, 40004),
        ({"sender": ALICE, "peer": BOB, "body": {"text": "x"}, "key": "k" * 129}, 40004),
        ({"sender": ALICE, "peer": BOB, "body": {}}, ErrorCode.INVALID_TEXT),
        ({"sender": ALICE, "peer": BOB, "body": {"text": None}}, ErrorCode.INVALID_TEXT),
        ({"sender": ALICE, "peer": BOB, "body": {"text": 5}}, ErrorCode.INVALID_TEXT),
        ({"sender": ALICE, "peer": BOB, "body": {"text": ["a"]}}, ErrorCode.INVALID_TEXT),
        ({"sender": ALICE, "peer": BOB, "body": {"text": ""}}, ErrorCode.INVALID_TEXT),
        ({"sender": ALICE, "peer": BOB, "body": {"text": " \n\t\u3000"}}, 40006),
        ({"sender": ALICE, "peer": BOB, "body": {"text": "x" * 4097}}, 40006),
        ({"sender": ALICE, "peer": BOB, "body": ["text"]}, ErrorCode.INVALID_JSON),
        ({"sender": ALICE, "peer": BOB, "raw": b'{"text": "\\ud800"}'}, 40006),
        ({"sender": ALICE, "peer": BOB, "raw": b'{"text": '}, ErrorCode.INVALID_JSON),
    ],
)
def test_bad_send_input_is_a_400_with_a_code_and_changes_nothing(
    chat: Chat, kwargs: dict[str, Any], code: int
) -> None:
    response, body = chat.send(**kwargs)
    assert response.code == 400
    assert body["code"] == code
    assert body["message"]
    assert chat.messages.rows == []
    assert chat.unread.hashes == {}


def test_a_wrong_text_type_is_named_in_the_message(chat: Chat) -> None:
    _, body = chat.send(ALICE, BOB, {"text": 42})
    assert "text" in body["message"]


def test_a_missing_user_header_is_a_400(chat: Chat) -> None:
    response, body = chat.call(
        "POST",
        "/v1/dialogs/2/messages",
        data=b'{"text": "x"}',
        headers={"Content-Type": "application/json", "Idempotency-Key": "k"},
    )
    assert response.code == 400
    assert body["code"] == ErrorCode.MISSING_HEADER
    assert "X-Snet-User-Id" in body["message"]


def test_a_text_of_exactly_4096_characters_is_accepted(chat: Chat) -> None:
    response, body = chat.send(ALICE, BOB, {"text": "я" * MAX_TEXT})
    assert response.code == 201
    assert len(body["message"]["text"]) == MAX_TEXT


# --- list -----------------------------------------------------------------------------------


def fill(chat: Chat, count: int) -> None:
    for n in range(count):
        sender, peer = (ALICE, BOB) if n % 2 == 0 else (BOB, ALICE)
        chat.send(sender, peer, {"text": f"m{n}"}, key=f"k{n}")


def test_a_dialog_lists_oldest_first_in_pages(chat: Chat) -> None:
    fill(chat, 5)
    chat.send(ALICE, CAROL, {"text": "not in this dialog"}, key="c")
    response, page1 = chat.list(ALICE, BOB, "?limit=2")
    assert response.code == 200
    assert [m["text"] for m in page1["messages"]] == ["m0", "m1"]
    assert page1["next_after_id"] == 2
    _, page2 = chat.list(BOB, ALICE, f"?limit=2&after_id={page1['next_after_id']}")
    assert [m["text"] for m in page2["messages"]] == ["m2", "m3"]
    _, page3 = chat.list(ALICE, BOB, f"?limit=2&after_id={page2['next_after_id']}")
    assert [m["text"] for m in page3["messages"]] == ["m4"]
    assert page3["next_after_id"] is None


def test_a_full_last_page_says_there_is_no_next_page(chat: Chat) -> None:
    fill(chat, 2)
    _, page = chat.list(ALICE, BOB, "?limit=2")
    assert page["next_after_id"] is None


def test_the_default_page_has_100_messages(chat: Chat) -> None:
    fill(chat, 101)
    _, page = chat.list(ALICE, BOB)
    assert len(page["messages"]) == 100
    assert page["next_after_id"] == 100


def test_reading_a_page_clears_the_counter_and_marks_the_whole_dialog_read(chat: Chat) -> None:
    for n in range(3):
        chat.send(ALICE, BOB, {"text": f"m{n}"}, key=f"k{n}")
    chat.send(CAROL, BOB, {"text": "other"}, key="c")
    assert chat.unread.hashes == {BOB: {ALICE: 3, CAROL: 1}}
    chat.list(BOB, ALICE, "?limit=1")
    assert chat.unread.hashes == {BOB: {CAROL: 1}}
    assert chat.messages.reads == {(BOB, ALICE): 3}


@pytest.mark.parametrize(
    "query", ["?limit=0", "?limit=501", "?limit=abc", "?limit=01", "?limit=-1", "?after_id=x"]
)
def test_bad_paging_parameters_are_a_400(chat: Chat, query: str) -> None:
    fill(chat, 1)
    response, body = chat.list(BOB, ALICE, query)
    assert response.code == 400
    assert body["code"] == ErrorCode.INVALID_PARAMETER
    assert chat.unread.hashes == {BOB: {ALICE: 1}}


def test_listing_with_oneself_is_a_400(chat: Chat) -> None:
    response, _ = chat.list(ALICE, ALICE)
    assert response.code == 400


def test_listing_while_redis_is_down_answers_and_marks_the_dialog_for_repair(chat: Chat) -> None:
    fill(chat, 1)
    chat.unread.failure = RedisUnavailable("cannot reach Redis: Connection refused")
    response, body = chat.list(BOB, ALICE)
    assert response.code == 200
    assert len(body["messages"]) == 1
    assert chat.repairs.marked == [(BOB, ALICE)]


def test_unread_while_redis_is_down_comes_from_mysql(chat: Chat) -> None:
    fill(chat, 3)  # Bob has 2 unread from Alice
    chat.unread.failure = RedisUnavailable("cannot reach Redis: Connection refused")
    response, body = chat.call("GET", "/v1/unread", headers={"X-Snet-User-Id": str(BOB)})
    assert response.code == 200
    assert body == {"total": 2, "dialogs": [{"peer_id": ALICE, "count": 2}]}


# --- unread ---------------------------------------------------------------------------------


def test_unread_gives_the_total_and_each_dialog(chat: Chat) -> None:
    chat.send(CAROL, BOB, {"text": "a"}, key="1")
    chat.send(ALICE, BOB, {"text": "b"}, key="2")
    chat.send(ALICE, BOB, {"text": "c"}, key="3")
    response, body = chat.call("GET", "/v1/unread", headers={"X-Snet-User-Id": str(BOB)})
    assert response.code == 200
    assert body == {
        "total": 3,
        "dialogs": [{"peer_id": ALICE, "count": 2}, {"peer_id": CAROL, "count": 1}],
    }
    _, alice = chat.call("GET", "/v1/unread", headers={"X-Snet-User-Id": str(ALICE)})
    assert alice == {"total": 0, "dialogs": []}


def test_rebuild_recomputes_the_counters_from_mysql(chat: Chat) -> None:
    fill(chat, 3)  # Bob has 2 unread from Alice, Alice 1 from Bob
    chat.unread.ids = {(BOB, ALICE): set(range(40)), (CAROL, ALICE): {1}}
    response, body = chat.call("POST", "/v1/unread/rebuild", headers={"X-Snet-User-Id": str(ALICE)})
    assert response.code == 200
    assert body == {"readers": 2}
    assert chat.unread.hashes == {BOB: {ALICE: 2}, ALICE: {BOB: 1}}


# --- health and metrics ---------------------------------------------------------------------


def test_health_is_ok_with_the_version_when_mysql_answers(chat: Chat) -> None:
    response, body = chat.call("GET", "/health")
    assert response.code == 200
    assert body == {"status": "ok", "version": "9.9.9"}


def test_health_is_503_when_mysql_fails(chat: Chat) -> None:
    chat.messages.ping_result = fail(ConnectionRefusedError())
    response, body = chat.call("GET", "/health")
    assert response.code == 503
    assert body["status"] == "unavailable"
    assert body["code"] == ErrorCode.MYSQL_UNAVAILABLE


def test_health_is_503_when_mysql_does_not_answer_within_a_second(chat: Chat) -> None:
    chat.messages.ping_result = Deferred()
    responses: list[Any] = []
    chat.http.get(BASE + "/health").addCallback(responses.append)
    chat.http.flush()
    chat.clock.advance(0.9)
    chat.http.flush()
    assert responses == []
    chat.clock.advance(0.1)
    chat.http.flush()
    assert [r.code for r in responses] == [503]


def test_health_is_503_while_draining(chat: Chat) -> None:
    chat.in_flight.start_draining()
    response, body = chat.call("GET", "/health")
    assert response.code == 503
    assert body["code"] == ErrorCode.DRAINING


def test_metrics_are_prometheus_text_by_route_template_on_the_admin_listener(chat: Chat) -> None:
    chat.send(ALICE, BOB, {"text": "hi"})
    assert chat.call("GET", "/metrics")[0].code == 404, "not on the public listener"
    admin = StubTreq(chat.api.admin_resource())
    response = result_of(admin.get(BASE + "/metrics"))
    body = result_of(response.content())
    assert response.code == 200
    assert (header(response, "Content-Type") or "").startswith("text/plain")
    assert (
        b'snet_http_requests_total{method="POST",route="/v1/dialogs/<peer_id>/messages",'
        b'status="201"} 1.0' in body
    )


# --- validators (property tests) ------------------------------------------------------------


@given(st.integers(min_value=1, max_value=2**63 - 1))
def test_every_positive_id_below_2_63_in_plain_digits_is_accepted(n: int) -> None:
    assert parse_id(str(n), "peer_id") == n


@given(st.text(max_size=25))
def test_an_id_is_accepted_only_as_plain_ascii_digits_without_leading_zero(text: str) -> None:
    plain = text.isascii() and text.isdigit() and not text.startswith("0")
    valid = plain and 0 < int(text) < 2**63
    try:
        parsed = parse_id(text, "peer_id")
    except BadRequest:
        assert not valid
    else:
        assert valid and parsed == int(text)


@given(st.integers(max_value=0) | st.integers(min_value=2**63))
def test_ids_out_of_range_are_refused(n: int) -> None:
    with pytest.raises(BadRequest):
        parse_id(str(n), "peer_id")


@given(st.text(max_size=MAX_TEXT + 10))
def test_a_text_is_accepted_iff_it_has_content_fits_and_is_valid_unicode(text: str) -> None:
    try:
        text.encode("utf-8")
        encodable = True
    except UnicodeEncodeError:
        encodable = False
    valid = bool(text.strip()) and len(text) <= MAX_TEXT and encodable
    try:
        assert validate_message_text(text) == text
    except BadRequest:
        assert not valid
    else:
        assert valid


@given(st.none() | st.booleans() | st.integers() | st.floats() | st.lists(st.text()))
def test_a_text_that_is_not_a_string_is_refused(value: object) -> None:
    with pytest.raises(BadRequest, match="text"):
        validate_message_text(value)


@given(st.integers(min_value=-1000, max_value=1000).map(str) | st.text(max_size=5))
def test_limit_is_accepted_only_from_1_to_500(text: str) -> None:
    try:
        limit = parse_limit(text)
    except BadRequest:
        assert not (text.isascii() and text.isdigit() and text[0] != "0" and int(text) <= 500)
    else:
        assert 1 <= limit <= 500 and str(limit) == text


@settings(max_examples=50)
@given(
    st.dictionaries(
        st.text(max_size=5),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=5),
            lambda inner: st.lists(inner, max_size=3),
            max_leaves=5,
        ),
        max_size=4,
    )
)
def test_through_the_api_any_body_without_a_good_text_changes_nothing(body: dict[str, Any]) -> None:
    text = body.get("text")
    good = isinstance(text, str) and bool(text.strip())
    chat = Chat()
    response, _ = chat.send(ALICE, BOB, body)
    if good:
        assert response.code == 201
    else:
        assert response.code == 400
        assert chat.messages.rows == [] and chat.unread.hashes == {}


# --- who may call: Connect authorization of the /v1 routes ------------------------------------


class PresentedAuthorizer(ConnectAuthorizer):
    """The real authorizer, with the peer a test says the TLS layer verified (StubTreq's
    transports are not TLS)."""

    peer: PeerIdentity | None = None

    def check_request(self, request: object) -> Deferred[Decision]:
        return self.check_peer(self.peer)


@pytest.fixture
def guarded(chat: Chat) -> tuple[Chat, PresentedAuthorizer, FakeConnectAgent, TestCA]:
    ca = TestCA()
    agent = FakeConnectAgent(ca, "snet-chat")
    consul = TreqConsul(
        ConsulConfig.from_url("http://127.0.0.1:8500"), reactor=chat.clock, http=agent.stub
    )
    authorizer = PresentedAuthorizer(
        consul=consul,
        target="snet-chat",
        source=FixedIdentity(ca.identity("snet-chat")),
        clock=chat.clock,
    )
    chat.api.authorizer = authorizer
    return chat, authorizer, agent, ca


V1_CALLS = [
    ("POST", "/v1/dialogs/2/messages"),
    ("POST", "/v1/sends"),
    ("GET", "/v1/dialogs/2/messages"),
    ("GET", "/v1/unread"),
    ("POST", "/v1/unread/rebuild"),
]


@pytest.mark.parametrize(("method", "path"), V1_CALLS)
def test_without_a_client_certificate_every_v1_route_is_a_401_without_a_bearer_challenge(
    guarded: tuple[Chat, PresentedAuthorizer, FakeConnectAgent, TestCA], method: str, path: str
) -> None:
    chat, _, _, _ = guarded
    response, body = chat.call(
        method,
        path,
        data=json.dumps({"text": "forged"}).encode(),
        headers={"X-Snet-User-Id": "1", "Idempotency-Key": "k", "Content-Type": "application/json"},
    )
    assert response.code == 401
    assert body["code"] == ErrorCode.NO_CLIENT_CERTIFICATE
    assert header(response, "WWW-Authenticate") is None
    assert chat.messages.rows == []


def test_a_caller_consul_does_not_allow_gets_a_403_and_no_data(
    guarded: tuple[Chat, PresentedAuthorizer, FakeConnectAgent, TestCA],
) -> None:
    chat, authorizer, _, ca = guarded
    authorizer.peer = PeerIdentity(ca.spiffe_id("intruder").uri, "01")
    response, body = chat.list(BOB, ALICE)
    assert response.code == 403
    assert body["code"] == ErrorCode.FORBIDDEN
    assert "intruder" in body["message"]
    assert "messages" not in body


def test_a_caller_of_another_trust_domain_gets_a_403_and_its_connection_closed(
    guarded: tuple[Chat, PresentedAuthorizer, FakeConnectAgent, TestCA],
) -> None:
    """Its connection dates from before a move to a new cluster: ``Connection: close`` and
    closed once answered, so that the caller's next call comes on a new connection with its
    current certificate. (Twisted's client keeps ``Connection`` out of the response headers
    StubTreq shows: the request is checked where the app sets them.)"""
    chat, authorizer, agent, _ = guarded
    stale = TestCA().spiffe_id("snet-server").uri
    agent.authorized[stale] = True
    authorizer.peer = PeerIdentity(stale, "01")
    response, body = chat.send(ALICE, BOB, {"text": "hello"})
    assert response.code == 403
    assert "trust domain" in body["message"]
    assert chat.messages.rows == []

    request = DummyRequest([b"v1"])
    request.transport = StringTransport()  # type: ignore[attr-defined]
    refused: list[Failure] = []
    ensureDeferred(chat.api.authorized(request)).addErrback(refused.append)
    assert [f.type for f in refused] == [Forbidden]
    assert request.responseHeaders.getRawHeaders(b"connection") == [b"close"]
    assert not request.transport.disconnecting  # type: ignore[attr-defined]
    request.finish()
    assert request.transport.disconnecting  # type: ignore[attr-defined]


def test_a_caller_consul_refuses_keeps_its_connection(
    guarded: tuple[Chat, PresentedAuthorizer, FakeConnectAgent, TestCA],
) -> None:
    chat, authorizer, _, ca = guarded
    authorizer.peer = PeerIdentity(ca.spiffe_id("intruder").uri, "01")
    request = DummyRequest([b"v1"])
    request.transport = StringTransport()  # type: ignore[attr-defined]
    refused: list[Failure] = []
    ensureDeferred(chat.api.authorized(request)).addErrback(refused.append)
    assert [f.type for f in refused] == [Forbidden]
    assert request.responseHeaders.getRawHeaders(b"connection") is None
    request.finish()
    assert not request.transport.disconnecting  # type: ignore[attr-defined]


def test_the_caller_consul_allows_is_served(
    guarded: tuple[Chat, PresentedAuthorizer, FakeConnectAgent, TestCA],
) -> None:
    chat, authorizer, agent, ca = guarded
    monolith = ca.spiffe_id("snet-server").uri
    agent.authorized[monolith] = True
    authorizer.peer = PeerIdentity(monolith, "02")
    response, _ = chat.send(ALICE, BOB, {"text": "hello"})
    assert response.code == 201
    response, body = chat.list(BOB, ALICE)
    assert response.code == 200
    assert [m["text"] for m in body["messages"]] == ["hello"]


def test_health_needs_no_client_certificate(
    guarded: tuple[Chat, PresentedAuthorizer, FakeConnectAgent, TestCA],
) -> None:
    chat, _, _, _ = guarded
    assert chat.call("GET", "/health")[0].code == 200
