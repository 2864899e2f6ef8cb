"""The web pages (snet.server.pages) in memory: the monolith's app over the fake stores of
test_server_api, called with StubTreq as a browser would (cookies, forms, redirects)."""

from __future__ import annotations

import io
import re
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import urlencode

import pytest
from test_server_api import BASE, Harness
from twisted.web.test.requesthelper import DummyRequest

from snet.server.gateway import ChatReply, NoChatInstance
from snet.server.ratelimit import parse_networks
from snet.testing import result_of
from snet.web.errors import BadRequest
from snet.web.inputs import read_form


class Visitor:
    """A browser: keeps its cookies and reads the CSRF token off the last page."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.cookies: dict[str, str] = {}
        self.set_cookies: list[str] = []
        self.csrf = ""
        self.headers: dict[str, str] = {}

    def _send(self, method: str, path: str, form: dict[str, str] | None) -> tuple[int, str, Any]:
        headers = {
            **self.headers,
            "Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items()),
        }
        data = None
        if form is not None:
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            data = urlencode(form).encode()
        response = result_of(
            self.h.treq.request(
                method, BASE + path, data=data, headers=headers, allow_redirects=False
            )
        )
        body = result_of(response.content()).decode()
        for raw in response.headers.getRawHeaders("set-cookie") or []:
            self.set_cookies.append(raw)
            for name, morsel in SimpleCookie(raw).items():
                if morsel["max-age"] == "0":
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = morsel.value
        found = re.search(r'name="csrf" value="([0-9a-f]+)"', body)
        if found:
            self.csrf = found.group(1)
        return response.code, body, response.headers

    def get(self, path: str) -> tuple[int, str, Any]:
        return self._send("GET", path, None)

    def post(self, path: str, form: dict[str, str], *, csrf: bool = True) -> tuple[int, str, Any]:
        return self._send("POST", path, {**({"csrf": self.csrf} if csrf else {}), **form})

    def sign_up(self, first: str = "Ada", second: str = "Lovelace") -> int:
        self.get("/web/signup")
        status, _body, headers = self.post(
            "/web/signup",
            {
                "first_name": first,
                "second_name": second,
                "birthdate": "1990-05-17",
                "password": "password1",
            },
        )
        assert status == 303, _body
        location = headers.getRawHeaders("location")[0]
        return int(re.fullmatch(r"/web/users/([0-9]+)\?welcome=1", location).group(1))  # type: ignore[union-attr]


@pytest.fixture
def h() -> Harness:
    return Harness()


def location(headers: Any) -> str:
    return str(headers.getRawHeaders("location")[0])


def test_the_site_address_leads_to_the_pages_and_visitors_see_a_welcome(h: Harness) -> None:
    browser = Visitor(h)
    status, _, headers = browser.get("/")
    assert status == 303 and location(headers) == "/web/"
    status, body, headers = browser.get("/web/")
    assert status == 200 and "Welcome to snet" in body
    assert headers.getRawHeaders("content-type") == ["text/html; charset=utf-8"]
    assert body.startswith("<!DOCTYPE html>")


def test_signing_up_starts_a_session_in_an_http_only_same_site_cookie(h: Harness) -> None:
    browser = Visitor(h)
    user_id = browser.sign_up()
    session = [c for c in browser.set_cookies if c.startswith("snet_session=")]
    assert session and "HttpOnly" in session[0] and "SameSite=lax" in session[0]
    assert "Path=/web" in session[0] and "Secure" not in session[0]  # plain HTTP here
    assert h.accounts.authenticate(browser.cookies["snet_session"]).result == user_id
    status, body, _ = browser.get(f"/web/users/{user_id}?welcome=1")
    assert status == 200 and "Welcome! Your user id is" in body and "Ada Lovelace" in body


def test_cookies_are_secure_behind_a_trusted_proxy_that_terminates_tls() -> None:
    h = Harness(trusted_proxies=parse_networks("127.0.0.1"))
    browser = Visitor(h)
    browser.get("/web/signup")  # StubTreq's peer is 127.0.0.1, a trusted proxy here
    assert browser.set_cookies and all("Secure" not in c for c in browser.set_cookies)
    browser.headers = {"X-Forwarded-Proto": "https"}
    browser.sign_up()
    session = [c for c in browser.set_cookies if c.startswith("snet_session=")]
    assert session and "Secure" in session[0]


def test_a_form_without_the_csrf_token_is_refused_in_words_and_changes_nothing(
    h: Harness,
) -> None:
    browser = Visitor(h)
    browser.get("/web/signup")
    form = {"first_name": "A", "second_name": "B", "birthdate": "1990-01-01"}
    status, body, _ = browser.post("/web/signup", {**form, "password": "password1"}, csrf=False)
    assert status == 403 and "did not come from this site" in body
    assert h.accounts.users == {}


def test_a_session_token_works_only_with_its_own_csrf_token(h: Harness) -> None:
    ada, bob = Visitor(h), Visitor(h)
    ada.sign_up()
    bob.sign_up("Bob", "Builder")
    ada.get("/web/feed")
    bob.get("/web/feed")
    bob.csrf = ada.csrf  # a token stolen from another session does not help
    status, _, _ = bob.post("/web/posts", {"text": "forged"})
    assert status == 403 and h.social.posts == {}


def test_an_invalid_sign_up_shows_the_rule_broken_and_keeps_what_was_typed_escaped(
    h: Harness,
) -> None:
    browser = Visitor(h)
    browser.get("/web/signup")
    status, body, _ = browser.post(
        "/web/signup",
        {
            "first_name": "<script>x</script>",
            "second_name": "B",
            "birthdate": "2999-01-01",
            "password": "password1",
        },
    )
    assert status == 400 and "birthdate must not be in the future" in body
    assert "&lt;script&gt;x&lt;/script&gt;" in body and "<script>x" not in body


def test_pages_for_members_send_visitors_to_log_in_and_back(h: Harness) -> None:
    user_id = Visitor(h).sign_up()
    browser = Visitor(h)
    status, _, headers = browser.get("/web/feed?offset=10")
    assert status == 303 and location(headers) == "/web/login?next=%2Fweb%2Ffeed%3Foffset%3D10"
    status, body, _ = browser.get(location(headers))
    assert 'action="/web/login?next=%2Fweb%2Ffeed%3Foffset%3D10"' in body
    status, body, _ = browser.post(
        "/web/login?next=%2Fweb%2Ffeed", {"id": str(user_id), "password": "nope"}
    )
    assert status == 400 and "do not match" in body
    status, _, headers = browser.post(
        "/web/login?next=%2Fweb%2Ffeed", {"id": str(user_id), "password": "password1"}
    )
    assert status == 303 and location(headers) == "/web/feed"


@pytest.mark.parametrize("target", ["//evil.example/", "https://evil.example/", "/web//x"])
def test_login_never_sends_people_to_another_site(h: Harness, target: str) -> None:
    user_id = Visitor(h).sign_up()
    browser = Visitor(h)
    browser.get("/web/login")
    form = {"id": str(user_id), "password": "password1"}
    status, _, headers = browser.post("/web/login?" + urlencode({"next": target}), form)
    assert status == 303 and location(headers) == "/web/feed"


def test_logging_out_revokes_the_token_and_forgets_the_cookie(h: Harness) -> None:
    browser = Visitor(h)
    browser.sign_up()
    token = browser.cookies["snet_session"]
    browser.get("/web/feed")
    status, _, headers = browser.post("/web/logout", {})
    assert status == 303 and location(headers) == "/web/"
    assert token in h.accounts.revoked and "snet_session" not in browser.cookies


def test_people_follow_post_and_read_the_feed_through_the_same_rules(h: Harness) -> None:
    ada, bob = Visitor(h), Visitor(h)
    ada_id = ada.sign_up()
    bob_id = bob.sign_up("Bob", "Builder")
    bob.get(f"/web/users/{ada_id}")
    status, _, _ = bob.post(f"/web/users/{ada_id}/friend", {})
    assert status == 303 and (bob_id, ada_id) in h.social.follows
    assert ("follows", bob_id) in h.feed.events
    ada.get("/web/feed")
    status, _, headers = ada.post("/web/posts", {"text": "<b>hello</b>"})
    assert status == 303 and location(headers).startswith("/web/posts/")
    status, body, _ = bob.get("/web/feed")
    assert "&lt;b&gt;hello&lt;/b&gt;" in body and "Ada Lovelace" in body
    status, body, _ = ada.post("/web/posts", {"text": "   "})
    assert status == 400 and "text must not be empty" in body
    status, _, _ = bob.post(f"/web/users/{bob_id}/friend", {})
    assert status == 400  # SelfFriendship, as the API answers it


def test_someone_elses_post_cannot_be_edited(h: Harness) -> None:
    ada, bob = Visitor(h), Visitor(h)
    ada.sign_up()
    bob.sign_up("Bob", "Builder")
    ada.get("/web/feed")
    _, _, headers = ada.post("/web/posts", {"text": "mine"})
    post_path = location(headers)
    bob.get(post_path)
    status, _body, _ = bob.post(post_path + "/edit", {"text": "yours now"})
    assert status == 400 and next(iter(h.social.posts.values())).text == "mine"


def test_unknown_pages_and_posts_are_explained_in_words(h: Harness) -> None:
    browser = Visitor(h)
    status, body, _ = browser.get("/web/nowhere")
    assert status == 404 and "There is no such page." in body
    assert "Log in" in body and 'href="/web/feed"' not in body
    browser.sign_up()
    status, body, _ = browser.get("/web/posts/12345")
    assert status == 404 and "no such post" in body
    status, body, _ = browser.get("/web/nowhere")
    assert status == 404 and 'href="/web/feed"' in body and "Log in" not in body


def test_unread_counts_are_served_for_the_pages_script(h: Harness) -> None:
    browser = Visitor(h)
    status, body, _ = browser.get("/web/unread.json")
    assert status == 401
    browser.sign_up()
    h.chat.replies = [ChatReply(200, {"total": 3, "dialogs": [{"peer_id": 7, "count": 3}]}, "c1")]
    status, body, _ = browser.get("/web/unread.json")
    assert status == 200 and body == '{"total":3,"dialogs":{"7":3}}'


def test_pages_show_without_counts_when_the_chat_service_is_away(h: Harness) -> None:
    browser = Visitor(h)
    browser.sign_up()
    h.chat.failure = NoChatInstance()
    status, body, _ = browser.get("/web/feed")
    assert status == 200 and "Feed" in body
    status, body, headers = browser.get("/web/dialogs")
    assert status == 503 and "no chat instance is available" in body
    assert headers.getRawHeaders("retry-after") == ["1"]


def test_the_stylesheet_and_script_are_served_from_the_package(h: Harness) -> None:
    browser = Visitor(h)
    status, body, headers = browser.get("/web/static/pages.css")
    assert status == 200 and ":root" in body
    assert headers.getRawHeaders("content-type") == ["text/css; charset=utf-8"]
    status, body, _ = browser.get("/web/static/unread.js")
    assert status == 200 and "/web/unread.json" in body
    status, _, _ = browser.get("/web/static/..%2Fpages.py")
    assert status == 404


def form_request(body: bytes, content_type: bytes) -> DummyRequest:
    request = DummyRequest([])
    request.requestHeaders.setRawHeaders(b"Content-Type", [content_type])
    request.content = io.BytesIO(body)
    return request


def test_read_form_gives_the_first_value_of_each_field() -> None:
    request = form_request(b"a=1&a=2&b=%D0%BF%D1%80%D0%B8&c=", b"application/x-www-form-urlencoded")
    assert read_form(request) == {"a": "1", "b": "при", "c": ""}


@pytest.mark.parametrize(
    ("body", "content_type", "message"),
    [
        (b"a=1", b"application/json", "must be a form"),
        (b"a=%FF", b"application/x-www-form-urlencoded", "not valid UTF-8"),
        (b"a=" + b"x" * 70_000, b"application/x-www-form-urlencoded", "is over"),
    ],
)
def test_read_form_refuses_what_is_not_a_small_utf8_form(
    body: bytes, content_type: bytes, message: str
) -> None:
    with pytest.raises(BadRequest, match=message):
        read_form(form_request(body, content_type))


def test_requests_to_pages_are_measured_under_their_full_route(h: Harness) -> None:
    browser = Visitor(h)
    browser.get("/web/login")
    text = h.api.metrics.render()[0].decode()
    assert 'method="GET",route="/web/login",status="200"' in text


def test_signed_in_people_skip_the_sign_up_and_login_forms(h: Harness) -> None:
    browser = Visitor(h)
    browser.sign_up()
    for page in ("/web/signup", "/web/login", "/web/"):
        status, _, headers = browser.get(page)
        assert status == 303 and location(headers) == "/web/feed"
