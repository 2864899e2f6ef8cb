"""TreqConsul: py-consul driven through treq, tested against a fake agent in memory."""

from __future__ import annotations

import json
from typing import Any

import consul
import consul.exceptions
import pytest
import treq.client
from treq.testing import StubTreq
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError, DNSLookupError
from twisted.internet.task import Clock
from twisted.web.client import ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from snet.config import ConsulConfig
from snet.consul import ConsulUnavailable, ResponseHeaders, TreqConsul, parse_duration
from snet.testing import failure_of, result_of

CONFIG = ConsulConfig.from_url("http://127.0.0.1:8500")


class FakeAgent(Resource):
    """Just enough of a Consul agent's HTTP API: services, health, and canned answers.

    ``hang`` makes every request wait for ever (until the client gives up);
    ``answers`` maps a path to a canned (status, body) answer.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[str, str, dict[str, list[str]], Headers, bytes]] = []
        self.services: dict[str, dict[str, Any]] = {}
        self.index = 42
        self.hang = False
        self.hanging: list[Request] = []
        self.answers: dict[str, tuple[int, bytes]] = {}

    def render(self, request: Request) -> bytes | int:
        assert request.method is not None and request.path is not None
        method = request.method.decode()
        path = request.path.decode()
        args = {k.decode(): [v.decode() for v in vs] for k, vs in (request.args or {}).items()}
        body = request.content.read() if request.content is not None else b""
        self.requests.append((method, path, args, request.requestHeaders, body))
        if self.hang:
            self.hanging.append(request)
            return NOT_DONE_YET
        if path in self.answers:
            code, answer = self.answers[path]
            request.setResponseCode(code)
            return answer
        request.setHeader("X-Consul-Index", str(self.index))
        if method == "PUT" and path == "/v1/agent/service/register":
            definition = {k.lower(): v for k, v in json.loads(body).items()}
            self.services[definition.get("id", definition["name"])] = definition
            return b""
        if method == "PUT" and path.startswith("/v1/agent/service/deregister/"):
            if self.services.pop(path.rsplit("/", 1)[1], None) is None:
                request.setResponseCode(404)
                return b"Unknown service ID"
            return b""
        if method == "GET" and path.startswith("/v1/agent/service/"):
            service = self.services.get(path.rsplit("/", 1)[1])
            if service is None:
                request.setResponseCode(404)
                return b"unknown service ID"
            request.setHeader("Content-Type", "application/json")
            return json.dumps({"ID": service.get("id"), "Service": service["name"]}).encode()
        if method == "GET" and path.startswith("/v1/health/service/"):
            name = path.rsplit("/", 1)[1]
            nodes = [
                {"Service": {"ID": s.get("id"), "Port": s.get("port")}, "Checks": []}
                for s in self.services.values()
                if s["name"] == name
            ]
            request.setHeader("Content-Type", "application/json")
            return json.dumps(nodes).encode()
        request.setResponseCode(404)
        return b"no such endpoint in the fake agent"


class SpyTreq:
    """Records the keyword arguments each request got, then lets StubTreq answer it."""

    def __init__(self, stub: StubTreq) -> None:
        self._stub = stub
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def request(self, method: str, url: str, **kwargs: Any) -> Deferred[Any]:
        self.calls.append((method, url, kwargs))
        d: Deferred[Any] = self._stub.request(method, url, **kwargs)
        return d


class RefusingAgent:
    """An IAgent whose connections all fail with *error*."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def request(self, *args: object, **kwargs: object) -> Deferred[Any]:
        return fail(self.error)


def outcome(d: Deferred[Any]) -> list[object]:
    """A list that gets *d*'s result once it has one, leaving the result in *d*."""
    box: list[object] = []

    def keep(result: object) -> object:
        box.append(result)
        return result

    d.addBoth(keep)
    return box


def make_client(
    agent: FakeAgent, config: ConsulConfig = CONFIG, timeout: float = 10.0
) -> tuple[TreqConsul, Clock]:
    clock = Clock()
    return TreqConsul(config, reactor=clock, http=StubTreq(agent), timeout=timeout), clock


def refused_client(error: Exception) -> tuple[TreqConsul, Clock]:
    clock = Clock()
    http = treq.client.HTTPClient(RefusingAgent(error))  # type: ignore[arg-type]
    return TreqConsul(CONFIG, reactor=clock, http=http), clock


def test_register_sends_a_json_body_as_bytes_and_returns_true() -> None:
    """register() answers True; the fake agent stored the JSON definition it was sent."""
    agent = FakeAgent()
    spy = SpyTreq(StubTreq(agent))
    client = TreqConsul(CONFIG, reactor=Clock(), http=spy)  # type: ignore[arg-type]
    d = client.agent.service.register(
        "snet-chat", service_id="chat-1", address="10.0.0.5", port=8081, tags=["a"]
    )
    assert result_of(d) is True
    assert agent.services["chat-1"]["port"] == 8081
    method, url, kwargs = spy.calls[0]
    assert (method, url) == ("PUT", "http://127.0.0.1:8500/v1/agent/service/register")
    assert isinstance(kwargs["data"], bytes)
    assert json.loads(kwargs["data"])["name"] == "snet-chat"


def test_get_without_a_body_sends_no_data() -> None:
    """A GET carries no body at all (py-consul passes an empty string)."""
    spy = SpyTreq(StubTreq(FakeAgent()))
    client = TreqConsul(CONFIG, reactor=Clock(), http=spy)  # type: ignore[arg-type]
    result_of(client.agent.service_definition("nobody"))
    assert spy.calls[0][2]["data"] is None


def test_deregister_of_a_known_service_is_true_and_of_an_unknown_one_false() -> None:
    """py-consul's boolean callback sees the status code: 200 is True, 404 is False."""
    agent = FakeAgent()
    client, _ = make_client(agent)
    result_of(client.agent.service.register("snet-chat", service_id="chat-1", port=1))
    assert result_of(client.agent.service.deregister("chat-1")) is True
    assert agent.services == {}
    assert result_of(client.agent.service.deregister("chat-1")) is False


def test_service_definition_is_parsed_json_or_none_when_unknown() -> None:
    agent = FakeAgent()
    client, _ = make_client(agent)
    assert result_of(client.agent.service_definition("chat-1")) is None
    result_of(client.agent.service.register("snet-chat", service_id="chat-1", port=1))
    assert result_of(client.agent.service_definition("chat-1")) == {
        "ID": "chat-1",
        "Service": "snet-chat",
    }


def test_index_comes_back_as_a_string_that_can_be_passed_back() -> None:
    """health.service returns (index, nodes); the index is py-consul's string."""
    agent = FakeAgent()
    client, _ = make_client(agent)
    result_of(client.agent.service.register("snet-chat", service_id="chat-1", port=8081))
    index, nodes = result_of(client.health.service("snet-chat", passing=True))
    assert index == "42"
    assert [n["Service"]["ID"] for n in nodes] == ["chat-1"]
    result_of(client.health.service("snet-chat", index=index, wait="1s"))
    assert agent.requests[-1][2] == {"index": ["42"], "wait": ["1s"]}


def test_response_headers_are_case_insensitive_strings() -> None:
    """py-consul looks up "X-Consul-Index"; whatever case the server used must match."""
    headers = ResponseHeaders(Headers({b"x-consul-index": [b"7"], b"X-Two": [b"a", b"b"]}))
    assert headers["X-Consul-Index"] == "7"
    assert "X-CONSUL-INDEX" in headers
    assert "X-Missing" not in headers
    assert headers["x-two"] == "a, b"
    assert len(headers) == 2


def test_token_goes_in_the_header_of_every_request() -> None:
    """Even endpoints where py-consul forgets the token (service_definition) send it."""
    agent = FakeAgent()
    config = ConsulConfig.from_url("http://127.0.0.1:8500", token="s3cret")
    client, _ = make_client(agent, config)
    result_of(client.agent.service.register("snet-chat", service_id="chat-1", port=1))
    result_of(client.agent.service_definition("chat-1"))
    tokens = [headers.getRawHeaders(b"X-Consul-Token") for *_, headers, _ in agent.requests]
    assert tokens == [[b"s3cret"], [b"s3cret"]]


def test_token_from_config_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """py-consul would take CONSUL_HTTP_TOKEN over its argument; the config decides here."""
    monkeypatch.setenv("CONSUL_HTTP_TOKEN", "from-env")
    agent = FakeAgent()
    client, _ = make_client(agent, ConsulConfig.from_url("http://127.0.0.1:8500"))
    result_of(client.agent.services())
    assert agent.requests[0][3].getRawHeaders(b"X-Consul-Token") is None


def test_no_token_means_no_token_header() -> None:
    agent = FakeAgent()
    client, _ = make_client(agent)
    result_of(client.agent.service_definition("chat-1"))
    assert not agent.requests[0][3].hasHeader(b"X-Consul-Token")


@pytest.mark.parametrize(
    ("code", "exception"),
    [
        (400, consul.exceptions.BadRequest),
        (403, consul.ACLPermissionDenied),
        (429, consul.exceptions.ClientError),
        (500, consul.ConsulException),
    ],
)
def test_http_errors_keep_py_consul_exceptions(code: int, exception: type[Exception]) -> None:
    agent = FakeAgent()
    agent.answers["/v1/agent/services"] = (code, b"nope")
    client, _ = make_client(agent)
    failure = failure_of(client.agent.services())
    assert type(failure.value) is exception
    assert "nope" in str(failure.value)


def test_a_404_where_py_consul_allows_none_is_not_found() -> None:
    """session.renew does not allow a 404: it is consul.NotFound."""
    agent = FakeAgent()
    client, _ = make_client(agent)
    failure = failure_of(client.session.renew("no-such-session"))
    assert failure.check(consul.NotFound)


def test_raw_bodies_stay_bytes() -> None:
    """snapshot.save asks for raw bytes; they are not decoded."""
    agent = FakeAgent()
    agent.answers["/v1/snapshot"] = (200, b"\x1f\x8b\xff\x00")
    client, _ = make_client(agent)
    assert result_of(client.snapshot.save()) == b"\x1f\x8b\xff\x00"


@pytest.mark.parametrize(
    "error", [ConnectionRefusedError("refused"), DNSLookupError("no such host")]
)
def test_unreachable_agent_is_consul_unavailable(error: Exception) -> None:
    """Connection errors become ConsulUnavailable, which keeps the cause."""
    client, _ = refused_client(error)
    failure = failure_of(client.agent.services())
    assert failure.check(ConsulUnavailable)
    assert failure.value.cause is error
    assert failure.value.__cause__ is error
    assert "127.0.0.1:8500" in str(failure.value)


def test_response_never_received_is_consul_unavailable() -> None:
    """An agent that drops the connection (restart) is unavailable too."""
    client, _ = refused_client(ResponseNeverReceived([]))
    assert failure_of(client.agent.services()).check(ConsulUnavailable)


def test_a_hanging_agent_times_out_into_consul_unavailable() -> None:
    """The call fails once its timeout has passed on the injected clock, not before."""
    agent = FakeAgent()
    agent.hang = True
    client, clock = make_client(agent, timeout=3.0)
    d = client.agent.services()
    clock.advance(2.9)
    assert outcome(d) == []
    clock.advance(0.1)
    failure = failure_of(d)
    assert failure.check(ConsulUnavailable)
    assert isinstance(failure.value.cause, TimeoutError)
    assert "3s" in str(failure.value)
    assert clock.getDelayedCalls() == []


def test_an_answered_call_leaves_no_timer_behind() -> None:
    agent = FakeAgent()
    client, clock = make_client(agent)
    result_of(client.agent.services())
    assert clock.getDelayedCalls() == []


def test_a_blocking_query_gets_its_wait_and_jitter_on_top_of_the_timeout() -> None:
    """wait="5s" with a 10 s timeout: the call may take 10 + 5 + 5/16 seconds."""
    agent = FakeAgent()
    agent.hang = True
    client, clock = make_client(agent, timeout=10.0)
    d = client.health.service("snet-chat", index="42", wait="5s", passing=True)
    clock.advance(10 + 5 + 5 / 16 - 0.01)
    assert outcome(d) == []
    clock.advance(0.02)
    assert failure_of(d).check(ConsulUnavailable)


def test_request_timeout_computation() -> None:
    """Plain calls get the timeout; blocking ones add wait + wait/16 (5 minutes by default)."""
    client, _ = make_client(FakeAgent(), timeout=10.0)
    http = client.http
    assert http.request_timeout(None) == 10.0
    assert http.request_timeout([("passing", "1")]) == 10.0
    assert http.request_timeout([("index", "3"), ("wait", "16s")]) == 10.0 + 16 + 1
    assert http.request_timeout([("index", "3"), ("wait", "1m")]) == 10.0 + 60 + 60 / 16
    assert http.request_timeout([("index", "3")]) == 10.0 + 300 + 300 / 16
    assert http.request_timeout(None, override=2.0) == 2.0


def test_per_call_connections_timeout_overrides_the_default() -> None:
    """py-consul's kv.get(connections_timeout=...) reaches the transport."""
    agent = FakeAgent()
    agent.hang = True
    client, clock = make_client(agent, timeout=10.0)
    d = client.kv.get("key", connections_timeout=1.0)
    clock.advance(1.0)
    assert failure_of(d).check(ConsulUnavailable)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5s", 5.0), ("100ms", 0.1), ("1m30s", 90.0), ("1h", 3600.0), ("1.5s", 1.5), ("", 0.0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_cancelling_a_call_fails_it_with_cancelled_error() -> None:
    agent = FakeAgent()
    agent.hang = True
    client, clock = make_client(agent)
    d = client.agent.services()
    d.cancel()
    assert failure_of(d).check(CancelledError)
    assert clock.getDelayedCalls() == []


def test_close_cancels_calls_in_flight() -> None:
    """close() fires at once with an injected client and cancels what is still waiting."""
    agent = FakeAgent()
    agent.hang = True
    client, clock = make_client(agent)
    d = client.health.service("snet-chat", index="1", wait="5s")
    assert result_of(client.close()) is None
    assert failure_of(d).check(CancelledError)
    assert clock.getDelayedCalls() == []


def test_close_closes_the_clients_own_connection_pool() -> None:
    """Without an injected client, TreqConsul owns a persistent pool and close() closes it."""
    from twisted.internet.testing import MemoryReactorClock

    reactor = MemoryReactorClock()
    client = TreqConsul(CONFIG, reactor=reactor)
    own = client._own_http
    assert own is not None and own.pool.persistent
    assert result_of(client.close()) is None
