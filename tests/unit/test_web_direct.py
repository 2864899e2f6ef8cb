"""Unit tests of snet.web.direct: which requests a direct route takes (an exact match only,
the rest left to Klein), and how ``ObservedResource`` runs one: its answer, its failures,
its client going away. tests/unit/test_web.py runs the whole of its small app both ways."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from klein import Klein
from test_web import SampleAPI, call, counted_matches, dummy_request, header, raw_http
from treq.testing import StubTreq
from twisted.internet import error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from snet.web.direct import DirectRoutes, compile_template
from snet.web.draining import InFlight
from snet.web.errors import BadRequest, error_response
from snet.web.metrics import HTTPMetrics
from snet.web.requests import json_response
from snet.web.service import ObservedResource

SEGMENT_CHARACTERS = "ABCXYZabcxyz0189._~!$&'()*+,;=:@-"


def test_a_template_matches_its_paths_exactly_and_names_its_arguments() -> None:
    pattern, names = compile_template("/v1/dialogs/<peer_id>/messages")
    assert names == ("peer_id",)
    assert pattern.fullmatch(b"/v1/dialogs/42/messages") is not None
    for path in (
        b"/v1/dialogs/42/messages/",
        b"/v1/dialogs//messages",
        b"/v1/dialogs/4/2/messages",
        b"/v1/dialogs/%34%32/messages",
        b"/v1/dialogs/42/messagesx",
        b"/v1/dialogs/\xc3\xa9/messages",
        b"/V1/dialogs/42/messages",
    ):
        assert pattern.fullmatch(path) is None, path


def test_a_template_s_literal_parts_are_not_patterns() -> None:
    pattern, names = compile_template("/a.b/<x>/c+d")
    assert names == ("x",)
    assert pattern.fullmatch(b"/a.b/1/c+d") is not None
    assert pattern.fullmatch(b"/aXb/1/c+d") is None
    assert pattern.fullmatch(b"/a.b/1/cd") is None


@pytest.mark.parametrize("template", ["/items/<int:item_id>", "/items/<id", "/items/id>"])
def test_a_template_with_a_converter_or_a_stray_bracket_cannot_be_direct(template: str) -> None:
    with pytest.raises(ValueError, match="only <name> parameters"):
        compile_template(template)


@given(st.text(SEGMENT_CHARACTERS, min_size=1, max_size=40))
def test_any_segment_that_decoding_leaves_alone_is_the_argument(segment: str) -> None:
    routes = DirectRoutes.of(SampleAPI().app, {"item"})
    found = routes.match(b"GET", b"/items/" + segment.encode("ascii"))
    assert found is not None
    assert found[1] == {"item_id": segment}


@given(st.binary(min_size=1, max_size=40))
def test_a_segment_with_an_escape_or_a_byte_outside_the_path_characters_is_left_to_klein(
    raw: bytes,
) -> None:
    routes = DirectRoutes.of(SampleAPI().app, {"item"})
    found = routes.match(b"GET", b"/items/" + raw)
    allowed = re.fullmatch(rb"[A-Za-z0-9._~!$&'()*+,;=:@-]+", raw) is not None
    assert (found is not None) == allowed


def test_only_the_named_endpoints_and_their_methods_are_direct() -> None:
    routes = DirectRoutes.of(SampleAPI().app, {"item"})
    assert set(routes.by_method) == {b"GET"}, "HEAD (which werkzeug adds to GET) is Klein's"
    assert routes.match(b"HEAD", b"/items/1") is None
    assert routes.match(b"POST", b"/items/1") is None
    assert routes.match(b"POST", b"/echo") is None
    assert DirectRoutes.none().match(b"GET", b"/items/1") is None


def test_an_endpoint_without_a_route_is_refused() -> None:
    with pytest.raises(ValueError, match="no route for the direct endpoints"):
        DirectRoutes.of(SampleAPI().app, {"item", "nothing"})


class Shadowed:
    """Routes werkzeug would answer differently from a direct ``/items/<name>``."""

    app = Klein()

    @app.route("/items/<name>", methods=["POST"])
    def item(self, request: IRequest, name: str) -> bytes:
        return b"item " + name.encode()

    @app.route("/items/special", methods=["POST"])
    def special(self, request: IRequest) -> bytes:
        return b"special"

    @app.route("/things/<name>", methods=["POST"])
    def thing(self, request: IRequest, name: str) -> bytes:
        return b"thing"

    @app.route("/things/<int:number>", methods=["GET"])
    def numbered(self, request: IRequest, number: int) -> bytes:
        return b"numbered"

    @app.route("/any/<name>")
    def anything(self, request: IRequest, name: str) -> bytes:
        return b"any"


def test_a_route_another_route_could_shadow_cannot_be_direct() -> None:
    with pytest.raises(ValueError, match="'/items/special' could shadow it"):
        DirectRoutes.of(Shadowed().app, {"item"})
    routes = DirectRoutes.of(Shadowed().app, {"thing"})
    assert routes.match(b"POST", b"/things/1") is not None, "a GET route shadows no POST"


def test_a_route_without_methods_cannot_be_direct() -> None:
    with pytest.raises(ValueError, match="names its methods"):
        DirectRoutes.of(Shadowed().app, {"anything"})


# --- run by ObservedResource ----------------------------------------------------------------


def test_a_direct_route_answers_without_klein_as_klein_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    matches = counted_matches(monkeypatch)
    answers = []
    for direct in (False, True):
        api = SampleAPI(direct=direct)
        http = StubTreq(api.resource())
        response, body = call(http, "GET", "/items/7", headers={"X-Request-ID": "rid-1"})
        answers.append((response.code, body, header(response, "Content-Type")))
        api.raise_ = BadRequest("no such item")
        response, body = call(http, "GET", "/items/8", headers={"X-Request-ID": "rid-2"})
        answers.append((response.code, body, header(response, "X-Request-ID")))
        page = api.metrics.render()[0].decode()
        assert 'route="/items/<item_id>",status="200"} 1.0' in page
        assert 'route="/items/<item_id>",status="400"} 1.0' in page
    assert answers[:2] == answers[2:]
    assert answers[0] == (200, {"item": "7"}, "application/json")
    assert answers[1][0] == 400 and answers[1][1]["request_id"] == "rid-2"
    # Klein matches each request it runs twice (to run it, and for its label, since the
    # sample app's Klein is not a RoutedKlein); the direct app matched none.
    assert matches == ["/items/7", "/items/7", "/items/8", "/items/8"]


@pytest.mark.parametrize(
    ("method", "path", "code"),
    [("GET", "/items/a%62c", 200), ("GET", "/items/1/", 404), ("PUT", "/items/1", 405)],
)
def test_what_is_not_an_exact_match_is_answered_by_klein(
    monkeypatch: pytest.MonkeyPatch, method: str, path: str, code: int
) -> None:
    matches = counted_matches(monkeypatch)
    answers = []
    for direct in (False, True):
        response, body = call(
            StubTreq(SampleAPI(direct=direct).resource()),
            method,
            path,
            headers={"X-Request-ID": "rid"},
        )
        answers.append((response.code, body))
    assert answers[0] == answers[1]
    assert answers[0][0] == code
    if code == 200:
        assert answers[0][1] == {"item": "abc"}, "Klein decoded the escape"
    assert len(matches) == 2 * 2, "both went through Klein, which matched each twice"


def observed(app: Klein, routes: DirectRoutes) -> ObservedResource:
    """Klein *app* (bound to its instance) served as the services serve theirs, with *routes*
    run directly."""
    return ObservedResource(
        app.resource(), in_flight=InFlight(), metrics=HTTPMetrics(), clock=Clock(), direct=routes
    )


def post_request(path: bytes) -> DummyRequest:
    request = dummy_request()
    request.method = b"POST"
    request.path = path
    request.uri = path
    return request


class Pending:
    """An app with one direct route whose handler waits on a Deferred the test holds."""

    app = Klein()

    def __init__(self) -> None:
        self.waiting: Deferred[bytes] = Deferred(lambda d: self.cancelled.append(True))
        self.cancelled: list[bool] = []
        self.errors: list[Failure] = []

    @app.handle_errors(Exception)
    def _error(self, request: IRequest, failure: Failure) -> bytes:
        self.errors.append(failure)
        return error_response(request, failure)

    @app.route("/wait/<name>", methods=["POST"])
    async def wait(self, request: IRequest, name: str) -> bytes:
        await self.waiting
        return json_response(request, {"name": name})

    def resource(self) -> ObservedResource:
        return observed(self.app, DirectRoutes.of(self.app, {"wait"}))


def test_a_direct_handler_is_cancelled_when_its_client_goes_away_and_nothing_is_written() -> None:
    app = Pending()
    resource = app.resource()
    request = post_request(b"/wait/x")
    with capturedLogs() as events:
        assert resource.render(request) is NOT_DONE_YET
        assert resource.in_flight.count == 1
        request.processingFailed(Failure(error.ConnectionLost()))
    assert app.cancelled == [True]
    assert app.errors == [], "a cancel after the client went away is not an error to answer"
    assert [e for e in events if e.get("log_level") and e["log_level"].name == "critical"] == []
    assert request.written == [] and request.finished == 0
    assert resource.in_flight.count == 0
    assert any("client went away" in str(e.get("log_format")) for e in events)
    page = resource.metrics.render()[0].decode()
    assert 'route="/wait/<name>"' in page


def test_a_direct_handler_s_answer_is_written_and_the_request_finished() -> None:
    app = Pending()
    resource = app.resource()
    request = post_request(b"/wait/y")
    resource.render(request)
    app.waiting.callback(b"")
    assert json.loads(b"".join(request.written)) == {"name": "y"}
    assert request.finished == 1
    assert request.responseCode == 200
    assert resource.in_flight.count == 0


def test_a_failing_error_handler_is_answered_by_twisted() -> None:
    app = Pending()

    def broken(request: IRequest, failure: Failure) -> bytes:
        raise RuntimeError("the error handler broke")

    resource = app.resource()
    resource.direct = DirectRoutes(resource.direct.by_method, broken)
    request = post_request(b"/wait/z")
    failed: list[Failure] = []
    request.processingFailed = failed.append  # type: ignore[method-assign]
    resource.render(request)
    app.waiting.errback(ValueError("the handler broke"))
    assert [f.type for f in failed] == [RuntimeError], "Twisted's 500, which it logs"


def test_a_handler_that_raises_at_once_is_answered_by_the_error_handler() -> None:
    api = SampleAPI(direct=True)
    api.raise_ = BadRequest("at once")
    response, body = call(StubTreq(api.resource()), "GET", "/items/1")
    assert response.code == 400
    assert body["message"] == "at once"


class Answers:
    """Handlers answering as Klein allows: a str, a Deferred that waits on another, and two
    error handlers that Klein tries in order."""

    app = Klein()

    def __init__(self) -> None:
        self.inner: Deferred[None] = Deferred(lambda d: self.cancelled.append(True))
        self.cancelled: list[bool] = []

    @app.handle_errors(KeyError)
    def _missing(self, request: IRequest, failure: Failure) -> bytes:
        return b"missing"

    @app.handle_errors(Exception)
    def _error(self, request: IRequest, failure: Failure) -> bytes:
        return error_response(request, failure)

    @app.route("/text/<name>", methods=["POST"])
    def text(self, request: IRequest, name: str) -> Any:
        if name == "missing":
            raise KeyError(name)
        if name == "broken":
            raise ValueError(name)
        return f"text {name} \N{SNOWMAN}"

    @app.route("/paused/<name>", methods=["POST"])
    def paused(self, request: IRequest, name: str) -> Deferred[None]:
        return succeed(None).addCallback(lambda _: self.inner)


class Override(Answers):
    def text(self, request: IRequest, name: str) -> Any:
        return b"the subclass's method, which Klein does not call"


def answers_resource(app: Answers, direct: bool) -> ObservedResource:
    routes = DirectRoutes.of(app.app, {"text", "paused"}) if direct else DirectRoutes.none()
    return observed(app.app, routes)


@pytest.mark.parametrize("path", ["/text/a", "/text/missing", "/text/broken"])
@pytest.mark.parametrize("app_class", [Answers, Override])
def test_answers_and_failures_are_klein_s(app_class: type[Answers], path: str) -> None:
    answers = []
    for direct in (False, True):
        http = StubTreq(answers_resource(app_class(), direct))
        response, body = call(http, "POST", path, headers={"X-Request-ID": "rid"})
        answers.append((response.code, body))
    assert answers[0] == answers[1]
    assert answers[1][1] in ("text a \N{SNOWMAN}".encode(), b"missing") or answers[1][0] == 500


def test_a_handler_waiting_on_another_deferred_is_cancelled_when_its_client_goes_away() -> None:
    for direct in (False, True):
        app = Answers()
        channel, _ = raw_http(
            answers_resource(app, direct),
            b"POST /paused/x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        )
        assert app.cancelled == []
        channel.connectionLost(Failure(error.ConnectionLost()))
        assert app.cancelled == [True], "direct" if direct else "klein"
