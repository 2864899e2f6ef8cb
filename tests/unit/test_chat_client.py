"""ChatClient: dialog calls forwarded to chat instances in turn, in memory on a Clock."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import urlsplit

import pytest
from prometheus_client import CollectorRegistry
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError
from twisted.internet.error import TimeoutError as ConnectTimeoutError
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import LogEvent, LogLevel, capturedLogs, formatEvent
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from snet.connect import ConnectPolicyForHTTPS, FixedIdentity, NoConnectIdentity, PeerIdentityError
from snet.retry import RetryBudget
from snet.server import chat_client
from snet.server.chat_client import (
    ChatClient,
    ChatInstanceFailed,
    chat_http_client,
)
from snet.server.chatwire import ChatWire
from snet.server.discovery import ChatEndpoint
from snet.server.ejection import PassiveHealth
from snet.server.gateway import ChatReply, ChatUnavailable, NoChatInstance
from snet.server.roundrobin import RoundRobin
from snet.server.sendbatch import NotSent, SendBatcher
from snet.testing import failure_of, result_of

A = ChatEndpoint("chat-a", "10.0.0.1", 8081)
B = ChatEndpoint("chat-b", "10.0.0.2", 8082)
C = ChatEndpoint("chat-c", "10.0.0.3", 8083)


class FakeChat(Resource):
    """Chat instances told apart by the Host header; each records what it was sent.

    ``behaviour[host]`` is ``"ok"`` (answers as the chat API would), ``"hang"`` (never
    answers; ``dropped`` says when the client gave up on it), ``"drop"`` (closes the
    connection without an answer), ``"garbage"`` (200 with a body that is not JSON) or a
    ``(status, body)`` answer.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []
        self.behaviour: dict[str, Any] = {}
        self.hanging: list[Request] = []
        self.dropped: list[str] = []  # hosts whose hanging request lost its connection

    def render(self, request: Request) -> bytes | int:
        host = (request.getHeader("host") or "").split(":")[0]
        assert request.method is not None and request.uri is not None
        body = request.content.read() if request.content is not None else b""
        self.calls.append(
            {
                "host": host,
                "method": request.method.decode(),
                "uri": request.uri.decode(),
                "headers": {
                    k.decode().lower(): v[0].decode()
                    for k, v in request.requestHeaders.getAllRawHeaders()
                },
                "body": body,
            }
        )
        behaviour = self.behaviour.get(host, "ok")
        request.setHeader("Content-Type", "application/json")
        if behaviour == "hang":
            self.hanging.append(request)
            request.notifyFinish().addErrback(lambda _: self.dropped.append(host))
            return NOT_DONE_YET
        if behaviour == "drop":
            request.loseConnection()
            return NOT_DONE_YET
        if behaviour == "garbage":
            return b"<html>oops</html>"
        if isinstance(behaviour, tuple):
            request.setResponseCode(behaviour[0])
            return json.dumps(behaviour[1]).encode()
        if request.uri == b"/v1/sends":
            results = [
                {
                    "status": 201,
                    "body": {"message": {"id": 1, "text": item["text"], "host": host}},
                }
                for item in json.loads(body)["sends"]
            ]
            return json.dumps({"results": results}).encode()
        if request.method == b"POST":
            request.setResponseCode(201)
            text = json.loads(body)["text"]
            return json.dumps({"message": {"id": 1, "text": text, "host": host}}).encode()
        return json.dumps({"host": host, "messages": [], "next_after_id": None}).encode()

    def hosts(self) -> list[str]:
        return [c["host"] for c in self.calls]


class Network:
    """StubTreq in front of FakeChat, where some hosts cannot be reached.

    ``refused`` hosts refuse connections, ``timing_out`` ones fail as a connect timeout,
    ``connecting`` ones never finish connecting (until the request is cancelled).
    """

    def __init__(self, chat: FakeChat) -> None:
        self.stub = StubTreq(chat)
        self.refused: set[str] = set()
        self.timing_out: set[str] = set()
        self.connecting: set[str] = set()
        self.rogues: dict[str, str] = {}
        """Hosts whose TLS certificate has another SPIFFE id (the value): the handshake fails."""
        self.requests: list[tuple[str, str, dict[str, Any]]] = []

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.requests.append((method, url, kwargs))
        host = urlsplit(url).hostname
        if host in self.refused:
            return fail(ConnectionRefusedError("refused"))
        if host in self.timing_out:
            return fail(ConnectTimeoutError())
        if host in self.connecting:
            return Deferred(lambda d: d.errback(ConnectingCancelledError(host)))
        if host in self.rogues:
            wrong = PeerIdentityError(
                "the server is someone else", expected=CHAT_ID, found=self.rogues[host]
            )
            return fail(ResponseNeverReceived([Failure(wrong)]))
        d: Deferred[Any] = self.stub.request(method, url.replace("https://", "http://"), **kwargs)
        return d


class Instances:
    def __init__(self, *endpoints: ChatEndpoint) -> None:
        self.instances = tuple(endpoints)

    def subscribe(self, callback: object) -> Any:
        return lambda: None


class Harness:
    """A client over FakeChat behind Network, on a Clock; with *eject_after*, the balancer
    has a passive health that ejects after that many failures."""

    def __init__(
        self,
        *endpoints: ChatEndpoint,
        timeout: float = 5.0,
        deadline: float = 10.0,
        max_attempts: int = 3,
        budget: dict[str, float] | None = None,
        eject_after: int | None = None,
        tls: bool = False,
    ) -> None:
        self.clock = Clock()
        self.chat = FakeChat()
        self.network = Network(self.chat)
        self.source = Instances(*endpoints)
        self.registry = CollectorRegistry()
        self.health = (
            None
            if eject_after is None
            else PassiveHealth(clock=self.clock, consecutive_failures=eject_after)
        )
        self.client = ChatClient(
            balancer=RoundRobin(self.source, health=self.health),
            http=self.network,  # type: ignore[arg-type]
            clock=self.clock,
            timeout=timeout,
            deadline=deadline,
            max_attempts=max_attempts,
            budget=RetryBudget(clock=self.clock, **budget) if budget is not None else None,
            registry=self.registry,
            tls=tls,
        )

    def send(
        self, text: str = "hi", request_id: str = "req-1", key: str = "key-1"
    ) -> Deferred[ChatReply]:
        return self.client.send(
            request_id=request_id, user_id=1, peer_id=2, text=text, idempotency_key=key
        )

    def answer_hanging(self, index: int = 0) -> None:
        """Answer the *index*-th request that hung as a stored send."""
        request = self.chat.hanging[index]
        request.setResponseCode(201)
        request.write(b'{"message": {"id": 1}}')
        request.finish()
        self.network.stub.flush()

    def list(self) -> Deferred[ChatReply]:
        return self.client.list(request_id="req-2", user_id=1, peer_id=2, after_id=None, limit=10)

    def metric(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def logs() -> Iterator[Sequence[LogEvent]]:
    with capturedLogs() as events:
        yield events


def warnings(events: Sequence[LogEvent]) -> list[LogEvent]:
    return [
        e
        for e in events
        if e.get("log_namespace") == "snet.server.chat_client"
        and e.get("log_level") == LogLevel.warn
    ]


# --- forwarding -------------------------------------------------------------------------------


def test_send_posts_the_message_with_identity_request_id_and_idempotency_key() -> None:
    h = Harness(A)
    reply = result_of(h.send("привет"))
    assert reply == ChatReply(
        201, {"message": {"id": 1, "text": "привет", "host": "10.0.0.1"}}, "chat-a"
    )
    (call,) = h.chat.calls
    assert (call["method"], call["uri"]) == ("POST", "/v1/dialogs/2/messages")
    assert call["headers"]["x-snet-user-id"] == "1"
    assert call["headers"]["x-request-id"] == "req-1"
    assert call["headers"]["idempotency-key"] == "key-1"
    assert call["headers"]["content-type"] == "application/json"
    assert json.loads(call["body"]) == {"text": "привет"}
    assert h.network.requests[0][1] == "http://10.0.0.1:8081/v1/dialogs/2/messages"


def test_list_passes_limit_and_after_id_in_the_query() -> None:
    h = Harness(A)
    result_of(h.client.list(request_id="r", user_id=5, peer_id=7, after_id=40, limit=20))
    result_of(h.client.list(request_id="r", user_id=5, peer_id=7, after_id=None, limit=100))
    assert [c["uri"] for c in h.chat.calls] == [
        "/v1/dialogs/7/messages?limit=20&after_id=40",
        "/v1/dialogs/7/messages?limit=100",
    ]
    headers = h.chat.calls[0]["headers"]
    assert headers["x-snet-user-id"] == "5"
    assert "idempotency-key" not in headers


def test_unread_asks_for_the_users_counters() -> None:
    h = Harness(A)
    reply = result_of(h.client.unread(request_id="r-9", user_id=3))
    assert reply.status == 200 and reply.instance == "chat-a"
    call = h.chat.calls[0]
    assert (call["method"], call["uri"], call["headers"]["x-request-id"]) == (
        "GET",
        "/v1/unread",
        "r-9",
    )


def test_calls_go_round_the_instances() -> None:
    h = Harness(A, B, C)
    replies = [result_of(h.list()) for _ in range(6)]
    assert [r.instance for r in replies] == ["chat-a", "chat-b", "chat-c"] * 2
    assert h.chat.hosts() == ["10.0.0.1", "10.0.0.2", "10.0.0.3"] * 2


def test_a_4xx_answer_is_passed_on_as_a_reply() -> None:
    h = Harness(A)
    error = {"message": "invalid text", "request_id": "req-1", "code": 40006}
    h.chat.behaviour["10.0.0.1"] = (400, error)
    assert result_of(h.send()) == ChatReply(400, error, "chat-a")


# --- batches of sends -------------------------------------------------------------------------


def test_sends_that_come_while_one_is_out_go_in_one_batch_each_with_its_reply() -> None:
    h = Harness(A)
    h.chat.behaviour["10.0.0.1"] = "hang"
    first = h.send("one", "r-1", "k-1")
    h.chat.behaviour["10.0.0.1"] = "ok"
    waiting = [h.send("two", "r-2", "k-2"), h.send("three", "r-3", "k-3")]
    assert len(h.chat.calls) == 1
    h.answer_hanging()
    assert result_of(first) == ChatReply(201, {"message": {"id": 1}}, "chat-a")
    assert [result_of(d) for d in waiting] == [
        ChatReply(201, {"message": {"id": 1, "text": text, "host": "10.0.0.1"}}, "chat-a")
        for text in ("two", "three")
    ]
    batch = h.chat.calls[1]
    assert (batch["method"], batch["uri"]) == ("POST", "/v1/sends")
    assert "x-snet-user-id" not in batch["headers"]
    assert json.loads(batch["body"]) == {
        "sends": [
            {"user_id": 1, "peer_id": 2, "idempotency_key": key, "text": text, "request_id": rid}
            for key, text, rid in (("k-2", "two", "r-2"), ("k-3", "three", "r-3"))
        ]
    }
    assert h.metric("snet_chat_send_batch_calls_total") == 1
    assert h.metric("snet_chat_sends_in_batch_calls_total") == 2
    assert h.metric("snet_chat_requests_total", instance="chat-a") == 3  # an attempt per send


def test_without_batch_sends_every_send_is_a_call_of_its_own() -> None:
    h = Harness(A)
    h.client = ChatClient(
        balancer=RoundRobin(h.source),
        http=h.network,  # type: ignore[arg-type]
        clock=h.clock,
        batch_sends=False,
    )
    h.chat.behaviour["10.0.0.1"] = "hang"
    h.send("one", "r-1", "k-1")
    h.send("two", "r-2", "k-2")
    assert [c["uri"] for c in h.chat.calls] == ["/v1/dialogs/2/messages"] * 2


def test_a_batch_answered_5xx_retries_each_of_its_sends_on_the_next_instance() -> None:
    h = Harness(A, B)
    h.chat.behaviour["10.0.0.1"] = "hang"
    calls = [h.send(str(n), f"r-{n}", f"k-{n}") for n in range(5)]  # A, B, A, B, A
    h.chat.behaviour["10.0.0.1"] = (503, {"message": "draining", "code": 50300})
    h.answer_hanging()
    replies = [result_of(d) for d in calls]
    assert [r.instance for r in replies] == ["chat-a", "chat-b", "chat-b", "chat-b", "chat-b"]
    assert [(c["host"], c["uri"]) for c in h.chat.calls[3:]] == [
        ("10.0.0.1", "/v1/sends"),
        ("10.0.0.2", "/v1/dialogs/2/messages"),
        ("10.0.0.2", "/v1/dialogs/2/messages"),
    ]
    assert [c["headers"]["idempotency-key"] for c in h.chat.calls[4:]] == ["k-2", "k-4"]
    assert (
        h.metric("snet_chat_request_failures_total", instance="chat-a", reason="server_error") == 2
    )


def test_a_batch_answer_without_a_result_per_send_is_a_bad_response_retried() -> None:
    h = Harness(A, B)
    h.chat.behaviour["10.0.0.1"] = "hang"
    calls = [h.send(str(n), f"r-{n}", f"k-{n}") for n in range(5)]
    h.chat.behaviour["10.0.0.1"] = (200, {"results": []})
    h.answer_hanging()
    assert [result_of(d).instance for d in calls[2::2]] == ["chat-b", "chat-b"]
    assert (
        h.metric("snet_chat_request_failures_total", instance="chat-a", reason="bad_response") == 2
    )


def test_a_send_waiting_behind_an_instance_that_does_not_answer_is_retried_elsewhere() -> None:
    h = Harness(A, B, timeout=2.0)
    h.chat.behaviour["10.0.0.1"] = "hang"
    calls = [h.send(str(n), f"r-{n}", f"k-{n}") for n in range(3)]  # A, B, A (waits)
    assert len(h.chat.calls) == 2
    h.clock.advance(2.0)
    replies = [result_of(d) for d in calls]
    assert [r.instance for r in replies] == ["chat-b"] * 3
    assert h.clock.getDelayedCalls() == []


def test_a_batch_whose_connection_drops_is_one_failure_of_the_instance_not_one_per_send() -> None:
    h = Harness(A, B, eject_after=3)
    h.chat.behaviour["10.0.0.1"] = "hang"
    calls = [h.send(str(n), f"r-{n}", f"k-{n}") for n in range(7)]  # A: 0 out; 2, 4, 6 wait
    h.chat.behaviour["10.0.0.1"] = "drop"
    h.answer_hanging()  # 0 is answered; the batch of 2, 4, 6 goes and its connection drops
    h.network.stub.flush()
    assert [c["uri"] for c in h.chat.calls if c["host"] == "10.0.0.1"] == [
        "/v1/dialogs/2/messages",
        "/v1/sends",
    ]
    assert [result_of(d).instance for d in calls[2::2]] == ["chat-b"] * 3
    assert h.metric("snet_chat_request_failures_total", instance="chat-a", reason="lost") == 3
    assert h.health is not None and not h.health.ejected("chat-a")


class WaitsOnA:
    """The client's SendBatcher, except that a first attempt on A waits until it is
    cancelled, as behind a call to A that neither ends nor stalls."""

    def __init__(self, batcher: SendBatcher) -> None:
        self.batcher = batcher

    def exchange(
        self, endpoint: ChatEndpoint, send: Any, told: Any = None, *, alone: bool = False
    ) -> Deferred[Any]:
        if endpoint == A and not alone:
            return Deferred(lambda d: d.errback(NotSent(A.instance_id)))
        return self.batcher.exchange(endpoint, send, told, alone=alone)


def test_a_send_that_waited_until_its_timeout_was_never_sent_and_goes_to_the_next_instance(
    logs: Sequence[LogEvent],
) -> None:
    """Not a connect timeout, nor anything against the instance: it was only busy."""
    h = Harness(A, B, timeout=2.0, eject_after=1)
    h.client._sends = WaitsOnA(h.client._sends)  # type: ignore[arg-type, assignment]
    d = h.send("x", "r-x", "k-x")
    h.clock.advance(2.0)
    reply = result_of(d)
    assert reply.instance == "chat-b"
    assert [c["host"] for c in h.chat.calls] == ["10.0.0.2"]
    assert h.metric("snet_chat_request_failures_total", instance="chat-a", reason="not_sent") == 1
    assert h.metric("snet_chat_retries_total", reason="not_sent") == 1
    assert h.health is not None and not h.health.ejected("chat-a")
    assert any(
        "not sent to chat instance chat-a" in formatEvent(e) and e["request_id"] == "r-x"
        for e in warnings(logs)
    )


def test_a_retried_send_goes_by_itself_and_the_sends_after_it_do_not_wait() -> None:
    h = Harness(A, B)
    h.chat.behaviour["10.0.0.1"] = "drop"
    h.chat.behaviour["10.0.0.2"] = "hang"
    first = h.send("0", "r-0", "k-0")  # A drops it: retried on B, where it hangs
    h.network.stub.flush()
    assert [c["host"] for c in h.chat.calls] == ["10.0.0.1", "10.0.0.2"]
    h.chat.behaviour["10.0.0.2"] = "ok"
    h.chat.behaviour["10.0.0.1"] = "ok"
    h.send("1", "r-1", "k-1")  # B (the rotation goes on after B): not held by the retry
    assert [c["host"] for c in h.chat.calls] == ["10.0.0.1", "10.0.0.2", "10.0.0.2"]
    assert h.chat.calls[2]["uri"] == "/v1/dialogs/2/messages"
    first.cancel()
    failure_of(first)


# --- instances that cannot be reached ---------------------------------------------------------


def test_a_send_to_a_refusing_instance_goes_to_the_next_one_at_once(
    logs: Sequence[LogEvent],
) -> None:
    h = Harness(A, B)
    h.network.refused.add("10.0.0.1")
    reply = result_of(h.send(request_id="req-77"))
    assert (reply.status, reply.instance) == (201, "chat-b")
    assert h.chat.hosts() == ["10.0.0.2"]
    assert h.chat.calls[0]["headers"]["idempotency-key"] == "key-1"
    (warning,) = warnings(logs)
    assert warning["request_id"] == "req-77"
    assert warning["reason"] == "refused"
    assert "req-77" in str(formatEvent(warning))
    assert h.metric("snet_chat_request_failures_total", instance="chat-a", reason="refused") == 1
    assert h.clock.getDelayedCalls() == []


def test_calls_go_round_the_instances_that_answer_when_one_refuses() -> None:
    """The refusing instance's share is spread, not all handed to the instance after it."""
    h = Harness(A, B, C)
    h.network.refused.add("10.0.0.1")
    replies = [result_of(h.list()) for _ in range(6)]
    assert [r.instance for r in replies] == ["chat-b", "chat-c"] * 3


def test_a_connect_timeout_is_skipped_like_a_refusal() -> None:
    h = Harness(A, B)
    h.network.timing_out.add("10.0.0.1")
    assert result_of(h.list()).instance == "chat-b"
    assert (
        h.metric("snet_chat_request_failures_total", instance="chat-a", reason="connect_timeout")
        == 1
    )


def test_an_instance_still_connecting_when_the_timeout_ends_is_skipped() -> None:
    """Cancelled before it had a connection: the request never reached it."""
    h = Harness(A, B, timeout=2.0)
    h.network.connecting.add("10.0.0.1")
    d = h.send()
    assert h.chat.calls == []
    h.clock.advance(2.0)
    assert result_of(d).instance == "chat-b"


def test_every_instance_refusing_is_chat_unavailable() -> None:
    h = Harness(A, B)
    h.network.refused |= {"10.0.0.1", "10.0.0.2"}
    failure = failure_of(h.send())
    assert failure.check(ChatUnavailable)
    assert not failure.check(ChatInstanceFailed)
    assert "chat-a (refused)" in str(failure.value)
    assert "chat-b (refused)" in str(failure.value)


def test_no_instance_at_all_is_no_chat_instance() -> None:
    h = Harness()
    assert failure_of(h.send()).check(NoChatInstance)
    assert h.network.requests == []


# --- instances that got the request: retried elsewhere ----------------------------------------


def test_a_send_that_got_no_answer_is_retried_on_the_next_instance_with_the_same_key(
    logs: Sequence[LogEvent],
) -> None:
    """The chat service stores a send once per (sender, key): the retry cannot duplicate."""
    h = Harness(A, B, C, timeout=2.0)
    h.chat.behaviour["10.0.0.1"] = "hang"
    d = h.send("привет", request_id="req-5")
    h.clock.advance(1.9)
    assert not d.called
    h.clock.advance(0.1)
    reply = result_of(d)
    assert (reply.status, reply.instance) == (201, "chat-b")
    assert h.chat.hosts() == ["10.0.0.1", "10.0.0.2"]
    first, second = h.chat.calls
    assert first["headers"]["idempotency-key"] == second["headers"]["idempotency-key"] == "key-1"
    assert first["body"] == second["body"]
    assert second["headers"]["x-request-id"] == "req-5"
    assert h.metric("snet_chat_request_failures_total", instance="chat-a", reason="timeout") == 1
    assert h.metric("snet_chat_retries_total", reason="timeout") == 1
    assert h.clock.getDelayedCalls() == []
    assert all(e["request_id"] == "req-5" for e in warnings(logs))


def test_a_send_whose_connection_was_lost_is_retried_with_the_same_key() -> None:
    h = Harness(A, B)
    h.chat.behaviour["10.0.0.1"] = "drop"
    d = h.send()
    h.network.stub.flush()
    reply = result_of(d)
    assert reply.instance == "chat-b"
    assert [c["headers"]["idempotency-key"] for c in h.chat.calls] == ["key-1", "key-1"]
    assert h.metric("snet_chat_request_failures_total", instance="chat-a", reason="lost") == 1
    assert h.metric("snet_chat_retries_total", reason="lost") == 1


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_send_answered_5xx_is_retried_with_the_same_key(status: int) -> None:
    """503 included (50303: not stored, retry with the same key)."""
    h = Harness(A, B)
    h.chat.behaviour["10.0.0.1"] = (status, {"message": "x", "code": status * 100})
    reply = result_of(h.send())
    assert (reply.status, reply.instance) == (201, "chat-b")
    assert [c["headers"]["idempotency-key"] for c in h.chat.calls] == ["key-1", "key-1"]


def test_a_list_is_retried_freely() -> None:
    h = Harness(A, B)
    h.chat.behaviour["10.0.0.1"] = (500, {"message": "x", "code": 50000})
    reply = result_of(h.list())
    assert (reply.status, reply.instance) == (200, "chat-b")
    assert [(c["host"], c["method"]) for c in h.chat.calls] == [
        ("10.0.0.1", "GET"),
        ("10.0.0.2", "GET"),
    ]
    assert "idempotency-key" not in h.chat.calls[1]["headers"]


def test_a_4xx_answer_is_not_retried() -> None:
    h = Harness(A, B)
    h.chat.behaviour["10.0.0.1"] = (409, {"message": "key reused", "code": 40901})
    assert result_of(h.send()).status == 409
    assert h.chat.hosts() == ["10.0.0.1"]


def test_the_rotation_goes_on_after_the_instance_that_served_a_retry() -> None:
    """A's failed call is served by B, so the next call goes to C: A's share is spread."""
    h = Harness(A, B, C)
    h.chat.behaviour["10.0.0.1"] = (500, {})
    assert [result_of(h.list()).instance for _ in range(4)] == [
        "chat-b",
        "chat-c",
        "chat-b",
        "chat-c",
    ]


def test_when_every_instance_fails_the_last_failure_is_raised() -> None:
    h = Harness(A, B)
    h.chat.behaviour["10.0.0.1"] = (500, {"message": "a", "code": 50000})
    body = {"message": "b", "request_id": "req-1", "code": 50300}
    h.chat.behaviour["10.0.0.2"] = (503, body)
    failure = failure_of(h.send())
    assert failure.check(ChatInstanceFailed)
    error = failure.value
    assert (error.status, error.body, error.instance, error.reason) == (
        503,
        body,
        "chat-b",
        "server_error",
    )
    assert h.chat.hosts() == ["10.0.0.1", "10.0.0.2"]
    assert h.metric("snet_chat_retries_denied_total", cause="no_instance") == 1


def test_a_single_instance_that_gives_no_answer_is_chat_unavailable() -> None:
    h = Harness(A, timeout=5.0)
    h.chat.behaviour["10.0.0.1"] = "hang"
    d = h.send()
    h.clock.advance(4.9)
    assert not d.called
    h.clock.advance(0.1)
    failure = failure_of(d)
    assert failure.check(ChatInstanceFailed)
    assert failure.value.reason == "timeout"
    assert h.chat.hosts() == ["10.0.0.1"]
    assert h.clock.getDelayedCalls() == []


def test_max_attempts_bounds_the_attempts_of_a_call() -> None:
    endpoints = [ChatEndpoint(f"chat-{n}", f"10.0.1.{n}", 8080) for n in range(5)]
    h = Harness(*endpoints, max_attempts=3)
    for n in range(5):
        h.chat.behaviour[f"10.0.1.{n}"] = (500, {})
    failure = failure_of(h.list())
    assert failure.value.instance == "chat-2"
    assert h.chat.hosts() == ["10.0.1.0", "10.0.1.1", "10.0.1.2"]
    assert h.metric("snet_chat_retries_total", reason="server_error") == 2
    assert h.metric("snet_chat_retries_denied_total", cause="attempts") == 1


def test_one_attempt_means_no_retry_after_reaching_an_instance() -> None:
    h = Harness(A, B, max_attempts=1)
    h.chat.behaviour["10.0.0.1"] = (500, {})
    assert failure_of(h.send()).check(ChatInstanceFailed)
    assert h.chat.hosts() == ["10.0.0.1"]


def test_refused_connections_are_skipped_at_once_and_cost_no_attempt_or_budget() -> None:
    """Never reached: no process did any work, so the skip is free (but bounded by the
    instances: each is tried once per call)."""
    endpoints = [ChatEndpoint(f"chat-{n}", f"10.0.1.{n}", 8080) for n in range(4)]
    h = Harness(*endpoints, max_attempts=1, budget={"ratio": 0.0, "min_per_second": 0.0})
    h.network.refused |= {"10.0.1.0", "10.0.1.1"}
    h.network.timing_out.add("10.0.1.2")
    reply = result_of(h.send())
    assert reply.instance == "chat-3"
    assert h.chat.hosts() == ["10.0.1.3"]
    assert h.metric("snet_chat_retries_total", reason="refused") == 2
    assert h.metric("snet_chat_retries_total", reason="connect_timeout") == 1
    assert h.clock.seconds() == 0.0


# --- the retry budget -------------------------------------------------------------------------


def test_the_budget_stops_retries_when_exhausted_and_refills_as_the_window_slides() -> None:
    h = Harness(A, B, budget={"ratio": 0.0, "min_per_second": 0.2, "window": 10.0})
    h.chat.behaviour["10.0.0.1"] = (500, {})
    assert h.client.budget.available() == 2
    assert [result_of(h.list()).instance for _ in range(2)] == ["chat-b", "chat-b"]
    failure = failure_of(h.list())
    assert failure.check(ChatInstanceFailed) and failure.value.instance == "chat-a"
    assert h.metric("snet_chat_retries_denied_total", cause="budget") == 1
    assert h.metric("snet_chat_retry_budget_available") == 0
    h.clock.advance(10.0)
    assert h.client.budget.available() == 2
    assert result_of(h.list()).instance == "chat-b"


# --- the deadline -----------------------------------------------------------------------------


def test_the_deadline_stops_retries_and_bounds_the_last_attempt() -> None:
    """Attempts of 2 s, 2 s, then the 1 s left; none starts after the deadline. The attempt
    cut short by the deadline is not held against its instance."""
    endpoints = [ChatEndpoint(f"chat-{n}", f"10.0.1.{n}", 8080) for n in range(5)]
    h = Harness(*endpoints, timeout=2.0, deadline=5.0, max_attempts=10, eject_after=1)
    for n in range(5):
        h.chat.behaviour[f"10.0.1.{n}"] = "hang"
    d = h.send()
    h.clock.advance(2.0)
    h.clock.advance(2.0)
    assert h.chat.hosts() == ["10.0.1.0", "10.0.1.1", "10.0.1.2"]
    h.clock.advance(0.9)
    assert not d.called
    h.clock.advance(0.1)
    failure = failure_of(d)
    assert failure.check(ChatInstanceFailed)
    assert (failure.value.instance, failure.value.reason) == ("chat-2", "timeout")
    assert "within 1s" in str(failure.value)
    assert h.chat.hosts() == ["10.0.1.0", "10.0.1.1", "10.0.1.2"]
    assert h.metric("snet_chat_retries_denied_total", cause="deadline") == 1
    assert h.clock.getDelayedCalls() == []
    assert h.health is not None
    assert [h.health.ejection_count(f"chat-{n}") for n in range(3)] == [1, 1, 0]


def test_a_timed_out_attempt_is_cancelled_and_its_connection_dropped() -> None:
    h = Harness(A, B, timeout=2.0)
    h.chat.behaviour["10.0.0.1"] = "hang"
    d = h.send()
    assert h.chat.dropped == []
    h.clock.advance(2.0)
    h.network.stub.flush()
    assert h.chat.dropped == ["10.0.0.1"]
    assert result_of(d).instance == "chat-b"
    assert h.clock.getDelayedCalls() == []


def test_cancelling_a_call_during_a_retry_stops_it_and_leaves_no_timer() -> None:
    h = Harness(A, B, C, timeout=2.0)
    h.chat.behaviour["10.0.0.1"] = "hang"
    h.chat.behaviour["10.0.0.2"] = "hang"
    d = h.send()
    h.clock.advance(2.0)
    assert h.chat.hosts() == ["10.0.0.1", "10.0.0.2"]
    d.cancel()
    assert failure_of(d).check(CancelledError)
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(10.0)
    assert h.chat.hosts() == ["10.0.0.1", "10.0.0.2"]


# --- passive health ---------------------------------------------------------------------------


def test_an_instance_that_keeps_failing_is_ejected_and_its_share_spread() -> None:
    h = Harness(A, B, C, eject_after=2)
    h.chat.behaviour["10.0.0.1"] = (500, {})
    served = [result_of(h.list()).instance for _ in range(6)]
    # A fails the first call and the third (its turn again): ejected, it gets no more.
    assert served == ["chat-b", "chat-c", "chat-b", "chat-c", "chat-b", "chat-c"]
    assert h.chat.hosts().count("10.0.0.1") == 2
    assert h.health is not None and h.health.ejected("chat-a")


def test_a_refusing_instance_is_ejected_at_once_and_no_longer_tried() -> None:
    h = Harness(A, B, eject_after=3)
    h.network.refused.add("10.0.0.1")
    for _ in range(4):
        assert result_of(h.list()).instance == "chat-b"
    assert [urlsplit(r[1]).hostname for r in h.network.requests].count("10.0.0.1") == 1


def test_answers_below_500_keep_an_instance_in_good_standing() -> None:
    h = Harness(A, eject_after=1)
    h.chat.behaviour["10.0.0.1"] = (400, {"message": "bad", "code": 40000})
    for _ in range(3):
        assert result_of(h.send()).status == 400
    assert h.health is not None and not h.health.ejected("chat-a")


def test_an_answer_that_is_not_json_is_chat_unavailable() -> None:
    h = Harness(A)
    h.chat.behaviour["10.0.0.1"] = "garbage"
    failure = failure_of(h.list())
    assert failure.check(ChatInstanceFailed)
    assert failure.value.reason == "bad_response"


def test_an_answer_over_the_size_limit_is_chat_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_client, "MAX_BODY", 10)
    h = Harness(A)
    failure = failure_of(h.list())
    assert failure.check(ChatInstanceFailed)
    assert failure.value.reason == "bad_response"


def test_cancelling_a_call_cancels_the_request_and_leaves_no_timer() -> None:
    """The caller gave up: no retry, no failure held against the instance."""
    h = Harness(A)
    h.chat.behaviour["10.0.0.1"] = "hang"
    d = h.send()
    d.cancel()
    assert failure_of(d).check(CancelledError)
    assert h.clock.getDelayedCalls() == []


# --- metrics and plumbing ---------------------------------------------------------------------


def test_metrics_count_attempts_failures_and_answer_times() -> None:
    h = Harness(A, B)
    h.network.refused.add("10.0.0.1")
    result_of(h.send())
    result_of(h.send())
    assert h.metric("snet_chat_requests_total", instance="chat-a") == 2
    assert h.metric("snet_chat_requests_total", instance="chat-b") == 2
    assert h.metric("snet_chat_request_failures_total", instance="chat-a", reason="refused") == 2
    assert h.metric("snet_chat_request_seconds_count", instance="chat-b") == 2
    assert h.metric("snet_chat_request_seconds_count", instance="chat-a") == 0


def test_the_http_client_keeps_connections_alive_and_bounds_connecting() -> None:
    reactor = MemoryReactorClock()
    http = chat_http_client(reactor, connect_timeout=0.5, max_per_host=7)
    assert isinstance(http, ChatWire) and not http.tls
    assert http.max_idle == 7
    client = ChatClient(balancer=RoundRobin(Instances(A)), http=http, clock=reactor)
    client.unread(request_id="r", user_id=1)
    _host, port, _factory, timeout, _bind = reactor.tcpClients[0]
    assert (port, timeout) == (8081, 0.5)
    assert result_of(http.close()) is None


def test_a_chat_wire_must_agree_with_the_client_on_tls() -> None:
    """The wire's TLS policy decides the scheme: a client told otherwise refuses to start."""
    plain = chat_http_client(MemoryReactorClock())
    with pytest.raises(ValueError, match="tls=True needs"):
        ChatClient(balancer=RoundRobin(Instances(A)), http=plain, clock=Clock(), tls=True)
    policy = ConnectPolicyForHTTPS(FixedIdentity(None))
    secure = chat_http_client(MemoryReactorClock(), tls=policy)
    assert secure.tls
    with pytest.raises(ValueError, match="pass tls=True"):
        ChatClient(balancer=RoundRobin(Instances(A)), http=secure, clock=Clock())


def test_a_client_without_an_http_client_makes_and_closes_its_own() -> None:
    reactor = MemoryReactorClock()
    client = ChatClient(balancer=RoundRobin(Instances(A)), clock=reactor, connect_timeout=0.25)
    client.unread(request_id="r", user_id=1)
    assert reactor.tcpClients[0][3] == 0.25
    assert result_of(client.close()) is None
    injected = ChatClient(
        balancer=RoundRobin(Instances(A)),
        http=Network(FakeChat()),  # type: ignore[arg-type]
        clock=Clock(),
    )
    assert result_of(injected.close()) is None


def test_the_monolith_takes_attempts_deadline_and_ejection_from_options_or_environment() -> None:
    from twisted.python.usage import UsageError

    from snet.server.tap import Options

    mysql = {"SNET_MYSQL": "mysql://u:p@127.0.0.1:3306/snet"}
    defaults = Options(environ=mysql)
    defaults.parseOptions([])
    assert [defaults[o] for o in ("chat-timeout", "chat-deadline", "chat-attempts")] == [
        2.0,
        10.0,
        3,
    ]
    assert defaults["eject-after"] == 3
    environ = {
        **mysql,
        "SNET_CHAT_ATTEMPTS": "5",
        "SNET_CHAT_DEADLINE": "4.5",
        "SNET_EJECT_AFTER": "2",
    }
    options = Options(environ=environ)
    options.parseOptions(["--chat-attempts", "4"])
    assert (options["chat-attempts"], options["chat-deadline"], options["eject-after"]) == (
        4,
        4.5,
        2,
    )
    with pytest.raises(UsageError, match="--eject-after"):
        Options(environ=mysql).parseOptions(["--eject-after", "0"])


# --- Connect: an instance that is not the chat service -----------------------------------------

CHAT_ID = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/snet-chat"
ROGUE_ID = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/intruder"


def test_with_tls_instances_are_called_over_https() -> None:
    h = Harness(A, tls=True)
    result_of(h.list())
    assert [url for _, url, _ in h.network.requests] == [
        f"https://10.0.0.1:{A.port}/v1/dialogs/2/messages?limit=10"
    ]


def test_a_rogue_instance_is_ejected_at_once_and_the_send_goes_elsewhere_with_the_same_key(
    logs: Sequence[LogEvent],
) -> None:
    h = Harness(A, B, eject_after=3, tls=True)
    h.network.rogues["10.0.0.1"] = ROGUE_ID
    reply = result_of(h.send(request_id="req-9"))
    assert (reply.status, reply.instance) == (201, "chat-b")
    assert h.chat.hosts() == ["10.0.0.2"]  # nothing reached the rogue: the handshake failed
    assert h.chat.calls[0]["headers"]["idempotency-key"] == "key-1"
    assert h.metric("snet_chat_request_failures_total", instance="chat-a", reason="identity") == 1
    assert h.health is not None and h.health.ejected("chat-a")
    (warning,) = warnings(logs)
    assert (warning["instance"], warning["found"]) == ("chat-a", ROGUE_ID)
    assert warning["expected"] == CHAT_ID
    assert "req-9" in formatEvent(warning)
    # Ejected: the next calls go to chat-b alone, without trying the rogue again.
    assert [result_of(h.list()).instance for _ in range(3)] == ["chat-b"] * 3
    assert h.metric("snet_chat_requests_total", instance="chat-a") == 1


def test_without_an_identity_of_its_own_the_monolith_does_not_blame_the_instance() -> None:
    h = Harness(A, B, eject_after=1, tls=True)
    failing = NoConnectIdentity("no connect identity yet")
    h.network.request = lambda *a, **k: fail(ResponseNeverReceived([Failure(failing)]))  # type: ignore[method-assign]
    assert failure_of(h.list()).check(ChatUnavailable)
    assert (
        h.metric("snet_chat_request_failures_total", instance="chat-a", reason="no_identity") == 1
    )
    assert h.health is not None and not h.health.ejected("chat-a")
