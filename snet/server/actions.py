"""What people do, the same whether they call the JSON API (``snet.server.app``) or use the
web pages (``snet.server.pages``): register and log in under the rate limits, befriend,
write posts (keeping the feed cache in step), and read and write dialogs through the chat
gateway.

Handlers read and validate their input (``snet.server.validation``) and shape their answer
(JSON or HTML); every rule of what then happens lives here, once. Exceptions are the
stores' own (``DOMAIN_ERRORS`` says how they are answered) and ``ApiError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred

from snet.chat_contract import MAX_LIMIT
from snet.server.accounts import Accounts, NoSuchUser, Profile, WrongPassword
from snet.server.feed import FeedCache
from snet.server.gateway import ChatGateway, ChatReply, ChatUnavailable, NoChatInstance
from snet.server.ratelimit import LoginThrottle, Registration, RegistrationThrottle
from snet.server.social import (
    NoSuchFriend,
    NoSuchPost,
    NotAuthor,
    Post,
    SelfFriendship,
    Social,
)
from snet.web.errors import ApiError, BadRequest, DomainErrors, ErrorCode, NotFound, Unavailable
from snet.web.service import uncancellable

DOMAIN_ERRORS: DomainErrors = {
    NoSuchUser: (NotFound, ErrorCode.USER_NOT_FOUND),
    WrongPassword: (BadRequest, ErrorCode.WRONG_PASSWORD),
    SelfFriendship: (BadRequest, ErrorCode.SELF_FRIENDSHIP),
    NoSuchFriend: (BadRequest, ErrorCode.NO_SUCH_USER),
    NoSuchPost: (BadRequest, ErrorCode.NO_SUCH_POST),
    NotAuthor: (BadRequest, ErrorCode.NOT_AUTHOR),
}
"""What the stores' exceptions are answered with."""

CHAT_RETRY_AFTER = 1

DIALOG_PAGE = MAX_LIMIT
"""Messages asked of the chat service per page of a dialog: the most it gives."""
MAX_DIALOG_PAGES = 20
"""Pages read for one dialog: the oldest 10,000 messages at most."""


def chat_unavailable(exc: BaseException) -> Unavailable | None:
    """The 503 that a failure to reach any chat instance is answered with, if *exc* is one."""
    if isinstance(exc, NoChatInstance):
        return Unavailable(
            "no chat instance is available; retry shortly",
            code=ErrorCode.NO_CHAT_INSTANCE,
            retry_after=CHAT_RETRY_AFTER,
        )
    if isinstance(exc, ChatUnavailable):
        return Unavailable(
            "the chat service is unavailable; retry shortly",
            code=ErrorCode.CHAT_UNAVAILABLE,
            retry_after=CHAT_RETRY_AFTER,
        )
    return None


def chat_error(reply: ChatReply) -> ApiError:
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


def successful(reply: ChatReply) -> ChatReply:
    """*reply* if it is a success; else raise ``chat_error(reply)``."""
    if not 200 <= reply.status < 300:
        raise chat_error(reply)
    return reply


@frozen
class Unread:
    """Unread messages of one user: the total and the count per peer (with unread only)."""

    total: int
    by_peer: dict[int, int]


Answered = Callable[[ChatReply], ChatReply]
"""What a handler does with each chat reply: at least ``successful``; the API also names
the instance that answered in a header."""


@frozen
class Actions:
    """The stores, the chat gateway and the rate limits behind both the API and the pages."""

    accounts: Accounts
    social: Social
    feed: FeedCache
    chat: ChatGateway
    logins: LoginThrottle | None = None
    registrations: RegistrationThrottle | None = None

    # --- accounts -----------------------------------------------------------------------

    async def register(self, profile: Profile, password: str, address: str) -> int:
        """Register a new user from client *address*, under the registration limits."""
        registration = None
        if self.registrations is not None:
            registration = await self.registrations.begin(address)
        # Runs to its end even if the client goes away (no refund for a registration that
        # happened), and gives the count back only if the registration failed.
        return await uncancellable(
            Deferred.fromCoroutine(self._register(profile, password, registration))
        )

    async def _register(
        self, profile: Profile, password: str, registration: Registration | None
    ) -> int:
        try:
            return await self.accounts.register(profile, password)
        except Exception:
            if registration is not None:
                await registration.abandoned()
            raise

    async def log_in(self, user_id: int, password: str, address: str) -> str:
        """A new token for *user_id*, from client *address*, under the login limits."""
        if self.logins is None:
            return await self.accounts.login(user_id, password)
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
        return token

    async def log_out(self, token: str) -> None:
        """Revoke *token*."""
        await uncancellable(self.accounts.logout(token))

    # --- friends and posts --------------------------------------------------------------

    async def befriend(self, caller: int, friend: int) -> None:
        if await uncancellable(self.social.befriend(caller, friend)):
            await self.feed.follows_changed(caller)

    async def unfriend(self, caller: int, friend: int) -> None:
        if await uncancellable(self.social.unfriend(caller, friend)):
            await self.feed.follows_changed(caller)

    async def create_post(self, caller: int, text: str) -> Post:
        post = await uncancellable(self.social.create_post(caller, text))
        await self.feed.post_created(post)
        return post

    async def update_post(self, caller: int, post_id: int, text: str) -> None:
        post = await uncancellable(self.social.update_post(caller, post_id, text))
        await self.feed.post_updated(post)

    async def delete_post(self, caller: int, post_id: int) -> None:
        post = await uncancellable(self.social.delete_post(caller, post_id))
        await self.feed.post_deleted(post)

    # --- dialogs ------------------------------------------------------------------------

    async def peer(self, caller: int, peer: int) -> int:
        """*peer* if *caller* may have a dialog with it: another user that exists."""
        if peer == caller:
            raise BadRequest("there is no dialog with oneself", code=ErrorCode.SELF_DIALOG)
        if not await self.accounts.exists(peer):
            raise BadRequest("no such user", code=ErrorCode.NO_SUCH_USER)
        return peer

    async def send_message(
        self,
        *,
        request_id: str,
        caller: int,
        peer: int,
        text: str,
        idempotency_key: str,
        answered: Answered = successful,
    ) -> None:
        """Send *text* from *caller* to *peer* (checked with ``peer``)."""
        reply = await uncancellable(
            self.chat.send(
                request_id=request_id,
                user_id=caller,
                peer_id=peer,
                text=text,
                idempotency_key=idempotency_key,
            )
        )
        answered(reply)

    async def dialog(
        self, *, request_id: str, caller: int, peer: int, answered: Answered = successful
    ) -> list[dict[str, Any]]:
        """The messages between *caller* and *peer*, oldest first, as the chat service gives
        them (``sender_id``, ``recipient_id``, ``text``, ``created_at``); reading them clears
        the dialog's unread count."""
        messages: list[dict[str, Any]] = []
        after_id: int | None = None
        for _page in range(MAX_DIALOG_PAGES):
            reply = answered(
                await self.chat.list(
                    request_id=request_id,
                    user_id=caller,
                    peer_id=peer,
                    after_id=after_id,
                    limit=DIALOG_PAGE,
                )
            )
            body = reply.body if isinstance(reply.body, dict) else {}
            messages.extend(body.get("messages") or [])
            next_after = body.get("next_after_id")
            if not isinstance(next_after, int):
                break
            after_id = next_after
        return messages

    async def unread(
        self, *, request_id: str, caller: int, answered: Answered = successful
    ) -> Unread:
        """*caller*'s unread messages."""
        reply = answered(await self.chat.unread(request_id=request_id, user_id=caller))
        body = reply.body if isinstance(reply.body, dict) else {}
        return Unread(
            total=int(body.get("total") or 0),
            by_peer={
                int(entry["peer_id"]): int(entry["count"]) for entry in body.get("dialogs") or []
            },
        )
