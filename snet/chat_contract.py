"""The chat service's HTTP contract as both sides of it need it: the chat service
(``snet.chat.app``) that serves it and the monolith that calls it and passes some of it on
to its own clients. docs/chat-api.md describes it for readers.

Its headers, the rule for a message's text and an idempotency key, and the page limits.
"""

from __future__ import annotations

from snet.web.errors import BadRequest, ErrorCode
from snet.web.inputs import validate_text
from snet.web.requests import is_client_token

USER_HEADER = b"X-Snet-User-Id"
"""The id of the user a call acts for (the monolith authenticated them)."""
IDEMPOTENCY_HEADER = b"Idempotency-Key"
"""A send's key: the same key for the same message stores it once."""
CHAT_INSTANCE_HEADER = b"X-Snet-Chat-Instance"
"""Set by the monolith on its dialog answers: the chat instance that served the call."""

SEND_BATCH_PATH = "/v1/sends"
"""Several sends in one call (``POST``): the monolith's sends to one instance that came
while its call before was out (docs/chat-api.md)."""
MAX_BATCH_SENDS = 50
"""The most sends one batch call holds."""

MAX_TEXT = 4096
"""The longest message text, in characters (code points)."""

DEFAULT_LIMIT = 100
"""Messages in a page of a dialog when the caller asks for no ``limit``."""
MAX_LIMIT = 500
"""The most messages one page of a dialog holds."""


def validate_message_text(value: object) -> str:
    """A message's text: see ``snet.web.inputs.validate_text``; at most MAX_TEXT characters."""
    return validate_text(value, MAX_TEXT)


def validate_idempotency_key(key: str) -> str:
    """*key* if it is 1 to 128 characters of ``[A-Za-z0-9._:-]``.

    :raises BadRequest: otherwise.
    """
    if not is_client_token(key):
        raise BadRequest(
            "Idempotency-Key must be 1-128 characters of A-Z a-z 0-9 . _ : -",
            code=ErrorCode.INVALID_PARAMETER,
        )
    return key
