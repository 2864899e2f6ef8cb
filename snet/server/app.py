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

import re
import uuid
from collections.abc import Sequence
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from snet.chat_contract import (
    CHAT_INSTANCE_HEADER,
    IDEMPOTENCY_HEADER,
    MAX_LIMIT,
    validate_idempotency_key,
    validate_message_text,
)
from snet.server.accounts import SEARCH_LIMIT, Accounts, NoSuchUser, Profile, WrongPassword
from snet.server.feed import FeedCache
from snet.server.gateway import ChatGateway, ChatReply, ChatUnavailable, NoChatInstance
from snet.server.openapi import openapi_response
from snet.server.ratelimit import (
    LoginThrottle,
    Network,
    Registration,
    RegistrationThrottle,
    client_address,
)
from snet.server.social import (
    FEED_SIZE,
    NoSuchFriend,
    NoSuchPost,
    NotAuthor,
    SelfFriendship,
    Social,
)
from snet.server.validation import (
    parse_birthdate,
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
    ApiError,
    BadRequest,
    DomainErrors,
    ErrorCode,
    NotFound,
    Unauthorized,
    Unavailable,
    error_response,
)
from snet.web.inputs import parse_id, query_arg, read_json_object
from snet.web.metrics import HTTPMetrics
from snet.web.requests import header_text, json_response, request_id, set_header
from snet.web.service import (
    HEALTH_TIMEOUT,
    ServiceApp,
    health_response,
    uncancellable,
)

log = Logger(namespace="snet.server.app")

DEFAULT_FEED_LIMIT = 10
MAX_FEED_LIMIT = FEED_SIZE
DIALOG_PAGE = MAX_LIMIT
"""Messages asked of the chat service per page of ``/dialog/{id}/list``: the most it gives."""
MAX_DIALOG_PAGES = 20
"""Pages read for one ``/dialog/{id}/list``: the oldest 10,000 messages at most."""
CHAT_RETRY_AFTER = 1

DOMAIN_ERRORS: DomainErrors = {
    NoSuchUser: (NotFound, ErrorCode.USER_NOT_FOUND),
    WrongPassword: (BadRequest, ErrorCode.WRONG_PASSWORD),
    SelfFriendship: (BadRequest, ErrorCode.SELF_FRIENDSHIP),
    NoSuchFriend: (BadRequest, ErrorCode.NO_SUCH_USER),
    NoSuchPost: (BadRequest, ErrorCode.NO_SUCH_POST),
    NotAuthor: (BadRequest, ErrorCode.NOT_AUTHOR),
}
"""What the stores' exceptions are answered with."""

_NUMBER = re.compile(r"[0-9]{1,9}")


def parse_offset(text: str | None) -> int:
    """The feed's offset: a non-negative integer (0 if absent)."""
    if text is None:
        return 0
    if _NUMBER.fullmatch(text) is None:
        raise BadRequest("offset must be a non-negative integer", code=ErrorCode.INVALID_PARAMETER)
    return int(text)


def parse_feed_limit(text: str | None) -> int:
    """The feed's page size: 1 to MAX_FEED_LIMIT (DEFAULT_FEED_LIMIT if absent)."""
    if text is None:
        return DEFAULT_FEED_LIMIT
    if _NUMBER.fullmatch(text) is None or not 1 <= int(text) <= MAX_FEED_LIMIT:
        raise BadRequest(
            f"limit must be an integer from 1 to {MAX_FEED_LIMIT}",
            code=ErrorCode.INVALID_PARAMETER,
        )
    return int(text)


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


def _chat_error(reply: ChatReply) -> ApiError:
    """The error to answer for a chat reply that is not a success."""
    body = reply.body if isinstance(reply.body, dict) else {}
    message = body.get("message")
    code = body.get("code")
    if 400 <= reply.status < 500:
        error = ApiError(
            message if isinstance(message, str) else f"the chat service answered {reply.status}",
            code=code if isinstance(code, int) else reply.status * 100,
        )
        error.status = reply.status
        return error
    return Unavailable(
        "the chat service failed; retry shortly",
        code=ErrorCode.CHAT_UNAVAILABLE,
        retry_after=CHAT_RETRY_AFTER,
    )


class ServerAPI(ServiceApp):
    """The monolith's public API; ``resource()`` is what a Site serves."""

    app = Klein()

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

    @app.handle_errors(Exception)
    def _error(self, request: IRequest, failure: Failure) -> bytes:
        exc = failure.value
        mapped: Unavailable | None = None
        if isinstance(exc, NoChatInstance):
            mapped = Unavailable(
                "no chat instance is available; retry shortly",
                code=ErrorCode.NO_CHAT_INSTANCE,
                retry_after=CHAT_RETRY_AFTER,
            )
        elif isinstance(exc, ChatUnavailable):
            mapped = Unavailable(
                "the chat service is unavailable; retry shortly",
                code=ErrorCode.CHAT_UNAVAILABLE,
                retry_after=CHAT_RETRY_AFTER,
            )
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
        registration = None
        if self.registrations is not None:
            address = client_address(request, self.trusted_proxies)
            registration = await self.registrations.begin(address)
        # Runs to its end even if the client goes away (no refund for a registration that
        # happened), and gives the count back only if the registration failed.
        user_id = await uncancellable(
            Deferred.fromCoroutine(self._register(profile, password, registration))
        )
        return json_response(request, {"user_id": str(user_id)})

    async def _register(
        self, profile: Profile, password: str, registration: Registration | None
    ) -> int:
        try:
            return await self.accounts.register(profile, password)
        except Exception:
            if registration is not None:
                await registration.abandoned()
            raise

    @app.route("/login", methods=["POST"])
    async def login(self, request: IRequest) -> bytes:
        body = read_json_object(request)
        user_id = parse_user_id(body.get("id"), "id")
        password = validate_given_password(body.get("password"))
        if self.logins is None:
            token = await self.accounts.login(user_id, password)
            return json_response(request, {"token": token})
        address = client_address(request, self.trusted_proxies)
        attempt = await self.logins.begin(str(user_id), address)
        try:
            token = await self.accounts.login(user_id, password)
        except (NoSuchUser, WrongPassword, CancelledError):
            # A client that leaves before the answer still cost a password check.
            attempt.failed()
            raise
        except Exception:
            await attempt.abandoned()  # not checked (MySQL away): not held against anyone
            raise
        await attempt.succeeded()
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
            await uncancellable(self.accounts.logout(bearer_token(request)))
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
        friend = parse_id(user_id, "user_id")
        if await uncancellable(self.social.befriend(caller, friend)):
            await self.feed.follows_changed(caller)
        return json_response(request, {})

    @app.route("/friend/delete/<user_id>", methods=["PUT"])
    async def unfriend(self, request: IRequest, user_id: str) -> bytes:
        caller = await self._caller(request)
        friend = parse_id(user_id, "user_id")
        if await uncancellable(self.social.unfriend(caller, friend)):
            await self.feed.follows_changed(caller)
        return json_response(request, {})

    # --- posts --------------------------------------------------------------------------

    @app.route("/post/create", methods=["POST"])
    async def create_post(self, request: IRequest) -> bytes:
        caller = await self._caller(request)
        text = validate_post_text(read_json_object(request).get("text"))
        post = await uncancellable(self.social.create_post(caller, text))
        await self.feed.post_created(post)
        return json_response(request, str(post.id))

    @app.route("/post/update", methods=["PUT"])
    async def update_post(self, request: IRequest) -> bytes:
        caller = await self._caller(request)
        body = read_json_object(request)
        post_id = self._post_id(body.get("id"))
        text = validate_post_text(body.get("text"))
        post = await uncancellable(self.social.update_post(caller, post_id, text))
        await self.feed.post_updated(post)
        return json_response(request, {})

    @app.route("/post/delete/<post_id>", methods=["PUT"])
    async def delete_post(self, request: IRequest, post_id: str) -> bytes:
        caller = await self._caller(request)
        post = await uncancellable(self.social.delete_post(caller, parse_id(post_id, "id")))
        await self.feed.post_deleted(post)
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

    async def _peer(self, request: IRequest, caller: int, user_id: str) -> int:
        peer = parse_id(user_id, "user_id")
        if peer == caller:
            raise BadRequest("there is no dialog with oneself", code=ErrorCode.SELF_DIALOG)
        if not await self.accounts.exists(peer):
            raise BadRequest("no such user", code=ErrorCode.NO_SUCH_USER)
        return peer

    @staticmethod
    def _answered(request: IRequest, reply: ChatReply) -> ChatReply:
        """Name the instance that answered, and raise if it did not answer with success."""
        set_header(request, CHAT_INSTANCE_HEADER, reply.instance.encode("utf-8", "replace"))
        if not 200 <= reply.status < 300:
            raise _chat_error(reply)
        return reply

    @app.route("/dialog/<user_id>/send", methods=["POST"])
    async def send_message(self, request: IRequest, user_id: str) -> bytes:
        caller = await self._caller(request)
        key = header_text(request, IDEMPOTENCY_HEADER)
        if key is not None:
            validate_idempotency_key(key)
        text = validate_message_text(read_json_object(request).get("text"))
        peer = await self._peer(request, caller, user_id)
        reply = await uncancellable(
            self.chat.send(
                request_id=request_id(request),
                user_id=caller,
                peer_id=peer,
                text=text,
                idempotency_key=key if key is not None else uuid.uuid4().hex,
            )
        )
        self._answered(request, reply)
        return json_response(request, {})

    @app.route("/dialog/<user_id>/list", methods=["GET"])
    async def list_messages(self, request: IRequest, user_id: str) -> bytes:
        caller = await self._caller(request)
        peer = await self._peer(request, caller, user_id)
        messages: list[dict[str, Any]] = []
        after_id: int | None = None
        for _page in range(MAX_DIALOG_PAGES):
            reply = self._answered(
                request,
                await self.chat.list(
                    request_id=request_id(request),
                    user_id=caller,
                    peer_id=peer,
                    after_id=after_id,
                    limit=DIALOG_PAGE,
                ),
            )
            body = reply.body if isinstance(reply.body, dict) else {}
            for message in body.get("messages") or []:
                messages.append(
                    {
                        "from": str(message["sender_id"]),
                        "to": str(message["recipient_id"]),
                        "text": message["text"],
                    }
                )
            next_after = body.get("next_after_id")
            if not isinstance(next_after, int):
                break
            after_id = next_after
        return json_response(request, messages)

    @app.route("/dialog/unread", methods=["GET"])
    async def unread(self, request: IRequest) -> bytes:
        caller = await self._caller(request)
        reply = self._answered(
            request, await self.chat.unread(request_id=request_id(request), user_id=caller)
        )
        body = reply.body if isinstance(reply.body, dict) else {}
        return json_response(
            request,
            {
                "total": int(body.get("total") or 0),
                "dialogs": [
                    {"user_id": str(entry["peer_id"]), "count": int(entry["count"])}
                    for entry in body.get("dialogs") or []
                ],
            },
        )

    # --- operations ---------------------------------------------------------------------

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
