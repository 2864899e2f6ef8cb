"""The request and response plumbing every handler uses: request ids (and the client-given
token shape they share with idempotency keys), headers, status codes and JSON answers.

IRequest's methods carry no type annotations; the typed wrappers here keep the
``type: ignore`` comments in one place.
"""

from __future__ import annotations

import json
import re
import uuid
from weakref import WeakKeyDictionary

from twisted.internet.defer import Deferred
from twisted.web.iweb import IRequest

CLIENT_TOKEN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
"""What a client-given request id or idempotency key may look like."""

REQUEST_ID_HEADER = b"X-Request-ID"

_request_ids: WeakKeyDictionary[IRequest, str] = WeakKeyDictionary()


def is_client_token(text: str) -> bool:
    """Whether *text* is 1 to 128 characters of ``[A-Za-z0-9._:-]`` (``CLIENT_TOKEN``)."""
    return CLIENT_TOKEN.fullmatch(text) is not None


def set_header(request: IRequest, name: bytes, value: bytes) -> None:
    """Set response header *name* (IRequest's methods carry no annotations)."""
    request.setHeader(name, value)  # type: ignore[no-untyped-call]


def set_status(request: IRequest, status: int) -> None:
    """Set the response status code."""
    request.setResponseCode(status)  # type: ignore[no-untyped-call]


def notify_finish(request: IRequest) -> Deferred[None]:
    """``request.notifyFinish()``: fires when the response is done, errbacks if the client
    went away first."""
    d: Deferred[None] = request.notifyFinish()  # type: ignore[attr-defined]
    return d


def header_text(request: IRequest, name: bytes) -> str | None:
    """The first value of header *name* as text, or None if absent or not ASCII (then "")."""
    raw: bytes | None = request.getHeader(name)  # type: ignore[no-untyped-call]
    if raw is None:
        return None
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return ""


def request_id(request: IRequest) -> str:
    """The id of *request*: the client's ``X-Request-ID`` if sane, else a new uuid4 hex.

    The first call decides it, remembers it on the request and sets it as a response header;
    later calls return the same id.
    """
    known = _request_ids.get(request)
    if known is not None:
        return known
    given = header_text(request, REQUEST_ID_HEADER)
    rid = given if given is not None and is_client_token(given) else uuid.uuid4().hex
    _request_ids[request] = rid
    set_header(request, REQUEST_ID_HEADER, rid.encode("ascii"))
    return rid


def redirect_response(request: IRequest, location: str, status: int = 303) -> bytes:
    """Send the client to *location* (a path on this site): 303 See Other by default, what
    a form's POST is answered with so that reloading the next page does not post again."""
    set_status(request, status)
    set_header(request, b"Location", location.encode("utf-8"))
    set_header(request, b"Content-Length", b"0")
    return b""


def json_bytes(body: object) -> bytes:
    """*body* as compact UTF-8 JSON."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def json_response(request: IRequest, body: object, status: int = 200) -> bytes:
    """Set *status* and the JSON content type on *request* and return *body* encoded."""
    data = json_bytes(body)
    set_status(request, status)
    set_header(request, b"Content-Type", b"application/json")
    set_header(request, b"Content-Length", str(len(data)).encode("ascii"))
    return data
