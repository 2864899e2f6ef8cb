"""Errors as clients see them: the numeric codes of every app, the ``ApiError`` family, and
``error_response``, the one place an exception becomes a JSON error answer.

Handlers raise ``ApiError`` subclasses. Stores raise exceptions of their own, which know
nothing of HTTP: each app lists the ones it expects in a ``DomainErrors`` table (exception
type -> ``ApiError`` class and code) that it hands to ``error_response``.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from werkzeug.exceptions import HTTPException

from snet.storage import is_unavailable
from snet.web.requests import json_response, request_id, set_header

log = Logger(namespace="snet.web")


class ErrorCode(IntEnum):
    """The ``code`` of JSON error bodies (an integer, as the public API has it): the HTTP
    status times 100, plus a number for the particular problem. One list for every app, so
    that codes never collide and the monolith can pass them on."""

    BAD_REQUEST = 40000
    INVALID_JSON = 40001
    BODY_TOO_LARGE = 40002
    UNSUPPORTED_CONTENT_TYPE = 40003
    INVALID_PARAMETER = 40004
    MISSING_HEADER = 40005
    INVALID_TEXT = 40006
    SELF_DIALOG = 40007
    INVALID_FIELD = 40008
    WRONG_PASSWORD = 40009
    NO_SUCH_USER = 40010
    SELF_FRIENDSHIP = 40011
    NO_SUCH_POST = 40012
    NOT_AUTHOR = 40013
    UNAUTHORIZED = 40100
    NO_CLIENT_CERTIFICATE = 40101
    FORBIDDEN = 40300
    CSRF_REFUSED = 40301
    NOT_FOUND = 40400
    USER_NOT_FOUND = 40401
    METHOD_NOT_ALLOWED = 40500
    REQUEST_TIMEOUT = 40800
    CONFLICT = 40900
    IDEMPOTENCY_KEY_REUSED = 40901
    CONTENT_TOO_LARGE = 41300
    RATE_LIMITED = 42900
    TOO_MANY_FAILED_LOGINS = 42901
    TOO_MANY_REGISTRATIONS = 42902
    INTERNAL = 50000
    UNAVAILABLE = 50300
    DRAINING = 50301
    MYSQL_UNAVAILABLE = 50302
    NO_CHAT_INSTANCE = 50304
    CHAT_UNAVAILABLE = 50305
    RATE_LIMITS_UNAVAILABLE = 50306


class ApiError(Exception):
    """An error the client is told about: an HTTP status, a message and a numeric code, plus
    any response *headers* it needs (such as ``WWW-Authenticate``)."""

    status: int = 500
    default_code: int = ErrorCode.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        retry_after: int | None = None,
        headers: Mapping[bytes, bytes] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = int(code if code is not None else self.default_code)
        self.retry_after = retry_after
        self.headers: dict[bytes, bytes] = dict(headers or {})


class BadRequest(ApiError):
    """The request is malformed or invalid (400); nothing was changed."""

    status = 400
    default_code = ErrorCode.BAD_REQUEST


class Unauthorized(ApiError):
    """No valid credentials (401): ``WWW-Authenticate: Bearer`` says which kind are wanted.

    With *invalid_token* (a token was given but is unknown or expired) the header carries
    ``error="invalid_token"``, as RFC 6750 has it.
    """

    status = 401
    default_code = ErrorCode.UNAUTHORIZED

    def __init__(self, message: str, *, code: int | None = None, invalid_token: bool = False):
        challenge = b'Bearer error="invalid_token"' if invalid_token else b"Bearer"
        super().__init__(message, code=code, headers={b"WWW-Authenticate": challenge})


class ClientCertificateRequired(ApiError):
    """A service-to-service call without a verified Connect client certificate (401).

    No ``WWW-Authenticate``: the credential is a TLS client certificate, which no HTTP
    challenge asks for (a ``Bearer`` challenge would send callers looking for a token).
    """

    status = 401
    default_code = ErrorCode.NO_CLIENT_CERTIFICATE


class Forbidden(ApiError):
    """The caller proved who it is but may not do this (403)."""

    status = 403
    default_code = ErrorCode.FORBIDDEN


class NotFound(ApiError):
    """There is no such thing (404)."""

    status = 404
    default_code = ErrorCode.NOT_FOUND


class Conflict(ApiError):
    """The request conflicts with what is stored (409)."""

    status = 409
    default_code = ErrorCode.CONFLICT


class Unavailable(ApiError):
    """A back end (MySQL, Redis) cannot be reached now (503); retry after ``retry_after`` s."""

    status = 503
    default_code = ErrorCode.UNAVAILABLE

    def __init__(self, message: str, *, code: int | None = None, retry_after: int = 1) -> None:
        super().__init__(message, code=code, retry_after=retry_after)


DomainErrors = Mapping[type[Exception], tuple[type[ApiError], ErrorCode]]
"""An app's table of the exceptions its stores raise: type -> the ``ApiError`` class (the
status) and code to answer with; the message is the exception's own."""


def error_body(request: IRequest, message: str, code: int) -> dict[str, object]:
    """The JSON body of every error answer (the public API's 5xx shape, used for 4xx too)."""
    return {"message": message, "request_id": request_id(request), "code": code}


def error_response(
    request: IRequest, failure: Failure, domain_errors: DomainErrors | None = None
) -> bytes:
    """Turn *failure* into a JSON error answer on *request*: the one place errors are mapped.

    See ``answered_error``; the answer carries its status, headers and ``Retry-After``.
    """
    api_error = answered_error(request, failure, domain_errors)
    return json_response(
        request, error_body(request, api_error.message, api_error.code), api_error.status
    )


def answered_error(
    request: IRequest, failure: Failure, domain_errors: DomainErrors | None = None
) -> ApiError:
    """The ``ApiError`` that *failure* is answered with, its headers (``Retry-After``
    included) already set on *request*; for answers in any format (JSON, HTML pages).

    ``ApiError`` keeps its status; an exception listed in *domain_errors* gets the status
    and code listed there; routing errors (unknown path, wrong method) keep theirs; back-end
    connection errors become 503 with ``Retry-After: 1``; anything else is logged with its
    traceback and request id and answered 500 without any detail.
    """
    exc = failure.value
    assert exc is not None
    if isinstance(exc, HTTPException):
        response = exc.get_response({})
        for name, value in response.headers.items():
            if name.lower() in ("allow", "location"):
                set_header(request, name.encode("ascii"), value.encode("latin-1"))
        status = exc.code or 500
        api_error = ApiError(exc.description or exc.name, code=status * 100)
        api_error.status = status
    else:
        api_error = error_of(failure, request_id(request), domain_errors)
    for header, header_value in api_error.headers.items():
        set_header(request, header, header_value)
    if api_error.retry_after is not None:
        set_header(request, b"Retry-After", str(api_error.retry_after).encode("ascii"))
    return api_error


def error_of(failure: Failure, rid: str, domain_errors: DomainErrors | None = None) -> ApiError:
    """The ``ApiError`` a request's or a batched call's *failure* is answered with (see
    ``answered_error``; routing errors are the request's own), logged with *rid* when it
    is a back end away or a bug."""
    exc = failure.value
    assert exc is not None
    if isinstance(exc, ApiError):
        return exc
    if (listed := _listed_error(exc, domain_errors or {})) is not None:
        return listed
    if is_unavailable(exc):
        log.warn(
            "[{request_id}] back end unavailable: {error}",
            error=f"{type(exc).__name__}: {exc}",
            request_id=rid,
        )
        return Unavailable("a back end is unavailable; retry shortly")
    log.failure("unhandled error answering {request_id}", failure, request_id=rid)
    return ApiError("internal error")


def _listed_error(exc: BaseException, domain_errors: DomainErrors) -> ApiError | None:
    """The ``ApiError`` *domain_errors* lists for *exc*, if any."""
    for kind, (error_class, code) in domain_errors.items():
        if isinstance(exc, kind):
            return error_class(str(exc), code=code)
    return None
