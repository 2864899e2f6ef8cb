"""The monolith's public HTTP API (Klein): the OTUS Highload Architect 1.2.0 contract
(docs/openapi/, described for its users in docs/api.md) plus ``/dialog/unread``, ``/logout``,
``/health`` and ``/metrics``. Logins and registrations pass the rate limits of
``snet.server.ratelimit`` when they are given.

Users, tokens and passwords live in ``Accounts``, friendships and posts in ``Social`` (both
MySQL), feeds in ``FeedCache`` (Redis over MySQL); dialogs are forwarded to the chat service
through a ``ChatGateway``. Every error is a JSON body ``{"message", "request_id", "code"}``
(see snet.web.errors).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from snet.chat_contract import (
    CHAT_INSTANCE_HEADER,
    IDEMPOTENCY_HEADER,
    validate_idempotency_key,
    validate_message_text,
)
from snet.server.accounts import SEARCH_LIMIT, Accounts, Profile
from snet.server.actions import DOMAIN_ERRORS, Actions, chat_unavailable, successful
from snet.server.feed import FeedCache
from snet.server.gateway import ChatGateway, ChatReply
from snet.server.openapi import openapi_response
from snet.server.pages import PAGES_PREFIX, Pages
from snet.server.ratelimit import (
    LoginThrottle,
    Network,
    RegistrationThrottle,
    client_address,
)
from snet.server.social import Social
from snet.server.validation import (
    parse_birthdate,
    parse_feed_limit,
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
from snet.web.draining import InFlight
from snet.web.errors import (
    BadRequest,
    ErrorCode,
    NotFound,
    Unauthorized,
    error_response,
)
from snet.web.inputs import parse_id, query_arg, read_json_object
from snet.web.metrics import HTTPMetrics
from snet.web.requests import (
    header_text,
    json_response,
    redirect_response,
    request_id,
    set_header,
)
from snet.web.service import (
    HEALTH_TIMEOUT,
    RoutedKlein,
    ServiceApp,
    health_response,
    uncancellable,
)

log = Logger(namespace="snet.server.app")


def bearer_token(request: IRequest) -> str:
    """The token of ``Authorization: Bearer <token>``.

    :raises Unauthorized: if there is none, or it is not of the Bearer scheme.
    """
    header = header_text(request, b"Authorization")
    if header is None:
        raise Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be: Bearer <token>", invalid_token=True)
    return token.strip()


def _profile(body: dict[str, Any], today: Any) -> Profile:
    return Profile(
        first_name=validate_name(body.get("first_name"), "first_name"),
        second_name=validate_name(body.get("second_name"), "second_name"),
        birthdate=parse_birthdate(body.get("birthdate"), today),
        biography=validate_biography(body.get("biography")),
        city=validate_city(body.get("city")),
    )


class ServerAPI(ServiceApp):
    """The monolith's public API; ``resource()`` is what a Site serves."""

    app = RoutedKlein()
    direct_endpoints = frozenset({"send_message"})

    def __init__(
        self,
        *,
        accounts: Accounts,
        social: Social,
        feed: FeedCache,
        chat: ChatGateway,
        in_flight: InFlight,
        metrics: HTTPMetrics,
        version: str,
        clock: IReactorTime | None = None,
        health_timeout: float = HEALTH_TIMEOUT,
        logins: LoginThrottle | None = None,
        registrations: RegistrationThrottle | None = None,
        trusted_proxies: Sequence[Network] = (),
    ) -> None:
        super().__init__(
            in_flight=in_flight,
            metrics=metrics,
            version=version,
            clock=clock,
            health_timeout=health_timeout,
        )
        self.accounts = accounts
        self.social = social
        self.feed = feed
        self.chat = chat
        self.logins = logins
        self.registrations = registrations
        self.trusted_proxies = trusted_proxies
        self.actions = Actions(
            accounts=accounts,
            social=social,
            feed=feed,
            chat=chat,
            logins=logins,
            registrations=registrations,
        )
        self.pages = Pages(actions=self.actions, trusted_proxies=trusted_proxies)

    @app.handle_errors(Exception)
    def _error(self, request: IRequest, failure: Failure) -> bytes:
        exc = failure.value
        assert exc is not None
        mapped = chat_unavailable(exc)
        if mapped is not None:
            log.warn(
                "[{request_id}] chat unavailable: {error}",
                error=f"{type(exc).__name__}: {exc}",
                request_id=request_id(request),
            )
            failure = Failure(mapped)  # type: ignore[no-untyped-call]
        return error_response(request, failure, DOMAIN_ERRORS)

    async def _caller(self, request: IRequest) -> int:
        """The id of the user whose valid bearer token the request carries.

        :raises Unauthorized: otherwise.
        """
        token = bearer_token(request)
        user_id = await self.accounts.authenticate(token)
        if user_id is None:
            raise Unauthorized("the token is invalid or expired", invalid_token=True)
        return user_id

    # --- users --------------------------------------------------------------------------

    @app.route("/user/register", methods=["POST"])
    async def register(self, request: IRequest) -> bytes:
        body = read_json_object(request)
        profile = _profile(body, self.accounts.today())
        password = validate_new_password(body.get("password"))
        address = client_address(request, self.trusted_proxies)
        user_id = await self.actions.register(profile, password, address)
        return json_response(request, {"user_id": str(user_id)})

    @app.route("/login", methods=["POST"])
    async def login(self, request: IRequest) -> bytes:
        body = read_json_object(request)
        user_id = parse_user_id(body.get("id"), "id")
        password = validate_given_password(body.get("password"))
        address = client_address(request, self.trusted_proxies)
        token = await self.actions.log_in(user_id, password, address)
        return json_response(request, {"token": token})

    @app.route("/logout", methods=["POST"])
    async def logout(self, request: IRequest) -> bytes:
        """Revoke the token used, or with ``?everywhere=true`` every token of its user."""
        user_id = await self._caller(request)
        everywhere = query_arg(request, "everywhere")
        if everywhere not in (None, "true", "false"):
            raise BadRequest("everywhere must be true or false", code=ErrorCode.INVALID_PARAMETER)
        if everywhere == "true":
            await uncancellable(self.accounts.logout_everywhere(user_id))
        else:
            await self.actions.log_out(bearer_token(request))
        return json_response(request, {})

    @app.route("/user/get/<user_id>", methods=["GET"])
    async def get_user(self, request: IRequest, user_id: str) -> bytes:
        user = await self.accounts.get(parse_id(user_id, "id"))
        if user is None:
            raise NotFound("no such user", code=ErrorCode.USER_NOT_FOUND)
        return json_response(request, user.to_json())

    @app.route("/user/search", methods=["GET"])
    async def search_users(self, request: IRequest) -> bytes:
        first = validate_search_prefix(query_arg(request, "first_name"), "first_name")
        last = validate_search_prefix(query_arg(request, "last_name"), "last_name")
        users = await self.accounts.search(first, last, SEARCH_LIMIT)
        return json_response(request, [user.to_json() for user in users])

    # --- friends ------------------------------------------------------------------------

    @app.route("/friend/set/<user_id>", methods=["PUT"])
    async def befriend(self, request: IRequest, user_id: str) -> bytes:
        caller = await self._caller(request)
        await self.actions.befriend(caller, parse_id(user_id, "user_id"))
        return json_response(request, {})

    @app.route("/friend/delete/<user_id>", methods=["PUT"])
    async def unfriend(self, request: IRequest, user_id: str) -> bytes:
        caller = await self._caller(request)
        await self.actions.unfriend(caller, parse_id(user_id, "user_id"))
        return json_response(request, {})

    # --- posts --------------------------------------------------------------------------

    @app.route("/post/create", methods=["POST"])
    async def create_post(self, request: IRequest) -> bytes:
        caller = await self._caller(request)
        text = validate_post_text(read_json_object(request).get("text"))
        post = await self.actions.create_post(caller, text)
        return json_response(request, str(post.id))

    @app.route("/post/update", methods=["PUT"])
    async def update_post(self, request: IRequest) -> bytes:
        caller = await self._caller(request)
        body = read_json_object(request)
        post_id = self._post_id(body.get("id"))
        text = validate_post_text(body.get("text"))
        await self.actions.update_post(caller, post_id, text)
        return json_response(request, {})

    @app.route("/post/delete/<post_id>", methods=["PUT"])
    async def delete_post(self, request: IRequest, post_id: str) -> bytes:
        caller = await self._caller(request)
        await self.actions.delete_post(caller, parse_id(post_id, "id"))
        return json_response(request, {})

    @app.route("/post/get/<post_id>", methods=["GET"])
    async def get_post(self, request: IRequest, post_id: str) -> bytes:
        post = await self.social.get_post(parse_id(post_id, "id"))
        if post is None:
            raise BadRequest("no such post", code=ErrorCode.NO_SUCH_POST)
        return json_response(request, post.to_json())

    @app.route("/post/feed", methods=["GET"])
    async def feed_page(self, request: IRequest) -> bytes:
        caller = await self._caller(request)
        offset = parse_offset(query_arg(request, "offset"))
        limit = parse_feed_limit(query_arg(request, "limit"))
        posts = await self.feed.read(caller, offset, limit)
        return json_response(request, [post.to_json() for post in posts])

    @staticmethod
    def _post_id(value: object) -> int:
        if not isinstance(value, str):
            raise BadRequest("id must be a string of decimal digits", code=ErrorCode.INVALID_FIELD)
        return parse_id(value, "id")

    # --- dialogs ------------------------------------------------------------------------

    @staticmethod
    def _answered(request: IRequest, reply: ChatReply) -> ChatReply:
        """Name the instance that answered, and raise if it did not answer with success."""
        set_header(request, CHAT_INSTANCE_HEADER, reply.instance.encode("utf-8", "replace"))
        return successful(reply)

    @app.route("/dialog/<user_id>/send", methods=["POST"])
    async def send_message(self, request: IRequest, user_id: str) -> bytes:
        caller = await self._caller(request)
        key = header_text(request, IDEMPOTENCY_HEADER)
        if key is not None:
            validate_idempotency_key(key)
        text = validate_message_text(read_json_object(request).get("text"))
        peer = await self.actions.peer(caller, parse_id(user_id, "user_id"))
        await self.actions.send_message(
            request_id=request_id(request),
            caller=caller,
            peer=peer,
            text=text,
            idempotency_key=key if key is not None else uuid.uuid4().hex,
            answered=lambda reply: self._answered(request, reply),
        )
        return json_response(request, {})

    @app.route("/dialog/<user_id>/list", methods=["GET"])
    async def list_messages(self, request: IRequest, user_id: str) -> bytes:
        caller = await self._caller(request)
        peer = await self.actions.peer(caller, parse_id(user_id, "user_id"))
        messages = await self.actions.dialog(
            request_id=request_id(request),
            caller=caller,
            peer=peer,
            answered=lambda reply: self._answered(request, reply),
        )
        return json_response(
            request,
            [
                {
                    "from": str(message["sender_id"]),
                    "to": str(message["recipient_id"]),
                    "text": message["text"],
                }
                for message in messages
            ],
        )

    @app.route("/dialog/unread", methods=["GET"])
    async def unread(self, request: IRequest) -> bytes:
        caller = await self._caller(request)
        unread = await self.actions.unread(
            request_id=request_id(request),
            caller=caller,
            answered=lambda reply: self._answered(request, reply),
        )
        return json_response(
            request,
            {
                "total": unread.total,
                "dialogs": [
                    {"user_id": str(peer), "count": count} for peer, count in unread.by_peer.items()
                ],
            },
        )

    # --- operations ---------------------------------------------------------------------

    @app.route("/", methods=["GET"])
    def home(self, request: IRequest) -> bytes:
        """People who open the site's address get its web pages."""
        return redirect_response(request, PAGES_PREFIX + "/")

    @app.route(PAGES_PREFIX + "/", branch=True)
    def web_pages(self, request: IRequest) -> Any:
        """The web pages (``snet.server.pages``), on the same stores and rate limits."""
        return self.pages.app.resource()

    @app.route("/health", methods=["GET"])
    async def health(self, request: IRequest) -> bytes:
        return await health_response(
            request,
            in_flight=self.in_flight,
            ping=self.accounts.ping,
            timeout=self.health_timeout,
            clock=self.clock,
            version=self.version,
        )

    @app.route("/openapi.json", methods=["GET"])
    def openapi_document(self, request: IRequest) -> bytes:
        return openapi_response(request)
