"""Unit tests of the snet.web package: request ids, the JSON error mapping, JSON bodies,
draining and metrics, through a small Klein app served in memory by StubTreq, its routes run
by Klein and run directly (the ``api`` fixture)."""

from __future__ import annotations

import json
from typing import Any

import pymysql
import pytest
import txredisapi
from hypothesis import given
from hypothesis import strategies as st
from klein import Klein
from treq.testing import StubTreq
from twisted.internet import defer, error
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest
from werkzeug.routing import MapAdapter

from snet.testing import failure_of, result_of
from snet.web.direct import DirectRoutes
from snet.web.draining import InFlight
from snet.web.errors import (
    ApiError,
    BadRequest,
    Conflict,
    ErrorCode,
    NotFound,
    Unavailable,
    error_response,
)
from snet.web.inputs import read_json_object
from snet.web.metrics import HTTPMetrics
from snet.web.requests import is_client_token, json_response, request_id
from snet.web.service import ObservedResource, RoutedKlein, uncancellable

BASE = "http://chat.test"


class SampleAPI:
    """A Klein app built like the real ones, whose handlers do what a test tells them."""

    app = Klein()

    def __init__(self, direct: bool = False) -> None:
        self.direct = direct
        self.clock = Clock()
        self.in_flight = InFlight()
        self.metrics = HTTPMetrics()
        self.metrics.track(self.in_flight)
        self.raise_: BaseException | None = None
        self.pending: Deferred[bytes] | None = None
        self.seen_ids: list[str] = []

    def resource(self) -> Any:
        direct = DirectRoutes.none()
        if self.direct:
            direct = DirectRoutes.of(self.app, {"item", "echo"})
        return ObservedResource(
            self.app.resource(),
            in_flight=self.in_flight,
            metrics=self.metrics,
            clock=self.clock,
            direct=direct,
        )

    @app.handle_errors(Exception)
    def _error(self, request: IRequest, failure: Failure) -> bytes:
        return error_response(request, failure)

    @app.route("/items/<item_id>", methods=["GET"])
    def item(self, request: IRequest, item_id: str) -> Any:
        self.seen_ids.append(request_id(request))
        self.seen_ids.append(request_id(request))
        if self.raise_ is not None:
            raise self.raise_
        if self.pending is not None:
            return self.pending
        return json_response(request, {"item": item_id})

    @app.route("/echo", methods=["POST"])
    def echo(self, request: IRequest) -> bytes:
        return json_response(request, read_json_object(request, limit=1024))


@pytest.fixture(params=[False, True], ids=["klein", "direct"])
def api(request: pytest.FixtureRequest) -> SampleAPI:
    """The app with its routes run by Klein, and run directly (snet.web.direct): every test
    that takes it holds for both."""
    return SampleAPI(direct=request.param)


@pytest.fixture
def http(api: SampleAPI) -> StubTreq:
    return StubTreq(api.resource())


def call(http: StubTreq, method: str, path: str, **kwargs: Any) -> tuple[Any, Any]:
    """Make a request in memory; return (response, parsed JSON body or raw bytes)."""
    d = http.request(method, BASE + path, **kwargs)
    http.flush()
    response = result_of(d)
    raw = result_of(response.content())
    try:
        return response, json.loads(raw)
    except ValueError:
        return response, raw


def raw_http(resource: Any, data: bytes) -> tuple[Any, StringTransport]:
    """A Site's channel for *resource* on an in-memory transport, fed the raw bytes *data*:
    for requests StubTreq cannot make (a bad Host header, a connection lost mid-request)."""
    channel = Site(resource).buildProtocol(None)
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(data)
    return channel, transport


def header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name)
    return values[0] if values else None


# --- request ids ----------------------------------------------------------------------------


def test_a_sane_client_request_id_is_kept_and_echoed(http: StubTreq, api: SampleAPI) -> None:
    response, _ = call(http, "GET", "/items/1", headers={"X-Request-ID": "edge-1:a.b_c"})
    assert header(response, "X-Request-ID") == "edge-1:a.b_c"
    assert api.seen_ids == ["edge-1:a.b_c", "edge-1:a.b_c"]


@pytest.mark.parametrize("given_id", ["", "x" * 129, "has space", "semi;colon", "ünicode"])
def test_an_insane_client_request_id_is_replaced_by_a_uuid(
    http: StubTreq, api: SampleAPI, given_id: str
) -> None:
    response, _ = call(http, "GET", "/items/1", headers={"X-Request-ID": given_id.encode()})
    rid = header(response, "X-Request-ID")
    assert rid is not None and rid != given_id
    assert len(rid) == 32 and int(rid, 16) >= 0
    assert api.seen_ids == [rid, rid]


def test_without_a_client_id_each_request_gets_its_own(http: StubTreq) -> None:
    first, _ = call(http, "GET", "/items/1")
    second, _ = call(http, "GET", "/items/1")
    assert header(first, "X-Request-ID") != header(second, "X-Request-ID")


@given(st.text(max_size=200))
def test_is_client_token_accepts_exactly_1_to_128_safe_characters(text: str) -> None:
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-")
    assert is_client_token(text) == (1 <= len(text) <= 128 and set(text) <= allowed)


def test_each_request_is_logged_once_at_its_end_with_its_request_id(
    http: StubTreq, api: SampleAPI
) -> None:
    with capturedLogs() as events:
        call(http, "GET", "/items/7", headers={"X-Request-ID": "rid-7"})
    lines = [e for e in events if e.get("log_namespace") == "snet.web" and "route" in e]
    assert len(lines) == 1
    line = lines[0]
    assert line["method"] == "GET"
    assert line["route"] == "/items/<item_id>"
    assert line["status"] == 200
    assert line["request_id"] == "rid-7"
    assert "ms" in line


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (BadRequest("bad thing"), 400, ErrorCode.BAD_REQUEST),
        (NotFound("no thing"), 404, ErrorCode.NOT_FOUND),
        (Conflict("other thing", code=ErrorCode.IDEMPOTENCY_KEY_REUSED), 409, 40901),
        (Unavailable("later"), 503, ErrorCode.UNAVAILABLE),
    ],
)
def test_api_errors_become_json_with_their_status_message_code_and_request_id(
    http: StubTreq, api: SampleAPI, exc: ApiError, status: int, code: int
) -> None:
    api.raise_ = exc
    response, body = call(http, "GET", "/items/1", headers={"X-Request-ID": "r1"})
    assert response.code == status
    assert header(response, "Content-Type") == "application/json"
    assert body == {"message": exc.message, "request_id": "r1", "code": code}


def test_unavailable_says_when_to_retry(http: StubTreq, api: SampleAPI) -> None:
    api.raise_ = Unavailable("later")
    response, _ = call(http, "GET", "/items/1")
    assert header(response, "Retry-After") == "1"


def test_an_unknown_exception_is_a_500_without_details_and_is_logged_with_the_request_id(
    http: StubTreq, api: SampleAPI
) -> None:
    api.raise_ = KeyError("secret internals")
    with capturedLogs() as events:
        response, body = call(http, "GET", "/items/1", headers={"X-Request-ID": "r500"})
    assert response.code == 500
    assert body == {"message": "internal error", "request_id": "r500", "code": 50000}
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["request_id"] == "r500"
    assert failures[0]["log_failure"].check(KeyError)


@pytest.mark.parametrize(
    "exc",
    [
        pymysql.err.OperationalError(2003, "Can't connect to MySQL server"),
        pymysql.err.OperationalError(2013, "Lost connection to MySQL server during query"),
        pymysql.err.OperationalError(1213, "Deadlock found"),
        pymysql.err.InterfaceError(0, ""),
        error.ConnectionRefusedError(),
        error.ConnectionLost(),
        error.ConnectionDone(),
        txredisapi.ConnectionError("Not connected"),
        txredisapi.TimeoutError("Not received Redis response in 2 seconds"),
        defer.TimeoutError(),
        TimeoutError(),
    ],
    ids=lambda e: type(e).__name__ + str(getattr(e, "args", ""))[:12],
)
def test_back_end_connection_errors_are_503_with_retry_after(
    http: StubTreq, api: SampleAPI, exc: BaseException
) -> None:
    api.raise_ = exc
    response, body = call(http, "GET", "/items/1")
    assert response.code == 503
    assert header(response, "Retry-After") == "1"
    assert body["code"] == ErrorCode.UNAVAILABLE


def test_a_mysql_error_that_is_a_bug_is_a_500_not_a_503(http: StubTreq, api: SampleAPI) -> None:
    api.raise_ = pymysql.err.OperationalError(1054, "Unknown column 'nope' in 'field list'")
    response, _ = call(http, "GET", "/items/1")
    assert response.code == 500


def test_an_unknown_path_is_a_json_404(http: StubTreq) -> None:
    response, body = call(http, "GET", "/nowhere", headers={"X-Request-ID": "r404"})
    assert response.code == 404
    assert body["request_id"] == "r404"
    assert body["code"] == ErrorCode.NOT_FOUND


def test_a_wrong_method_is_a_json_405_listing_the_allowed_ones(http: StubTreq) -> None:
    response, body = call(http, "DELETE", "/items/1")
    assert response.code == 405
    assert "GET" in (header(response, "Allow") or "")
    assert body["code"] == ErrorCode.METHOD_NOT_ALLOWED


# --- JSON bodies ----------------------------------------------------------------------------


def test_a_json_object_body_is_read(http: StubTreq) -> None:
    response, body = call(
        http,
        "POST",
        "/echo",
        data=b'{"a": [1, "\\u00e9"]}',
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert response.code == 200
    assert body == {"a": [1, "é"]}


@pytest.mark.parametrize(
    ("data", "content_type", "code"),
    [
        (b'{"a": 1', "application/json", ErrorCode.INVALID_JSON),
        (b"[1, 2]", "application/json", ErrorCode.INVALID_JSON),
        (b'"text"', "application/json", ErrorCode.INVALID_JSON),
        (b"", "application/json", ErrorCode.INVALID_JSON),
        (b'{"a": NaN}', "application/json", ErrorCode.INVALID_JSON),
        (b'{"a": "\xff"}', "application/json", ErrorCode.INVALID_JSON),
        (b'{"a": 1}', "text/plain", ErrorCode.UNSUPPORTED_CONTENT_TYPE),
        (b'{"a": 1}', "", ErrorCode.UNSUPPORTED_CONTENT_TYPE),
        (b'{"a": "' + b"x" * 1100 + b'"}', "application/json", ErrorCode.BODY_TOO_LARGE),
    ],
)
def test_a_bad_body_is_a_400_saying_what_is_wrong(
    http: StubTreq, data: bytes, content_type: str, code: int
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response, body = call(http, "POST", "/echo", data=data, headers=headers)
    assert response.code == 400
    assert body["code"] == code
    assert body["message"]


# --- draining -------------------------------------------------------------------------------


def test_in_flight_counts_a_request_until_it_finishes(http: StubTreq, api: SampleAPI) -> None:
    api.pending = Deferred()
    d = http.get(BASE + "/items/1")
    http.flush()
    assert api.in_flight.count == 1
    api.pending.callback(b"done")
    http.flush()
    assert result_of(d).code == 200
    assert api.in_flight.count == 0


def test_drained_fires_with_zero_when_the_last_request_finishes(
    http: StubTreq, api: SampleAPI
) -> None:
    api.pending = Deferred()
    http.get(BASE + "/items/1")
    http.flush()
    drained = api.in_flight.drained(10.0, api.clock)
    assert not drained.called
    api.pending.callback(b"done")
    http.flush()
    assert result_of(drained) == 0
    assert not api.clock.getDelayedCalls()


def test_drained_fires_at_once_with_nothing_in_flight(api: SampleAPI) -> None:
    assert result_of(api.in_flight.drained(10.0, api.clock)) == 0


def test_drained_gives_up_after_the_timeout_with_the_number_left_and_logs_it(
    http: StubTreq, api: SampleAPI
) -> None:
    api.pending = Deferred()
    http.get(BASE + "/items/1")
    http.get(BASE + "/items/2")
    http.flush()
    drained = api.in_flight.drained(5.0, api.clock)
    with capturedLogs() as events:
        api.clock.advance(4.9)
        assert not drained.called
        api.clock.advance(0.1)
    assert result_of(drained) == 2
    assert any(e.get("in_flight") == 2 for e in events)


class FakeChannel:
    persistent = True


def dummy_request() -> DummyRequest:
    request = DummyRequest([b""])
    request.channel = FakeChannel()
    return request


def test_after_start_draining_every_response_says_connection_close() -> None:
    """Requests in flight when draining starts and requests begun later both answer with
    Connection: close and close their connection afterwards; earlier ones did not."""
    in_flight = InFlight()
    before = dummy_request()
    in_flight.begin(before)
    assert before.responseHeaders.getRawHeaders(b"Connection") is None
    in_flight.start_draining()
    later = dummy_request()
    in_flight.begin(later)
    for request in (before, later):
        assert request.responseHeaders.getRawHeaders(b"Connection") == [b"close"]
        assert request.channel.persistent is False
    assert in_flight.count == 2
    before.finish()
    later.finish()
    assert in_flight.count == 0


def test_a_request_whose_client_went_away_is_no_longer_in_flight() -> None:
    in_flight = InFlight()
    request = dummy_request()
    in_flight.begin(request)
    request.processingFailed(Failure(error.ConnectionLost()))
    assert in_flight.count == 0


@pytest.mark.parametrize("host", [b"a..b", b"x" * 64 + b".example"])
def test_a_host_name_that_idna_cannot_encode_is_a_json_400(api: SampleAPI, host: bytes) -> None:
    """Klein binds its map to the Host header's name, which werkzeug IDNA-encodes; a direct
    route does not look at it."""
    body = b'{"a": 1}'
    _, transport = raw_http(
        api.resource(),
        b"POST /echo HTTP/1.1\r\nHost: " + host + b"\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body,
    )
    head, _, answer = transport.value().partition(b"\r\n\r\n")
    if api.direct:
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(answer) == {"a": 1}
    else:
        assert head.startswith(b"HTTP/1.1 400 "), head
        assert b"application/json" in head
        assert json.loads(answer)["message"] == "the Host header is not a host name"


@pytest.mark.parametrize(
    ("path", "host", "what"),
    [(b"/items/%ff", b"x", "path"), (b"/items/1", b"\xff", "Host header")],
)
def test_a_path_or_host_that_is_not_utf8_is_a_json_400(
    api: SampleAPI, path: bytes, host: bytes, what: str
) -> None:
    _, transport = raw_http(
        api.resource(), b"GET " + path + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"
    )
    head, _, answer = transport.value().partition(b"\r\n\r\n")
    if api.direct and what == "Host header":
        assert head.startswith(b"HTTP/1.1 200 "), "a direct route does not read the Host"
        return
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert json.loads(answer)["message"] == f"the {what} is not UTF-8"
    assert api.in_flight.count == 0


# --- metrics --------------------------------------------------------------------------------


def test_metrics_use_route_templates_and_their_own_registry(http: StubTreq, api: SampleAPI) -> None:
    other = HTTPMetrics()
    for item in ("1", "2", "3"):
        call(http, "GET", "/items/" + item)
    call(http, "GET", "/nowhere/at/all")
    call(http, "BREW", "/items/1")
    text, content_type = api.metrics.render()
    assert content_type.startswith("text/plain")
    page = text.decode()
    assert 'snet_http_requests_total{method="GET",route="/items/<item_id>",status="200"} 3.0' in (
        page
    )
    assert 'route="<unmatched>",status="404"' in page
    assert 'method="OTHER"' in page
    assert "/items/1" not in page
    assert 'snet_http_request_seconds_count{route="/items/<item_id>"} 3.0' in page
    assert "snet_http_requests_in_flight 0.0" in page
    assert "snet_http_requests_total{" not in other.render()[0].decode()


class RoutedAPI(SampleAPI):
    """SampleAPI's routes on a RoutedKlein, and one handler under two routes."""

    app = RoutedKlein()

    @app.route("/items/<item_id>", methods=["GET"])
    def item(self, request: IRequest, item_id: str) -> Any:
        return json_response(request, {"item": item_id})

    @app.route("/old/<name>", methods=["GET"])
    @app.route("/new/<name>", methods=["GET"])
    def renamed(self, request: IRequest, name: str) -> Any:
        return json_response(request, {"name": name})


def counted_matches(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths werkzeug matches from now on (Klein matches each request it routes)."""
    matches: list[str] = []
    match = MapAdapter.match

    def counted(self: MapAdapter, *args: Any, **kwargs: Any) -> Any:
        matches.append(self.path_info)
        return match(self, *args, **kwargs)

    monkeypatch.setattr(MapAdapter, "match", counted)
    return matches


def test_a_routed_app_labels_requests_with_the_route_klein_ran_without_matching_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    matches = counted_matches(monkeypatch)
    routed, plain = RoutedAPI(), SampleAPI()
    for api in (routed, plain):
        http = StubTreq(api.resource())
        for path in ("/items/1", "/items/2"):
            assert call(http, "GET", path)[0].code == 200
    assert matches.count("/items/1") == 1 + 2, "the routed app matched once, the plain twice"
    page = routed.metrics.render()[0].decode()
    assert 'route="/items/<item_id>",status="200"} 2.0' in page

    http = StubTreq(routed.resource())
    for path in ("/old/a", "/new/b", "/new/c", "/nowhere"):
        call(http, "GET", path)
    page = routed.metrics.render()[0].decode()
    assert 'route="/old/<name>",status="200"} 1.0' in page
    assert 'route="/new/<name>",status="200"} 2.0' in page
    assert 'route="<unmatched>",status="404"} 1.0' in page


def labels_of_a_mounted_app(klein: type[Klein]) -> list[str]:
    """The request counts of an app mounted under another's branch route (as the monolith's
    pages are under /web/), for a route that answers, one that fails, and unknown ones."""

    class Pages:
        app = klein()

        @app.route("/ok", methods=["GET"])
        def ok(self, request: IRequest) -> bytes:
            return b"ok"

    class Outer:
        app = klein()
        pages = Pages()

        @app.route("/web/", branch=True)
        def web(self, request: IRequest) -> Any:
            return self.pages.app.resource()

    metrics = HTTPMetrics()
    http = StubTreq(
        ObservedResource(
            Outer().app.resource(), in_flight=InFlight(), metrics=metrics, clock=Clock()
        )
    )
    for method, path in (("GET", "/web/ok"), ("GET", "/web/nowhere"), ("POST", "/web/ok")):
        call(http, method, path)
    page = metrics.render()[0].decode().splitlines()
    return sorted(line for line in page if line.startswith("snet_http_requests_total{"))


def test_a_mounted_routed_app_labels_its_requests_as_matching_again_did() -> None:
    labels = labels_of_a_mounted_app(RoutedKlein)
    assert labels == labels_of_a_mounted_app(Klein)
    assert any('route="/web/ok",status="200"' in line for line in labels)
    assert sum('route="<unmatched>"' in line for line in labels) == 2, "the 404 and the 405"


def test_the_in_flight_gauge_follows_the_requests(http: StubTreq, api: SampleAPI) -> None:
    api.pending = Deferred()
    http.get(BASE + "/items/1")
    http.flush()
    assert "snet_http_requests_in_flight 1.0" in api.metrics.render()[0].decode()


def test_request_time_is_measured_on_the_injected_clock(http: StubTreq, api: SampleAPI) -> None:
    api.pending = Deferred()
    d = http.get(BASE + "/items/1")
    http.flush()
    api.clock.advance(0.3)
    api.pending.callback(b"{}")
    http.flush()
    result_of(d)
    page = api.metrics.render()[0].decode()
    assert 'snet_http_request_seconds_sum{route="/items/<item_id>"} 0.3' in page


# --- uncancellable --------------------------------------------------------------------------


def test_uncancellable_lets_the_work_finish_when_its_waiter_is_cancelled() -> None:
    work: Deferred[int] = Deferred()
    waiter = uncancellable(work)
    waiter.cancel()
    failure_of(waiter).trap(defer.CancelledError)
    assert not work.called
    work.callback(5)
    assert result_of(work) is None  # consumed by the relay, nothing left unhandled


def test_uncancellable_passes_results_and_failures_on() -> None:
    ok: Deferred[int] = Deferred()
    waiter = uncancellable(ok)
    ok.callback(3)
    assert result_of(waiter) == 3
    bad: Deferred[int] = Deferred()
    waiter = uncancellable(bad)
    bad.errback(ValueError("x"))
    failure_of(waiter).trap(ValueError)
