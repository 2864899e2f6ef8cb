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
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from snet.server import chat_client
from snet.server.balancer import RoundRobin
from snet.server.chat_client import ChatClient, ChatInstanceFailed, chat_http_client
from snet.server.discovery import ChatEndpoint
from snet.server.gateway import ChatReply, ChatUnavailable, NoChatInstance
from snet.testing import failure_of, result_of

A = ChatEndpoint("chat-a", "10.0.0.1", 8081)
B = ChatEndpoint("chat-b", "10.0.0.2", 8082)
C = ChatEndpoint("chat-c", "10.0.0.3", 8083)


class FakeChat(Resource):
    """Chat instances told apart by the Host header; each records what it was sent.

    ``behaviour[host]`` is ``"ok"`` (answers as the chat API would), ``"hang"`` (never
    answers), ``"drop"`` (closes the connection without an answer), ``"garbage"`` (200 with a
    body that is not JSON) or a ``(status, body)`` answer.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []
        self.behaviour: dict[str, Any] = {}
        self.hanging: list[Request] = []

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
            return NOT_DONE_YET
        if behaviour == "drop":
            request.loseConnection()
            return NOT_DONE_YET
        if behaviour == "garbage":
            return b"<html>oops</html>"
        if isinstance(behaviour, tuple):
            request.setResponseCode(behaviour[0])
            return json.dumps(behaviour[1]).encode()
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
        d: Deferred[Any] = self.stub.request(method, url, **kwargs)
        return d


class Instances:
    def __init__(self, *endpoints: ChatEndpoint) -> None:
        self.instances = tuple(endpoints)

    def subscribe(self, callback: object) -> Any:
        return lambda: None


class Harness:
    def __init__(self, *endpoints: ChatEndpoint, timeout: float = 5.0) -> None:
        self.clock = Clock()
        self.chat = FakeChat()
        self.network = Network(self.chat)
        self.source = Instances(*endpoints)
        self.registry = CollectorRegistry()
        self.client = ChatClient(
            balancer=RoundRobin(self.source),
            http=self.network,  # type: ignore[arg-type]
            clock=self.clock,
            timeout=timeout,
            registry=self.registry,
        )

    def send(self, text: str = "hi", request_id: str = "req-1") -> Deferred[ChatReply]:
        return self.client.send(
            request_id=request_id, user_id=1, peer_id=2, text=text, idempotency_key="key-1"
        )

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


# --- instances that got the request -----------------------------------------------------------


def test_no_answer_within_the_timeout_is_chat_unavailable_and_not_retried(
    logs: Sequence[LogEvent],
) -> None:
    h = Harness(A, B, timeout=5.0)
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
    assert warnings(logs)[0]["request_id"] == "req-1"


def test_a_connection_lost_mid_request_is_chat_unavailable_and_not_retried() -> None:
    h = Harness(A, B)
    h.chat.behaviour["10.0.0.1"] = "drop"
    d = h.send()
    h.network.stub.flush()
    failure = failure_of(d)
    assert failure.check(ChatInstanceFailed)
    assert failure.value.reason == "lost"
    assert h.chat.hosts() == ["10.0.0.1"]


@pytest.mark.parametrize("status", [500, 502, 503])
def test_a_5xx_answer_is_chat_unavailable_with_the_instances_answer(status: int) -> None:
    """503 included: the public API answers 503 with Retry-After for every such failure."""
    h = Harness(A, B)
    body = {"message": "retry", "request_id": "req-1", "code": status * 100 + 3}
    h.chat.behaviour["10.0.0.1"] = (status, body)
    failure = failure_of(h.send())
    assert failure.check(ChatInstanceFailed)
    error = failure.value
    assert (error.status, error.body, error.instance, error.reason) == (
        status,
        body,
        "chat-a",
        "server_error",
    )
    assert h.chat.hosts() == ["10.0.0.1"]


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
    assert http.pool.persistent
    assert http.pool.maxPersistentPerHost == 7
    http.request("GET", "http://10.0.0.1:8081/v1/unread")
    _host, port, _factory, timeout, _bind = reactor.tcpClients[0]
    assert (port, timeout) == (8081, 0.5)
    assert result_of(http.close()) is None


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
