"""Sessions and CSRF protection of the web pages.

A signed-in browser holds the user's bearer token (the same revocable token the JSON API
gives, from ``Accounts.login``) in the cookie ``snet_session``: HttpOnly, SameSite=Lax,
Path=/web, Secure when the page was served over TLS (by this process, or by a trusted proxy
in front of it that says so with ``X-Forwarded-Proto: https``). Logging out revokes the
token.

Every form carries a CSRF token: the HMAC-SHA256 of the browser's secret (the session
token, or before sign-in the random ``snet_visitor`` cookie) under a fixed label. Another
site can neither read the cookie nor compute the HMAC, so a POST without the right token
is refused; no server-side state and no key to share between monolith processes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from twisted.web.iweb import IRequest

from snet.web.errors import ErrorCode, Forbidden

SESSION_COOKIE = b"snet_session"
VISITOR_COOKIE = b"snet_visitor"
CSRF_FIELD = "csrf"
_CSRF_LABEL = b"snet web pages: csrf v1"
COOKIE_PATH = b"/web"


class CsrfRefused(Forbidden):
    """A form was posted without the CSRF token of this browser's session (403)."""

    default_code = ErrorCode.CSRF_REFUSED


def cookie(request: IRequest, name: bytes) -> str | None:
    """The value of cookie *name*, or None (or if it is not ASCII)."""
    raw: bytes | None = request.getCookie(name)  # type: ignore[no-untyped-call]
    if not raw:
        return None
    try:
        return raw.decode("ascii")
    except UnicodeDecodeError:
        return None


def set_cookie(
    request: IRequest, name: bytes, value: str, *, max_age: int | None, secure: bool
) -> None:
    """Set cookie *name* (HttpOnly, SameSite=Lax, Secure if *secure*: the page was served
    over TLS); *max_age* 0 deletes it, None makes it last as long as the browser session."""
    # IRequest.addCookie does not list httpOnly and sameSite; twisted.web's Request has them.
    request.addCookie(  # type: ignore[no-untyped-call,call-arg]
        name,
        value.encode("ascii"),
        path=COOKIE_PATH,
        httpOnly=True,
        sameSite="lax",
        secure=secure,
        max_age=None if max_age is None else str(max_age).encode("ascii"),
    )


def csrf_token(secret: str) -> str:
    """The CSRF token of forms in a browser whose secret is *secret*."""
    return hmac.new(secret.encode("ascii"), _CSRF_LABEL, hashlib.sha256).hexdigest()


def visitor_secret(request: IRequest, *, secure: bool) -> str:
    """The browser's ``snet_visitor`` secret, made and set as a cookie if it has none."""
    known = cookie(request, VISITOR_COOKIE)
    if known is not None and len(known) >= 32:
        return known
    made = secrets.token_urlsafe(32)
    set_cookie(request, VISITOR_COOKIE, made, max_age=None, secure=secure)
    return made


def check_csrf(request: IRequest, secret: str | None, given: str | None) -> None:
    """Refuse the POST unless *given* is the CSRF token of *secret*.

    :raises CsrfRefused: otherwise.
    """
    if secret is None or given is None or not hmac.compare_digest(csrf_token(secret), given):
        raise CsrfRefused(
            "This form did not come from this site, or it has expired. Go back, reload "
            "the page and try again.",
            code=ErrorCode.CSRF_REFUSED,
        )
