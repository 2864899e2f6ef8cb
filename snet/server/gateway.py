"""What the monolith's public API needs from the chat service, whatever carries the calls.

``ServerAPI`` (the public routes) depends only on this protocol; ``snet.server.chat_client``
implements it by spreading calls over the chat instances Consul reports as passing (or over
one fixed URL), and unit tests of the routes implement it in memory.
"""

from __future__ import annotations

from typing import Any, Protocol

from attrs import frozen
from twisted.internet.defer import Deferred


@frozen
class ChatReply:
    """A chat instance's answer, as the monolith passes it on.

    ``status`` and ``body`` are the instance's HTTP status and decoded JSON body (the chat API of
    docs/chat-api.md); ``instance`` names the instance that answered (its Consul service ID, or
    HOST:PORT), for the ``X-Snet-Chat-Instance`` response header.
    """

    status: int
    body: Any
    instance: str


class NoChatInstance(Exception):
    """No chat instance is known to be passing: dialog calls answer 503 with Retry-After."""


class ChatUnavailable(Exception):
    """Every instance tried failed (refused, timed out, or answered 5xx): 503 with Retry-After."""


class ChatGateway(Protocol):
    """The chat service as the monolith calls it. Every call carries the caller's request id."""

    def send(
        self, *, request_id: str, user_id: int, peer_id: int, text: str, idempotency_key: str
    ) -> Deferred[ChatReply]:
        """POST /v1/dialogs/{peer_id}/messages as user_id."""

    def list(
        self, *, request_id: str, user_id: int, peer_id: int, after_id: int | None, limit: int
    ) -> Deferred[ChatReply]:
        """GET /v1/dialogs/{peer_id}/messages?after_id=&limit= as user_id (clears unread)."""

    def unread(self, *, request_id: str, user_id: int) -> Deferred[ChatReply]:
        """GET /v1/unread as user_id."""
