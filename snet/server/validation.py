"""What clients send to the monolith, checked: the fields of a profile, passwords, user ids,
search prefixes and post texts. Each validator turns an untrusted JSON value into a checked
one or raises ``BadRequest``; the stores (``Accounts``, ``Social``) take checked values only.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import date

from snet.server.social import FEED_SIZE
from snet.web.errors import BadRequest, ErrorCode
from snet.web.inputs import ID, MAX_ID, validate_text

MAX_NAME = 100
"""The longest first or second name, in characters."""
MAX_CITY = 100
MAX_BIOGRAPHY = 2000
MIN_PASSWORD = 8
"""The shortest password a new account may have (a product choice; the spec asks only for 1)."""
MAX_PASSWORD = 256
OLDEST_BIRTHDATE = date(1900, 1, 1)
MAX_POST_TEXT = 10_000
"""The longest post, in characters."""
DEFAULT_FEED_LIMIT = 10
MAX_FEED_LIMIT = FEED_SIZE
"""The largest page of the feed: all of it."""

_NUMBER = re.compile(r"[0-9]{1,9}")
"""A page number or size as a query argument gives it."""


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


def _invalid(message: str) -> BadRequest:
    return BadRequest(message, code=ErrorCode.INVALID_FIELD)


def _checked_text(value: object, name: str, max_length: int, *, multiline: bool) -> str:
    """*value* if it is a string of at most *max_length* characters, valid Unicode (no lone
    surrogates) and free of control characters (bar newlines and tabs when *multiline*)."""
    if value is None:
        raise _invalid(f"{name} is required")
    if not isinstance(value, str):
        raise _invalid(f"{name} must be a string")
    if len(value) > max_length:
        raise _invalid(f"{name} must be at most {max_length} characters")
    allowed = "\n\r\t" if multiline else ""
    for char in value:
        category = unicodedata.category(char)
        if category == "Cs" or (category == "Cc" and char not in allowed):
            raise _invalid(f"{name} must not contain control characters or lone surrogates")
    return value


def validate_name(value: object, name: str) -> str:
    """A first or second name: 1 to MAX_NAME characters once surrounding white space is
    stripped (the stripped value is returned), no control characters."""
    text = _checked_text(value, name, MAX_NAME, multiline=False).strip()
    if not text:
        raise _invalid(f"{name} must not be empty")
    return text


def validate_city(value: object) -> str:
    """A city: optional (absent means ""), at most MAX_CITY characters, stripped."""
    if value is None:
        return ""
    return _checked_text(value, "city", MAX_CITY, multiline=False).strip()


def validate_biography(value: object) -> str:
    """A biography: optional (absent means ""), at most MAX_BIOGRAPHY characters; newlines
    and tabs are allowed, other control characters are not. Kept as given."""
    if value is None:
        return ""
    return _checked_text(value, "biography", MAX_BIOGRAPHY, multiline=True)


DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def parse_birthdate(value: object, today: date) -> date:
    """A birth date written ``YYYY-MM-DD``: a real calendar day from OLDEST_BIRTHDATE to
    *today*."""
    if not isinstance(value, str) or DATE.fullmatch(value) is None:
        raise _invalid("birthdate must be a date written YYYY-MM-DD")
    try:
        day = date.fromisoformat(value)
    except ValueError:
        raise _invalid("birthdate is not a calendar date") from None
    if day > today:
        raise _invalid("birthdate must not be in the future")
    if day < OLDEST_BIRTHDATE:
        raise _invalid(f"birthdate must not be before {OLDEST_BIRTHDATE.isoformat()}")
    return day


def validate_new_password(value: object) -> str:
    """A new account's password: MIN_PASSWORD to MAX_PASSWORD characters of valid Unicode."""
    password = validate_given_password(value)
    if len(password) < MIN_PASSWORD:
        raise _invalid(f"password must be at least {MIN_PASSWORD} characters")
    return password


def validate_given_password(value: object) -> str:
    """A password given at login: a non-empty string of at most MAX_PASSWORD characters."""
    if not isinstance(value, str) or not value:
        raise _invalid("password must be a non-empty string")
    if len(value) > MAX_PASSWORD:
        raise _invalid(f"password must be at most {MAX_PASSWORD} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid("password must be valid Unicode") from None
    return value


def parse_user_id(value: object, name: str = "id") -> int:
    """A user id as the public API writes it: a JSON string of decimal digits, a positive
    integer below 2**63."""
    if not isinstance(value, str) or ID.fullmatch(value) is None or int(value) > MAX_ID:
        raise BadRequest(
            f"{name} must be a string of decimal digits: a positive integer below 2**63",
            code=ErrorCode.INVALID_PARAMETER,
        )
    return int(value)


def validate_search_prefix(value: str | None, name: str) -> str:
    """A search prefix: 1 to MAX_NAME characters (surrounding white space stripped)."""
    if value is None:
        raise BadRequest(
            f"the query parameter {name} is required", code=ErrorCode.INVALID_PARAMETER
        )
    text = value.strip()
    if not text or len(text) > MAX_NAME:
        raise BadRequest(
            f"{name} must be 1 to {MAX_NAME} characters", code=ErrorCode.INVALID_PARAMETER
        )
    return text


def validate_post_text(value: object) -> str:
    """A post's text: see ``snet.web.inputs.validate_text``; at most MAX_POST_TEXT
    characters."""
    return validate_text(value, MAX_POST_TEXT)
