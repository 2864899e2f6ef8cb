"""What clients send, checked: JSON object bodies, ids in paths and bodies, query arguments
and texts (messages, posts). Anything unacceptable raises ``BadRequest``."""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import parse_qsl

from twisted.web.iweb import IRequest

from snet.web.errors import BadRequest, ErrorCode
from snet.web.requests import header_text

MAX_JSON_BODY = 64 * 1024
"""The largest JSON body read_json_object accepts, in bytes."""


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _body(request: IRequest, content_type: str, kind: str, limit: int) -> bytes | None:
    """The body of *request* (None if it has none) if its content type is *content_type*
    and it is at most *limit* bytes; else raise ``BadRequest``, calling it *kind*."""
    given = (header_text(request, b"Content-Type") or "").split(";")[0].strip().lower()
    if given != content_type:
        raise BadRequest(
            f"the body must be {kind} (Content-Type: {content_type})",
            code=ErrorCode.UNSUPPORTED_CONTENT_TYPE,
        )
    content = request.content
    if content is None:
        return None
    content.seek(0)
    raw: bytes = content.read(limit + 1)
    if len(raw) > limit:
        raise BadRequest(f"the body is over {limit} bytes", code=ErrorCode.BODY_TOO_LARGE)
    return raw


def read_json_object(request: IRequest, *, limit: int = MAX_JSON_BODY) -> dict[str, Any]:
    """The request body as a JSON object.

    :raises BadRequest: if the content type is not JSON, the body is over *limit* bytes, is
        not UTF-8 JSON (``NaN`` and ``Infinity`` included), or is not an object.
    """
    raw = _body(request, "application/json", "JSON", limit)
    if raw is None:
        raise BadRequest("the body must be a JSON object", code=ErrorCode.INVALID_JSON)
    try:
        body = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise BadRequest("the body is not valid JSON", code=ErrorCode.INVALID_JSON) from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", code=ErrorCode.INVALID_JSON)
    return body


MAX_FORM_BODY = 64 * 1024
"""The largest HTML form body read_form accepts, in bytes."""


def read_form(request: IRequest, *, limit: int = MAX_FORM_BODY) -> dict[str, str]:
    """The request body as an HTML form (``application/x-www-form-urlencoded``, UTF-8): each
    field's first value. The sites do not parse bodies themselves (snet.web.limits).

    :raises BadRequest: if the content type is another, the body is over *limit* bytes or
        is not UTF-8.
    """
    raw = _body(request, "application/x-www-form-urlencoded", "a form", limit) or b""
    try:
        pairs = parse_qsl(
            raw.decode("ascii"), keep_blank_values=True, encoding="utf-8", errors="strict"
        )
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the form is not valid UTF-8", code=ErrorCode.INVALID_FIELD) from None
    form: dict[str, str] = {}
    for name, value in pairs:
        form.setdefault(name, value)
    return form


ID = re.compile(r"[1-9][0-9]{0,18}")
MAX_ID = 2**63 - 1


def validate_text(value: object, max_length: int) -> str:
    """A ``text`` field (a message, a post): a string with something besides white space, at
    most *max_length* characters, encodable as UTF-8 (no lone surrogates). Kept as given."""
    if value is None:
        raise BadRequest("text is required", code=ErrorCode.INVALID_TEXT)
    if not isinstance(value, str):
        raise BadRequest("text must be a string", code=ErrorCode.INVALID_TEXT)
    if not value.strip():
        raise BadRequest("text must not be empty", code=ErrorCode.INVALID_TEXT)
    if len(value) > max_length:
        raise BadRequest(
            f"text must be at most {max_length} characters", code=ErrorCode.INVALID_TEXT
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest("text must be valid Unicode", code=ErrorCode.INVALID_TEXT) from None
    return value


def parse_id(text: str | None, name: str) -> int:
    """A positive id below 2**63 written as plain decimal digits (no sign, zero, space).

    :raises BadRequest: naming *name* otherwise.
    """
    if text is None or ID.fullmatch(text) is None or int(text) > MAX_ID:
        raise BadRequest(
            f"{name} must be a positive integer below 2**63 in decimal digits",
            code=ErrorCode.INVALID_PARAMETER,
        )
    return int(text)


def query_arg(request: IRequest, name: str) -> str | None:
    """The first value of query argument *name* as text, or None if absent."""
    args: dict[bytes, list[bytes]] = request.args or {}
    values = args.get(name.encode("ascii"))
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        return ""
