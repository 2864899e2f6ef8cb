"""The monolith's web pages for people, under ``/web/``: sign up, log in and out, profiles,
search, friends, posts, the feed and dialogs, as server-rendered HTML that works without
JavaScript (one small script updates the unread counts).

``Pages`` is a Klein app over the same ``Actions`` as the JSON API (``snet.server.app``
mounts it): the same validators, stores, rate limits and tokens; no rule is implemented
twice. Sessions and CSRF tokens: ``snet.server.web_session``; the HTML:
``snet.server.page_views``; the stylesheet and script: ``snet/server/static/``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from importlib.resources import files
from typing import Any

from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import NotFound as NotFoundRoute

from snet.chat_contract import validate_message_text
from snet.server import page_views as views
from snet.server.accounts import Profile, User
from snet.server.actions import DOMAIN_ERRORS, Actions, chat_unavailable
from snet.server.page_views import PAGES_PREFIX, Viewer, url
from snet.server.ratelimit import Network, client_address, served_over_tls
from snet.server.social import Post
from snet.server.validation import (
    DEFAULT_FEED_LIMIT,
    parse_birthdate,
    parse_offset,
    parse_user_id,
    validate_biography,
    validate_city,
    validate_given_password,
    validate_name,
    validate_new_password,
    validate_post_text,
    validate_search_prefix,
)
from snet.server.web_session import (
    CSRF_FIELD,
    SESSION_COOKIE,
    VISITOR_COOKIE,
    check_csrf,
    cookie,
    csrf_token,
    set_cookie,
    visitor_secret,
)
from snet.web.errors import ApiError, NotFound, answered_error
from snet.web.inputs import parse_id, query_arg, read_form
from snet.web.requests import (
    json_bytes,
    redirect_response,
    request_id,
    set_header,
    set_status,
)
from snet.web.service import RoutedKlein

__all__ = ["PAGES_PREFIX", "Pages"]

STATIC = {
    "pages.css": b"text/css; charset=utf-8",
    "unread.js": b"text/javascript; charset=utf-8",
}
"""The files of snet/server/static/ that the pages serve, with their content types."""

SESSION_SECONDS = 30 * 24 * 3600
"""How long the session cookie is kept: as long as the token is valid (``TOKEN_TTL``)."""


class SignInRequired(Exception):
    """The page is for signed-in people: the browser is sent to the login page."""


def _html(request: IRequest, body: bytes, status: int = 200) -> bytes:
    set_status(request, status)
    set_header(request, b"Content-Type", b"text/html; charset=utf-8")
    set_header(request, b"Cache-Control", b"no-store")
    set_header(request, b"X-Content-Type-Options", b"nosniff")
    set_header(request, b"X-Frame-Options", b"DENY")
    set_header(
        request,
        b"Content-Security-Policy",
        b"default-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        b"form-action 'self'",
    )
    set_header(request, b"Content-Length", str(len(body)).encode("ascii"))
    return body


def _field(form: dict[str, str], name: str) -> str:
    return form.get(name, "")


def _optional(text: str) -> str | None:
    return text if text.strip() else None


def _next_page(given: str | None) -> str | None:
    """Where to go after logging in: a page of this site (never another site), or None."""
    if given and given.startswith(PAGES_PREFIX + "/") and "//" not in given and "\\" not in given:
        return given
    return None


class Pages:
    """The web pages; ``app.resource()`` is what ``ServerAPI`` serves under ``/web/``."""

    app = RoutedKlein()

    def __init__(self, *, actions: Actions, trusted_proxies: Sequence[Network] = ()) -> None:
        self.actions = actions
        self.accounts = actions.accounts
        self.trusted_proxies = trusted_proxies

    # --- sessions -----------------------------------------------------------------------

    async def _signed_in(self, request: IRequest) -> tuple[User, str] | None:
        """The signed-in user and their token, or None."""
        token = cookie(request, SESSION_COOKIE)
        if token is None:
            return None
        user_id = await self.accounts.authenticate(token)
        if user_id is None:
            return None
        user = await self.accounts.get(user_id)
        return None if user is None else (user, token)

    async def _viewer(self, request: IRequest, *, unread: bool = True) -> Viewer:
        """Who looks at the page (a visitor gets a visitor cookie for their forms)."""
        session = await self._signed_in(request)
        if session is None:
            secret = visitor_secret(request, secure=self._over_tls(request))
            return Viewer(user=None, csrf=csrf_token(secret))
        user, token = session
        count = None
        if unread:
            count = await self._unread_total(request, user.id)
        return Viewer(user=user, csrf=csrf_token(token), unread=count)

    async def _unread_total(self, request: IRequest, user_id: int) -> int | None:
        try:
            unread = await self.actions.unread(request_id=request_id(request), caller=user_id)
        except Exception as e:
            if chat_unavailable(e) is None and not isinstance(e, ApiError):
                raise
            return None  # a page still shows when the chat service does not answer
        return unread.total

    async def _member(self, request: IRequest, *, unread: bool = True) -> tuple[Viewer, User]:
        """The viewer of a page for signed-in people.

        :raises SignInRequired: if the browser is not signed in.
        """
        viewer = await self._viewer(request, unread=unread)
        if viewer.user is None:
            raise SignInRequired()
        return viewer, viewer.user

    async def _posted(self, request: IRequest) -> tuple[Viewer, User, dict[str, str]]:
        """The viewer and the form of a POST for signed-in people, its CSRF token checked."""
        form = read_form(request)
        session = await self._signed_in(request)
        check_csrf(
            request,
            session[1] if session else cookie(request, VISITOR_COOKIE),
            form.get(CSRF_FIELD),
        )
        if session is None:
            raise SignInRequired()
        user, token = session
        return Viewer(user=user, csrf=csrf_token(token)), user, form

    def _visitor_posted(self, request: IRequest) -> tuple[Viewer, dict[str, str]]:
        """The viewer and the form of a sign-up or login POST, its CSRF token checked."""
        form = read_form(request)
        secret = cookie(request, VISITOR_COOKIE)
        check_csrf(request, secret, form.get(CSRF_FIELD))
        assert secret is not None
        return Viewer(user=None, csrf=csrf_token(secret)), form

    def _start_session(self, request: IRequest, token: str) -> None:
        set_cookie(
            request, SESSION_COOKIE, token, max_age=SESSION_SECONDS, secure=self._over_tls(request)
        )

    def _over_tls(self, request: IRequest) -> bool:
        return served_over_tls(request, self.trusted_proxies)

    def _refused(self, request: IRequest, exc: Exception) -> ApiError:
        """The 4xx error a form is refused with (its headers set), to show on the form;
        anything else is raised again for the error page."""
        if chat_unavailable(exc) is not None:
            raise exc
        error = answered_error(request, Failure(exc), DOMAIN_ERRORS)  # type: ignore[no-untyped-call]
        if error.status >= 500:
            raise exc
        set_status(request, error.status)
        return error

    # --- errors -------------------------------------------------------------------------

    @app.handle_errors(SignInRequired)
    def _sign_in(self, request: IRequest, failure: Failure) -> bytes:
        target = request.uri.decode("utf-8", "replace") if request.method == b"GET" else ""
        return redirect_response(request, url("/login", next=target) if target else url("/login"))

    @app.handle_errors(Exception)
    def _error(self, request: IRequest, failure: Failure) -> bytes:
        exc = failure.value
        assert exc is not None
        mapped = chat_unavailable(exc)
        if mapped is not None:
            failure = Failure(mapped)  # type: ignore[no-untyped-call]
        error = answered_error(request, failure, DOMAIN_ERRORS)
        message = error.message
        if isinstance(exc, NotFoundRoute):
            message = "There is no such page."
        elif error.status == 500:
            message = "Something went wrong on our side; it has been logged. Try again later."
        viewer = Viewer(user=None, csrf="", session=cookie(request, SESSION_COOKIE) is not None)
        return _html(request, views.error_page(viewer, error.status, message), error.status)

    # --- visitors -----------------------------------------------------------------------

    @app.route("/", methods=["GET"])
    async def home(self, request: IRequest) -> bytes:
        viewer = await self._viewer(request, unread=False)
        if viewer.user is not None:
            return redirect_response(request, url("/feed"))
        return _html(request, views.welcome_page(viewer))

    @app.route("/signup", methods=["GET"])
    async def signup_form(self, request: IRequest) -> bytes:
        viewer = await self._viewer(request, unread=False)
        if viewer.user is not None:
            return redirect_response(request, url("/feed"))
        return _html(request, views.signup_page(viewer, {}))

    @app.route("/signup", methods=["POST"])
    async def signup(self, request: IRequest) -> bytes:
        viewer, form = self._visitor_posted(request)
        names = ("first_name", "second_name", "birthdate", "city", "biography")
        values = {name: _field(form, name) for name in names}
        try:
            profile = Profile(
                first_name=validate_name(values["first_name"], "first name"),
                second_name=validate_name(values["second_name"], "second name"),
                birthdate=parse_birthdate(values["birthdate"], self.accounts.today()),
                biography=validate_biography(values["biography"]),
                city=validate_city(values["city"]),
            )
            password = validate_new_password(_field(form, "password"))
            address = client_address(request, self.trusted_proxies)
            user_id = await self.actions.register(profile, password, address)
            token = await self.actions.log_in(user_id, password, address)
        except Exception as e:
            error = self._refused(request, e)
            return _html(request, views.signup_page(viewer, values, error.message), error.status)
        self._start_session(request, token)
        return redirect_response(request, url(f"/users/{user_id}", welcome=1))

    @app.route("/login", methods=["GET"])
    async def login_form(self, request: IRequest) -> bytes:
        viewer = await self._viewer(request, unread=False)
        if viewer.user is not None:
            return redirect_response(request, url("/feed"))
        next_page = _next_page(query_arg(request, "next"))
        return _html(request, views.login_page(viewer, next_page=next_page))

    @app.route("/login", methods=["POST"])
    async def login(self, request: IRequest) -> bytes:
        viewer, form = self._visitor_posted(request)
        given_id = _field(form, "id").strip()
        try:
            user_id = parse_user_id(given_id, "the user id")
            password = validate_given_password(_field(form, "password"))
            address = client_address(request, self.trusted_proxies)
            token = await self.actions.log_in(user_id, password, address)
        except Exception as e:
            error = self._refused(request, e)
            message = error.message
            if error.status in (400, 404) and error.code != 40004:
                message = "That user id and password do not match."
            next_page = _next_page(query_arg(request, "next"))
            page = views.login_page(viewer, given_id, message, next_page=next_page)
            return _html(request, page, error.status)
        self._start_session(request, token)
        return redirect_response(request, _next_page(query_arg(request, "next")) or url("/feed"))

    @app.route("/logout", methods=["POST"])
    async def logout(self, request: IRequest) -> bytes:
        form = read_form(request)
        session = await self._signed_in(request)
        if session is not None:  # else the session is over already
            check_csrf(request, session[1], form.get(CSRF_FIELD))
            await self.actions.log_out(session[1])
        set_cookie(request, SESSION_COOKIE, "", max_age=0, secure=self._over_tls(request))
        return redirect_response(request, url("/"))

    # --- people -------------------------------------------------------------------------

    async def _user(self, user_id: str) -> User:
        user = await self.accounts.get(parse_id(user_id, "the user id"))
        if user is None:
            raise NotFound("There is no such person.")
        return user

    @app.route("/users/<user_id>", methods=["GET"])
    async def profile(self, request: IRequest, user_id: str) -> bytes:
        viewer, me = await self._member(request)
        user = await self._user(user_id)
        follows = user.id in await self.actions.social.friends(me.id)
        welcome = query_arg(request, "welcome") == "1"
        return _html(request, views.profile_page(viewer, user, follows=follows, welcome=welcome))

    @app.route("/users/<user_id>/friend", methods=["POST"])
    async def befriend(self, request: IRequest, user_id: str) -> bytes:
        _viewer, me, _form = await self._posted(request)
        friend = await self._user(user_id)
        await self.actions.befriend(me.id, friend.id)
        return redirect_response(request, url(f"/users/{friend.id}"))

    @app.route("/users/<user_id>/unfriend", methods=["POST"])
    async def unfriend(self, request: IRequest, user_id: str) -> bytes:
        _viewer, me, _form = await self._posted(request)
        friend = await self._user(user_id)
        await self.actions.unfriend(me.id, friend.id)
        return redirect_response(request, url(f"/users/{friend.id}"))

    @app.route("/friends", methods=["GET"])
    async def friends(self, request: IRequest) -> bytes:
        viewer, me = await self._member(request)
        return _html(request, views.friends_page(viewer, await self._friends(me.id)))

    async def _friends(self, user_id: int) -> list[User]:
        users = [await self.accounts.get(i) for i in await self.actions.social.friends(user_id)]
        return [user for user in users if user is not None]

    @app.route("/search", methods=["GET"])
    async def search(self, request: IRequest) -> bytes:
        viewer, _me = await self._member(request)
        first = query_arg(request, "first_name") or ""
        second = query_arg(request, "second_name") or ""
        if not first.strip() and not second.strip():
            return _html(request, views.search_page(viewer, first, second, None))
        try:
            results = await self.accounts.search(
                validate_search_prefix(first, "first name") if first.strip() else "",
                validate_search_prefix(second, "second name") if second.strip() else "",
            )
        except Exception as e:
            error = self._refused(request, e)
            page = views.search_page(viewer, first, second, None, error.message)
            return _html(request, page, error.status)
        return _html(request, views.search_page(viewer, first, second, results))

    # --- posts and the feed -------------------------------------------------------------

    async def _authors(self, posts: Sequence[Post]) -> list[tuple[Post, User | None]]:
        known: dict[int, User | None] = {}
        for post in posts:
            if post.author_id not in known:
                known[post.author_id] = await self.accounts.get(post.author_id)
        return [(post, known[post.author_id]) for post in posts]

    @app.route("/feed", methods=["GET"])
    async def feed(self, request: IRequest) -> bytes:
        viewer, me = await self._member(request)
        offset = parse_offset(query_arg(request, "offset"))
        posts = await self.actions.feed.read(me.id, offset, DEFAULT_FEED_LIMIT)
        page = views.feed_page(
            viewer, await self._authors(posts), offset=offset, limit=DEFAULT_FEED_LIMIT
        )
        return _html(request, page)

    @app.route("/posts", methods=["POST"])
    async def create_post(self, request: IRequest) -> bytes:
        viewer, me, form = await self._posted(request)
        draft = _field(form, "text")
        try:
            post = await self.actions.create_post(me.id, validate_post_text(draft))
        except Exception as e:
            error = self._refused(request, e)
            posts = await self.actions.feed.read(me.id, 0, DEFAULT_FEED_LIMIT)
            page = views.feed_page(
                viewer,
                await self._authors(posts),
                offset=0,
                limit=DEFAULT_FEED_LIMIT,
                draft=draft,
                error=error.message,
            )
            return _html(request, page, error.status)
        return redirect_response(request, url(f"/posts/{post.id}"))

    async def _post(self, post_id: str) -> Post:
        post = await self.actions.social.get_post(parse_id(post_id, "the post id"))
        if post is None:
            raise NotFound("There is no such post; it may have been deleted.")
        return post

    @app.route("/posts/<post_id>", methods=["GET"])
    async def show_post(self, request: IRequest, post_id: str) -> bytes:
        viewer, _me = await self._member(request)
        post = await self._post(post_id)
        author = await self.accounts.get(post.author_id)
        return _html(request, views.post_page(viewer, post, author))

    @app.route("/posts/<post_id>/edit", methods=["POST"])
    async def edit_post(self, request: IRequest, post_id: str) -> bytes:
        viewer, me, form = await self._posted(request)
        post = await self._post(post_id)
        draft = _field(form, "text")
        try:
            await self.actions.update_post(me.id, post.id, validate_post_text(draft))
        except Exception as e:
            error = self._refused(request, e)
            author = await self.accounts.get(post.author_id)
            page = views.post_page(viewer, post, author, error.message, draft)
            return _html(request, page, error.status)
        return redirect_response(request, url(f"/posts/{post.id}"))

    @app.route("/posts/<post_id>/delete", methods=["POST"])
    async def delete_post(self, request: IRequest, post_id: str) -> bytes:
        _viewer, me, _form = await self._posted(request)
        await self.actions.delete_post(me.id, parse_id(post_id, "the post id"))
        return redirect_response(request, url("/feed"))

    # --- dialogs ------------------------------------------------------------------------

    @app.route("/dialogs", methods=["GET"])
    async def dialogs(self, request: IRequest) -> bytes:
        viewer, me = await self._member(request, unread=False)
        unread = await self.actions.unread(request_id=request_id(request), caller=me.id)
        viewer = Viewer(user=me, csrf=viewer.csrf, unread=unread.total)
        people = [
            user
            for user in [await self.accounts.get(peer) for peer in unread.by_peer]
            if user is not None
        ]
        listed = {user.id for user in people}
        people += [user for user in await self._friends(me.id) if user.id not in listed]
        return _html(request, views.dialogs_page(viewer, people, unread.by_peer))

    @app.route("/dialogs/<user_id>", methods=["GET"])
    async def dialog(self, request: IRequest, user_id: str) -> bytes:
        viewer, me = await self._member(request, unread=False)
        peer = await self._user(user_id)
        await self.actions.peer(me.id, peer.id)
        messages = await self.actions.dialog(
            request_id=request_id(request), caller=me.id, peer=peer.id
        )
        # Read after the dialog, which cleared its own count.
        viewer = Viewer(user=me, csrf=viewer.csrf, unread=await self._unread_total(request, me.id))
        return _html(request, views.dialog_page(viewer, peer, messages))

    @app.route("/dialogs/<user_id>", methods=["POST"])
    async def send(self, request: IRequest, user_id: str) -> bytes:
        viewer, me, form = await self._posted(request)
        peer = await self._user(user_id)
        draft = _field(form, "text")
        try:
            await self.actions.peer(me.id, peer.id)
            await self.actions.send_message(
                request_id=request_id(request),
                caller=me.id,
                peer=peer.id,
                text=validate_message_text(draft),
                idempotency_key=uuid.uuid4().hex,
            )
        except Exception as e:
            error = self._refused(request, e)
            messages = await self.actions.dialog(
                request_id=request_id(request), caller=me.id, peer=peer.id
            )
            page = views.dialog_page(viewer, peer, messages, draft=draft, error=error.message)
            return _html(request, page, error.status)
        return redirect_response(request, url(f"/dialogs/{peer.id}") + "#latest")

    @app.route("/unread.json", methods=["GET"])
    async def unread(self, request: IRequest) -> Any:
        """The unread counts for the pages' script: ``{"total", "dialogs": {peer: count}}``."""
        session = await self._signed_in(request)
        if session is None:
            set_status(request, 401)
            return _json(request, {"total": None, "dialogs": {}})
        unread = await self.actions.unread(request_id=request_id(request), caller=session[0].id)
        body = {"total": unread.total, "dialogs": {str(k): v for k, v in unread.by_peer.items()}}
        return _json(request, body)

    @app.route("/static/<name>", methods=["GET"])
    def static(self, request: IRequest, name: str) -> bytes:
        content_type = STATIC.get(name)
        if content_type is None:
            raise NotFound("There is no such file.")
        data = files("snet.server").joinpath("static", name).read_bytes()
        set_header(request, b"Content-Type", content_type)
        set_header(request, b"Cache-Control", b"max-age=300")
        set_header(request, b"X-Content-Type-Options", b"nosniff")
        return data


def _json(request: IRequest, body: dict[str, Any]) -> bytes:
    data = json_bytes(body)
    set_header(request, b"Content-Type", b"application/json")
    set_header(request, b"Cache-Control", b"no-store")
    return data
